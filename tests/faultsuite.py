"""Seeded fault schedules: backfill, update and reconcile under source faults, S3 faults, SIGKILLs
and a source that changes meanwhile; then the exported current state is compared with the source.

Used by `tests/test_faults.py` (a few schedules in CI) and by the soak (`python -m tests.soak`).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fake_soda import FakeSoda, Latency
from tests.helpers import KEYS, NAMES, columns, landed, read_export
from tests.s3_proxy import S3FaultProxy

SIZES = {"h9gi-nx95": 1_200, "f55k-p6yu": 2_600, "bm4k-52h4": 2_000}
TOKEN = "soak-token-" + "7c1e9b"
SOURCE_KINDS: list[Any] = [
    "429",
    {"kind": "429", "retry_after": 0},
    "403_throttle",
    "500",
    "502",
    "503",
    "202",
    "reset",
    "truncate_rows",
    "truncate_mid",
    {"kind": "html", "status": 200},
    {"kind": "html", "status": 503},
    {"kind": "stall", "seconds": 1.5},
]
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    seed: int
    destination: str
    invocations: int = 0
    kills: int = 0
    failures: list[str] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    mismatched: int = 0
    rows_checked: int = 0
    source_faults: Counter[str] = field(default_factory=Counter)
    s3_faults: Counter[str] = field(default_factory=Counter)
    token_leaks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exact(self) -> bool:
        return not (self.lost or self.duplicated or self.mismatched or self.token_leaks)


class Schedule:
    def __init__(self, seed: int, workdir: Path, moto_url: str | None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.moto_url = moto_url
        self.outcome = Outcome(seed, "s3" if moto_url else "local")
        self.env = dict(os.environ)
        self.env.update(
            SOCRATA_APP_TOKEN=TOKEN, NYC_COLLISIONS_RETRY_BASE="0.02", PYTHONPATH=str(REPO / "src")
        )
        self.outputs: list[str] = []

    # -- running the CLI in a subprocess, maybe killing it ----------------------------------
    def cli(self, *args: str, kill: bool = False) -> int | None:
        """Run the CLI; with `kill`, SIGKILL it at a random moment. None when killed."""
        self.outcome.invocations += 1
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nyc_collisions.cli",
                *args,
                *(() if args[0] == "export" else ("-v", "--retries", "12", "--timeout", "1")),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=REPO,
        )
        if kill:
            try:
                proc.wait(timeout=self.rng.uniform(0.3, 2.5))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                self.outcome.kills += 1
        out, err = proc.communicate(timeout=600)
        self.outputs.append((out + err).decode("utf-8", "replace"))
        if proc.returncode == -signal.SIGKILL:
            return None
        if proc.returncode not in (0, 3):
            last = (err.decode("utf-8", "replace").strip().splitlines() or ["?"])[-1]
            self.outcome.failures.append(f"{args[0]} exit {proc.returncode}: {last}")
        return proc.returncode

    def until_done(self, *args: str, kills: int) -> None:
        for attempt in range(8):
            code = self.cli(*args, kill=attempt < kills and self.rng.random() < 0.8)
            if code == 0:
                return
        self.outcome.failures.append(f"{args[0]} never completed")

    def mutate(self, srv: FakeSoda, ids: list[str], deletes: bool = True) -> None:
        for dataset_id in ids:
            srv.insert(dataset_id, self.rng.randint(1, 40))
            srv.edit(dataset_id, self.rng.randint(1, 40))
            if deletes and self.rng.random() < 0.5:
                srv.delete(dataset_id, self.rng.randint(1, 10))
        if self.rng.random() < 0.15:
            srv.replace(self.rng.choice(ids))

    # -- the schedule ---------------------------------------------------------------------------
    def run(self) -> Outcome:
        started = time.monotonic()
        names = self.rng.sample(sorted(NAMES), k=self.rng.randint(1, 3))
        ids = [NAMES[n] for n in names]
        fmt = self.rng.choice(["csv", "parquet"])
        common = [
            "--page-size",
            str(self.rng.choice([150, 400, 900])),
            "--file-rows",
            str(self.rng.choice([300, 800, 5000])),
        ]
        latency = Latency(base=0.01, per_row=2e-5, per_skipped=0.0, max_concurrent=3)
        with FakeSoda(sizes=SIZES, seed=self.seed, tokens=(TOKEN,), latency=latency) as srv:
            srv.random_faults(self.rng.choice([0.03, 0.08, 0.15]), SOURCE_KINDS, seed=self.seed)
            self.env["SOCRATA_BASE_URL"] = srv.url
            proxy = None
            if self.moto_url:
                proxy = S3FaultProxy(
                    self.moto_url, probability=self.rng.choice([0.02, 0.05]), seed=self.seed
                ).__enter__()
                bucket = "soak-" + uuid.uuid4().hex[:10]
                _create_bucket(self.moto_url, bucket)
                self.env.update(
                    AWS_ENDPOINT_URL=proxy.url,
                    AWS_ACCESS_KEY_ID="soak",
                    AWS_SECRET_ACCESS_KEY="soak-secret",
                    AWS_DEFAULT_REGION="us-east-1",
                )
                dest = f"s3://{bucket}/raw"
            else:
                dest = str(self.workdir / f"land-{self.seed}")
            self.env["NYC_COLLISIONS_DEST"] = dest
            try:
                # 1. backfill while the source changes, killed at random moments, rerun until done
                changer = threading.Timer(self.rng.uniform(0.2, 1.5), self.mutate, (srv, ids))
                changer.start()
                self.until_done(
                    "backfill",
                    *names,
                    "--format",
                    fmt,
                    "--workers",
                    str(self.rng.randint(1, 4)),
                    *common,
                    kills=2,
                )
                changer.join()
                # 2. daily updates, some killed
                for _ in range(self.rng.randint(1, 2)):
                    self.mutate(srv, ids, deletes=False)
                    self.until_done("update", *names, *common, kills=1)
                # 3. deletions: update with reconcile
                self.mutate(srv, ids)
                self.until_done("update", "--reconcile", *names, *common, kills=1)
                srv.clear_faults()
                if proxy:
                    proxy.probability = 0.0
                self.compare(srv, names, dest)
            finally:
                stats = srv.stats()
                self.outcome.source_faults.update(stats.get("faults", {}))
                if proxy:
                    self.outcome.s3_faults.update(proxy.faults)
                    proxy.__exit__()
        self.scan_for_token(dest)
        self.outcome.seconds = time.monotonic() - started
        return self.outcome

    def compare(self, srv: FakeSoda, names: list[str], dest: str) -> None:
        for name in names:
            out = self.workdir / f"export-{self.seed}-{name}.csv"
            if self.cli("export", name, "--dest", dest, "--output", str(out)) != 0:
                self.outcome.failures.append(f"export {name} failed")
                self.outcome.lost += len(srv.rows(NAMES[name]))  # nothing to show for it
                continue
            dataset_id = NAMES[name]
            cols = columns(srv.url, dataset_id)
            key = KEYS[dataset_id]
            source = {str(r[key]): r for r in srv.rows(dataset_id)}
            seen: Counter[str] = Counter()
            for row in read_export(out):
                k = str(row[key])
                seen[k] += 1
                src = source.get(k)
                if src is None or seen[k] > 1:
                    continue
                for f, _t in cols:
                    want, have = src.get(f), row[landed(f)]
                    if isinstance(want, dict):
                        import json

                        have = json.loads(have) if have else None
                    if want != have:
                        self.outcome.mismatched += 1
                        break
            self.outcome.lost += sum(1 for k in source if k not in seen)
            self.outcome.duplicated += sum(n - 1 for n in seen.values() if n > 1)
            self.outcome.duplicated += sum(1 for k in seen if k not in source)  # extra rows
            self.outcome.rows_checked += len(source)
            out.unlink()

    def scan_for_token(self, dest: str) -> None:
        needle = TOKEN.encode()
        for text in self.outputs:
            if TOKEN in text:
                self.outcome.token_leaks.append("command output")
        if not dest.startswith("s3://"):
            for path in Path(dest).rglob("*"):
                if path.is_file() and needle in path.read_bytes():
                    self.outcome.token_leaks.append(str(path))
        else:
            import boto3

            s3 = boto3.client(
                "s3",
                endpoint_url=self.moto_url,
                aws_access_key_id="soak",
                aws_secret_access_key="soak-secret",
                region_name="us-east-1",
            )
            bucket = dest[5:].split("/")[0]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for obj in page.get("Contents", []):
                    body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                    if needle in body:
                        self.outcome.token_leaks.append(obj["Key"])


def _create_bucket(moto_url: str, bucket: str) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=moto_url,
        aws_access_key_id="soak",
        aws_secret_access_key="soak-secret",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
