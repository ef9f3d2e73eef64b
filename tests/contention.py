"""Contention: 2 to 4 runs of mixed commands at once on one destination, some SIGKILLed or paused
(SIGSTOP, then SIGCONT after more than a lease's TTL), half of them as if on other hosts whose
clocks are off by up to 15 minutes (`tests/fakehost`), the source changing between rounds.

After each round every file the manifest names must exist; at the end, after one `update` and
one `reconcile` run alone, the export must equal the source field by field, and nothing a
killed run left may remain (no temporary files, orphan multipart uploads, files no manifest
names, empty folders, `runs/` of committed batches). Every run that did not succeed must end
with one line saying why (busy, lease lost, manifest changed), never a traceback.

Used by `tests/test_contention.py` (a few rounds in CI) and as a longer soak:

    python -m tests.contention --rounds 50            # a local folder, then S3 (moto)
    python -m tests.contention --rounds 20 --seed 9 --local-only
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.fake_soda import FakeSoda, Latency
from tests.helpers import exact

REPO = Path(__file__).resolve().parent.parent
NAME, DATASET_ID = "crashes", "h9gi-nx95"
SIZES = {DATASET_ID: 1_500, "f55k-p6yu": 10, "bm4k-52h4": 10}
TTL = 2.0  # the lease's TTL in these runs (NYC_COLLISIONS_LEASE_TTL), so that take-overs happen
# Why a run that did not succeed may have stopped: another run held the dataset or committed first
LOSER = re.compile(
    r"another run (holds|took)|lost the (lease|lock)|manifest changed|changed since this run"
)
NOTHING_YET = re.compile(r"nothing is landed|has not finished")


@dataclass
class Run:
    command: list[str]
    offset: float
    kill_after: float | None = None
    pause: tuple[float, float] | None = None  # (after, seconds)
    host: dict[str, str] = field(default_factory=dict)  # FAKEHOST_NAME, FAKEHOST_SKEW
    proc: subprocess.Popen[bytes] | None = None
    code: int | None = None
    err: str = ""


@dataclass
class Outcome:
    destination: str
    rounds: int = 0
    runs: int = 0
    results: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    rows_checked: int = 0
    seconds: float = 0.0


class Destination:
    """Read-only access to what landed, independent of the code under test."""

    def __init__(self, dest: str, moto_url: str | None) -> None:
        self.dest = dest
        self.s3: Any = None
        if dest.startswith("s3://"):
            import boto3

            self.bucket, _, self.prefix = dest[5:].partition("/")
            self.s3 = boto3.client("s3", endpoint_url=moto_url)

    def listing(self) -> list[str]:
        """Every object/file below the dataset's folder, relative to the destination."""
        if self.s3 is None:
            root = Path(self.dest)
            base = root / NAME
            return sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file())
        out = []
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/{NAME}/"
        )
        for page in pages:
            out += [o["Key"][len(self.prefix) + 1 :] for o in page.get("Contents", [])]
        return sorted(out)

    def read(self, key: str) -> bytes | None:
        if self.s3 is None:
            path = Path(self.dest) / key
            return path.read_bytes() if path.exists() else None
        try:
            return bytes(
                self.s3.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()
            )
        except self.s3.exceptions.NoSuchKey:
            return None

    def manifest(self) -> dict[str, Any] | None:
        data = self.read(f"{NAME}/manifest.json")
        return None if data is None else orjson.loads(data)

    def uploads(self) -> list[str]:
        if self.s3 is None:
            return []
        got = self.s3.list_multipart_uploads(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return [u["Key"] for u in got.get("Uploads", [])]

    def empty_folders(self) -> list[str]:
        if self.s3 is not None:
            return []
        base = Path(self.dest) / NAME
        return [str(p) for p in base.rglob("*") if p.is_dir() and not any(p.iterdir())]


class Contention:
    prune = ("--prune", "--grace", "0")  # readers are done at once here: prune at once

    def __init__(self, seed: int, workdir: Path, moto_url: str | None, rounds: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.moto_url = moto_url
        self.rounds = rounds
        self.env = dict(os.environ)
        self.env.update(
            NYC_COLLISIONS_RETRY_BASE="0.02",
            NYC_COLLISIONS_LEASE_TTL=str(TTL),
            PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests" / "fakehost")]),
        )
        self.outcome = Outcome("s3" if moto_url else "local")

    # -- one round ----------------------------------------------------------------------------
    def plan(self) -> list[Run]:
        runs = []
        for _ in range(self.rng.randint(2, 4)):
            kind = self.rng.choices(
                ["update", "reconcile", "compact", "backfill"], weights=[4, 2, 2, 2]
            )[0]
            args = {
                "update": ["update", NAME, "--page-size", "25", "--file-rows", "30"],
                "reconcile": ["reconcile", NAME],
                "compact": ["compact", NAME, *self.prune, "--file-rows", "400"],
                "backfill": ["backfill", NAME, "--force", "--workers", "3", "--page-size", "200"],
            }[kind]
            if kind == "backfill":
                args += ["--file-rows", "250", "--no-progress"]
            run = Run(args, offset=self.rng.uniform(0.0, 3.0))
            if self.rng.random() < 0.5:  # "another host", its clock off by up to 15 minutes
                run.host = {
                    "FAKEHOST_NAME": f"host-{self.rng.randint(1, 3)}",
                    "FAKEHOST_SKEW": f"{self.rng.uniform(-900, 900):.1f}",
                }
            roll = self.rng.random()
            if roll < 0.3:
                run.kill_after = self.rng.uniform(0.4, 3.0)
            elif roll < 0.5:  # long enough for a run that comes meanwhile to take the lease over
                run.pause = (self.rng.uniform(1.2, 2.5), self.rng.uniform(2.0, 3.0) * TTL)
            runs.append(run)
        return runs

    def play(self, runs: list[Run]) -> None:
        """Start, kill, stop and continue the runs at their moments, then wait for them all."""
        events: list[tuple[float, int, str]] = []
        for i, run in enumerate(runs):
            events.append((run.offset, i, "start"))
            if run.kill_after is not None:
                events.append((run.offset + run.kill_after, i, "kill"))
            if run.pause is not None:
                events.append((run.offset + run.pause[0], i, "stop"))
                events.append((run.offset + run.pause[0] + run.pause[1], i, "cont"))
        t0 = time.monotonic()
        for at, i, what in sorted(events):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            run = runs[i]
            if what == "start":
                run.proc = subprocess.Popen(
                    [sys.executable, "-m", "nyc_collisions", *run.command, "--retries", "4"]
                    if run.command[0] != "compact"
                    else [sys.executable, "-m", "nyc_collisions", *run.command],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env={**self.env, **run.host},
                    cwd=REPO,
                )
                continue
            assert run.proc is not None
            if run.proc.poll() is not None:
                continue
            sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}[what]
            run.proc.send_signal(sig)
        for run in runs:
            assert run.proc is not None
            try:
                _, err = run.proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                _, err = run.proc.communicate()
                self.problem(f"{' '.join(run.command)}: did not end within 300 s")
            run.code = run.proc.returncode
            run.err = err.decode("utf-8", "replace")

    def judge(self, run: Run) -> None:
        name = run.command[0]
        if "Traceback" in run.err:
            self.problem(f"{name}: a traceback:\n{run.err[-2000:]}")
            return
        if run.code == -signal.SIGKILL:
            self.outcome.results[f"{name} killed"] += 1
            return
        if run.code == 0:
            self.outcome.results[f"{name} ok"] += 1
            return
        errors = [line for line in run.err.splitlines() if line.startswith("nyc-collisions:")]
        if run.code == 1 and len(errors) == 1 and LOSER.search(errors[0]):
            why = LOSER.search(errors[0]).group(0)  # type: ignore[union-attr]
            kind = "busy" if why.startswith("another") else "lost" if "lost" in why else "changed"
            self.outcome.results[f"{name} {kind}"] += 1
            return
        if run.code == 1 and len(errors) == 1 and NOTHING_YET.search(errors[0]):
            self.outcome.results[f"{name} nothing landed yet"] += 1
            return
        self.problem(f"{name}: exit {run.code}: {run.err.strip()[-600:]}")

    def problem(self, text: str) -> None:
        self.outcome.problems.append(text)

    def check_named_files(self, where: Destination, when: str) -> None:
        manifest = where.manifest()
        if manifest is None:
            return
        present = set(where.listing())
        named = [f["path"] for b in manifest["batches"] for f in b["files"]]
        missing = [p for p in named if p not in present]
        if missing:
            self.problem(f"{when}: the manifest names {len(missing)} missing files: {missing[:3]}")

    def check_leftovers(self, where: Destination) -> None:
        """After a run alone: what killed runs left is gone, but a resumable backfill's files."""
        manifest = where.manifest() or {"batches": []}
        committed = {b["batch_id"] for b in manifest["batches"]}
        named = {f["path"] for b in manifest["batches"] for f in b["files"]}
        named |= {f["path"] for f in manifest.get("retired", [])}
        keys = where.listing()
        resumable = {
            k.split("/")[2]
            for k in keys
            if k.startswith(f"{NAME}/runs/") and k.endswith("/plan.json")
        } - committed

        def stray(key: str) -> bool:
            area, batch = [*key.split("/"), "", ""][1:3]
            if key.rsplit("/", 1)[-1].startswith(".") or key == f"{NAME}/lock.json":
                return True
            return (area == "data" and key not in named and batch not in resumable) or (
                area == "runs" and batch not in resumable
            )

        left = [k for k in keys if stray(k)]
        if left:
            self.problem(f"left behind: {len(left)} files, e.g. {left[:4]}")
        if where.uploads():
            self.problem(f"left behind: multipart uploads {where.uploads()[:3]}")
        empty = where.empty_folders()
        if empty:
            self.problem(f"left behind: {len(empty)} empty folders, e.g. {empty[:3]}")

    def mutate(self, srv: FakeSoda) -> None:
        srv.insert(DATASET_ID, self.rng.randint(1, 30))
        srv.edit(DATASET_ID, self.rng.randint(1, 30))
        if self.rng.random() < 0.6:
            srv.delete(DATASET_ID, self.rng.randint(1, 8))

    def alone(self, *args: str) -> None:
        """One run with nothing else at the destination: it must succeed."""
        done = subprocess.run(
            [sys.executable, "-m", "nyc_collisions", *args],
            capture_output=True,
            env=self.env,
            cwd=REPO,
            check=False,
        )
        if done.returncode != 0:
            self.problem(f"{args[0]} alone: exit {done.returncode}: {done.stderr.decode()[-600:]}")

    # -- the suite --------------------------------------------------------------------------------
    def run(self) -> Outcome:
        started = time.monotonic()
        latency = Latency(base=0.08, per_row=1e-4, per_skipped=0.0, max_concurrent=3, metadata=0.0)
        with FakeSoda(sizes=SIZES, seed=self.seed, latency=latency) as srv:
            self.env["SOCRATA_BASE_URL"] = srv.url
            if self.moto_url:
                import boto3

                # AWS_* (endpoint, dummy credentials) come from the environment: see `main`
                bucket = "contention-" + uuid.uuid4().hex[:10]
                boto3.client("s3", endpoint_url=self.moto_url).create_bucket(Bucket=bucket)
                dest = f"s3://{bucket}/raw"
            else:
                dest = str(self.workdir / f"land-{self.seed}")
            self.env["NYC_COLLISIONS_DEST"] = dest
            where = Destination(dest, self.moto_url)
            self.alone("backfill", NAME, "--workers", "3", "--file-rows", "250", "--no-progress")
            for r in range(self.rounds):
                self.mutate(srv)
                runs = self.plan()
                self.play(runs)
                for run in runs:
                    self.judge(run)
                self.outcome.rounds += 1
                self.outcome.runs += len(runs)
                self.check_named_files(where, f"round {r}")
            self.mutate(srv)
            self.alone("update", NAME, "--file-rows", "200")
            self.alone("reconcile", NAME)
            self.check_named_files(where, "at the end")
            self.check_leftovers(where)
            try:
                self.outcome.rows_checked = exact(srv, dest, NAME, self.workdir)
            except AssertionError as exc:
                self.problem(f"export differs from the source: {exc}")
        self.outcome.seconds = time.monotonic() - started
        return self.outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.contention")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--local-only", action="store_true")
    args = parser.parse_args(argv)
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for where in ("local", "s3"):
            if where == "s3" and args.local_only:
                continue
            server = None
            moto_url = None
            if where == "s3":
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
                server.start()
                moto_url = f"http://127.0.0.1:{port}"
                os.environ.update(
                    AWS_ENDPOINT_URL=moto_url,
                    AWS_ACCESS_KEY_ID="contention",
                    AWS_SECRET_ACCESS_KEY="contention-secret",
                    AWS_DEFAULT_REGION="us-east-1",
                )
                for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                    os.environ.pop(var, None)
            try:
                out = Contention(args.seed, Path(tmp), moto_url, args.rounds).run()
            finally:
                if server is not None:
                    server.stop()
            failed += bool(out.problems)
            print(
                f"{where}: rounds={out.rounds} runs={out.runs} rows_checked={out.rows_checked} "
                f"problems={len(out.problems)} {out.seconds:.0f}s "
                + " ".join(f"{k.replace(' ', '_')}={v}" for k, v in sorted(out.results.items()))
            )
            for text in out.problems:
                print(f"  {text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
