"""The servers the bench talks to, each a subprocess on 127.0.0.1: the project's fake SODA server
(`python -m tests.fake_soda`) and, with `--s3`, moto's S3 server. Both are stopped by `stop()`
(SIGTERM to their process group, SIGKILL after a grace period), also on Ctrl-C."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

from .measure import kill_group

TOKEN = "good-token"  # noqa: S105 - the fake server's test token


@dataclass(frozen=True)
class LatencyModel:
    """The fake server's latency model (seconds): see bench/README.md."""

    base: float = 0.15
    per_row: float = 1e-4
    per_skipped: float = 1.7e-6
    max_concurrent: int = 3

    def flags(self) -> list[str]:
        return [
            "--latency",
            "--base",
            str(self.base),
            "--per-row",
            str(self.per_row),
            "--per-skipped",
            str(self.per_skipped),
            "--max-concurrent",
            str(self.max_concurrent),
        ]

    def limit(self, rows: int) -> float:
        """The model's limit for landing `rows`: every row's time spread over the
        `max_concurrent` slots, plus one request's fixed cost (no $offset skipping)."""
        return rows * self.per_row / self.max_concurrent + (self.base if rows else 0.0)


def _wait_for_line(path: Path, prefix: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if line.startswith(prefix):
                return line
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {prefix!r}")
        time.sleep(0.1)
    raise TimeoutError(f"no {prefix!r} line from the server within {timeout:.0f}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FakeSodaServer:
    """`python -m tests.fake_soda` as a subprocess, and its admin API."""

    def __init__(
        self,
        root: Path,
        log_dir: Path,
        scale: float,
        latency: LatencyModel | None,
        seed: int = 0,
        cache: Path | None = None,
        start_timeout: float = 1800.0,
    ) -> None:
        self.root = root
        self.log_dir = log_dir
        self.scale = scale
        self.latency = latency
        self.seed = seed
        self.cache = cache
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._http: httpx.Client | None = None
        self._ps: psutil.Process | None = None

    def cmd(self) -> list[str]:
        cmd = [sys.executable, "-m", "tests.fake_soda", "--host", "127.0.0.1", "--port", "0"]
        cmd += ["--scale", str(self.scale), "--seed", str(self.seed), "--token", TOKEN]
        if self.cache is not None:
            cmd += ["--cache", str(self.cache)]
        if self.latency is not None:
            cmd += self.latency.flags()
        return cmd

    def start(self) -> FakeSodaServer:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = self.log_dir / f"fake_soda-{self.scale}.stdout"
        err = self.log_dir / f"fake_soda-{self.scale}.stderr"
        with out.open("wb") as o, err.open("wb") as e:
            self.proc = subprocess.Popen(
                self.cmd(),
                cwd=self.root,
                stdout=o,
                stderr=e,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            line = _wait_for_line(out, "READY ", self.proc, self.start_timeout)
        except (RuntimeError, TimeoutError) as exc:
            tail = err.read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"fake SODA server did not start: {exc}\n{tail}") from exc
        self.url = line.split()[1].rstrip("/")
        if not self.url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"the fake server is not on loopback: {self.url}")
        self._http = httpx.Client(base_url=self.url, timeout=1800.0, trust_env=False)
        self._ps = psutil.Process(self.proc.pid)
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.proc is not None:
            proc = self.proc
            kill_group(proc.pid, exited=lambda: proc.poll() is not None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self.proc = None

    def __enter__(self) -> FakeSodaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # admin API
    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            raise RuntimeError("the fake SODA server is not running")
        return self._http

    def admin(self, method: str, op: str, payload: Mapping[str, Any] | None = None) -> Any:
        body = orjson.dumps(payload) if payload is not None else None
        resp = self.http.request(
            method, f"/__admin/{op}", content=body, headers={"Content-Type": "application/json"}
        )
        resp.raise_for_status()
        return resp.json()

    def reset_stats(self) -> None:
        self.admin("POST", "reset_stats")

    def stats(self) -> dict[str, Any]:
        return dict(self.admin("GET", "stats"))

    def count(self, dataset_id: str) -> int:
        resp = self.http.get(
            f"/resource/{dataset_id}.json",
            params={"$select": "count(*) AS n"},
            headers={"X-App-Token": TOKEN},
        )
        resp.raise_for_status()
        return int(resp.json()[0]["n"])

    def iter_rows(self, dataset_id: str) -> Iterator[bytes]:
        """The current rows, in :id order, as NDJSON lines (`GET /__admin/rows`)."""
        with self.http.stream("GET", "/__admin/rows", params={"dataset": dataset_id}) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if line:
                    yield line.encode()

    def cpu_seconds(self) -> float:
        """CPU seconds the server process has used so far (user + sys)."""
        if self._ps is None:
            return 0.0
        try:
            t = self._ps.cpu_times()
        except psutil.Error:
            return 0.0
        return float(t.user + t.system)


class MotoS3Server:
    """moto's S3 server as a subprocess (for `--s3`), with credentials for children."""

    BUCKET = "nyc-application-collisions"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> MotoS3Server:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / "moto.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("moto server exited at start (see moto.log)")
            try:
                httpx.get(self.url, timeout=1.0, trust_env=False)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError("moto server did not answer within 60s")
        self.client().create_bucket(Bucket=self.BUCKET)
        return self

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )

    def stop(self) -> None:
        if self.proc is not None:
            proc = self.proc
            kill_group(proc.pid, exited=lambda: proc.poll() is not None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self.proc = None
