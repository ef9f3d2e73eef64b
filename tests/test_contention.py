"""One writer per dataset, ever: concurrent runs of every command, killed, paused and on other
hosts with other clocks, never lose a committed file; leftovers of killed runs are removed by the
next run; bad lease and run records give one clear line (issue 15, items 3 and 4)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.contention import REPO, Contention, Destination
from tests.disk import small_disk
from tests.fake_soda import FakeSoda, Latency
from tests.helpers import cli, exact
from tests.s3_proxy import S3FaultProxy

CRASHES = "h9gi-nx95"
SIZES = {CRASHES: 1_500, "f55k-p6yu": 10, "bm4k-52h4": 10}
SLOW = Latency(base=0.25, per_row=0.0, per_skipped=0.0, max_concurrent=3, metadata=0.0)


def one_line(err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("nyc-collisions:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def where(dest: str, s3_server: str | None) -> Destination:
    return Destination(dest, s3_server if dest.startswith("s3://") else None)


def land(srv: FakeSoda, dest: str, *extra: str) -> None:
    res = cli("backfill", "crashes", "--source", srv.url, "--dest", dest, *extra)
    assert res.code == 0, res.text


def named_files_exist(at: Destination) -> dict[str, Any]:
    manifest = at.manifest()
    assert manifest is not None
    keys = set(at.listing())
    missing = [f["path"] for b in manifest["batches"] for f in b["files"] if f["path"] not in keys]
    assert missing == []
    return manifest


def popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The CLI in a subprocess; `env` adds variables (FAKEHOST_*: as if on another host)."""
    path = os.pathsep.join([str(REPO / "src"), str(REPO / "tests" / "fakehost")])
    return subprocess.Popen(
        [sys.executable, "-m", "nyc_collisions", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
    )


def wait_for(condition: Any, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.02)


# -- the contention suite -----------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "kind"), [(6, "local"), (4, "s3")])
def test_concurrent_runs_of_every_command_keep_one_writer(
    seed: int, kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """2-4 runs at once per round (update, reconcile, compact --prune, backfill --force), at
    seeded offsets, some SIGKILLed or paused past the lease's TTL, half as if on other hosts
    with clocks off by minutes; the source changes between rounds. Every file the manifest names
    exists after each round; each run succeeded or said in one line why not; at the end nothing
    of the killed runs is left and the export equals the source."""
    moto_url = request.getfixturevalue("s3_env") if kind == "s3" else None
    outcome = Contention(seed, tmp_path, moto_url, rounds=3).run()
    assert outcome.problems == []
    assert outcome.rows_checked > 0
    assert sum(n for k, n in outcome.results.items() if k.endswith(" ok")) > 0


# -- a holder that stops renewing -----------------------------------------------------------------


def test_a_paused_holder_loses_the_lease_and_commits_nothing_more(
    dest: str, s3_server: str, tmp_path: Path
) -> None:
    """An update on another host is paused (SIGSTOP) past its lease's TTL: a second run takes
    the lease over and commits; the first, continued, stops with one line and commits nothing."""
    ttl = {"NYC_COLLISIONS_LEASE_TTL": "1"}
    with FakeSoda(sizes=SIZES, seed=3, latency=SLOW) as srv:
        land(srv, dest)
        srv.edit(CRASHES, 150)
        at = where(dest, s3_server)
        other_host = {"FAKEHOST_NAME": "elsewhere", "FAKEHOST_SKEW": "-900", **ttl}
        first = popen(
            "update", "crashes", "--page-size", "15", "--file-rows", "15",
            "--source", srv.url, "--dest", dest, env=other_host,
        )  # fmt: skip
        try:
            wait_for(lambda: at.read("crashes/lock.json") is not None, "the first run's lease")
            first.send_signal(signal.SIGSTOP)
            time.sleep(2)  # its lease grows older than the TTL: a second run watches, then takes it
            second = cli("update", "crashes", "--source", srv.url, "--dest", dest, env=ttl)
            assert second.code == 0, second.text
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 1, err
        one_line(err, "lock.json", "lost the lease")
        named_files_exist(at)
        assert cli("update", "crashes", "--source", srv.url, "--dest", dest).code == 0
        named_files_exist(at)
        exact(srv, dest, "crashes", tmp_path)


# -- a store without conditional writes ---------------------------------------------------------


def test_a_store_that_ignores_conditional_writes_is_refused(
    soda_ro: FakeSoda, bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with S3FaultProxy(s3_server, strip=("if-none-match", "if-match")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", f"s3://{bucket}/raw")
    assert res.code == 1
    one_line(res.err, f"s3://{bucket}/raw", "conditional writes")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert where(f"s3://{bucket}/raw", s3_server).listing() == []


# -- compact --prune keeps what readers of the previous manifest need ----------------------------


def test_prune_keeps_superseded_files_for_the_grace_period(
    soda: FakeSoda, dest: str, s3_server: str, tmp_path: Path
) -> None:
    grace_seconds = 2.0
    land(soda, dest, "--file-rows", "1000")
    soda.edit(CRASHES, 30)
    assert cli("update", "crashes", "--source", soda.url, "--dest", dest).code == 0
    at = where(dest, s3_server)
    before = named_files_exist(at)
    old = {f["path"] for b in before["batches"] for f in b["files"]}
    res = cli("compact", "crashes", "--prune", "--grace", str(grace_seconds / 3600), "--dest", dest)
    assert res.code == 0, res.text
    pruned_at = time.monotonic()
    after = named_files_exist(at)
    assert len(after["batches"]) == 1
    assert old <= set(at.listing())  # a reader holding the previous manifest can still read it all
    exact(soda, dest, "crashes", tmp_path)
    time.sleep(max(0.0, pruned_at + grace_seconds + 1.1 - time.monotonic()))
    assert cli("update", "crashes", "--source", soda.url, "--dest", dest).code == 0
    assert old & set(at.listing()) == set()  # the next run, past the grace, deleted them
    named_files_exist(at)
    exact(soda, dest, "crashes", tmp_path)


def test_the_daily_paths_fresh_snapshots_retire_what_they_supersede(
    soda: FakeSoda, dest: str, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unattended for a year, the daily update meets full replaces and column changes; each
    lands a fresh snapshot. The batches before it are retired by the same commit (kept a grace
    period for readers of the previous manifest, then deleted by a later run), so the
    destination holds about one copy of the dataset, not one more per replace."""
    from nyc_collisions import snapshot

    grace_seconds = 1.0
    monkeypatch.setattr(snapshot, "DEFAULT_GRACE_HOURS", grace_seconds / 3600, raising=False)
    at = where(dest, s3_server)
    land(soda, dest, "--file-rows", "1000")
    every: set[str] = set()
    for cycle in range(3):
        for _day in range(2):
            soda.edit(CRASHES, 5)
            assert cli("update", "crashes", "--source", soda.url, "--dest", dest).code == 0
        before = named_files_exist(at)
        old = {f["path"] for b in before["batches"] for f in b["files"]}
        every |= old
        if cycle == 1:
            soda.add_column(CRASHES, "weather", "text")
        else:
            soda.replace(CRASHES)
        res = cli("update", "crashes", "--reconcile", "--source", soda.url, "--dest", dest)
        assert res.code == 0, res.text
        after = named_files_exist(at)
        assert [b["kind"] for b in after["batches"]] == ["snapshot"], after["batches"]
        assert "retired the 3 batches it supersedes" in res.out, res.out
        assert old <= {r["path"] for r in after["retired"]}
        assert old <= set(at.listing())  # a reader of the previous manifest can read it all
        exact(soda, dest, "crashes", tmp_path)
        time.sleep(grace_seconds + 1.1)
    assert cli("update", "crashes", "--source", soda.url, "--dest", dest).code == 0
    after = named_files_exist(at)
    data = {k for k in at.listing() if "/data/" in k}
    assert every & data == set()  # past the grace, a later run deleted every superseded file
    assert data == {f["path"] for b in after["batches"] for f in b["files"]}
    assert after["retired"] == []
    exact(soda, dest, "crashes", tmp_path)


# -- leftovers ----------------------------------------------------------------------------------


def test_leftovers_of_killed_runs_are_removed_by_the_next_run_of_any_command(
    dest: str, s3_server: str, tmp_path: Path
) -> None:
    with FakeSoda(sizes=SIZES, seed=5, latency=SLOW) as srv:
        land(srv, dest, "--file-rows", "400")
        at = where(dest, s3_server)
        manifest = named_files_exist(at)
        snapshot = manifest["batches"][0]["batch_id"]
        # a backfill's progress records go once it is committed (folders too)
        assert [k for k in at.listing() if "/runs/" in k] == []
        assert at.empty_folders() == []
        # a backfill --force stopped by its time budget: a rerun resumes it, so runs keep it
        # (begun in a later second than the snapshot: one begun in the same second, run times
        # being to the second, might have begun before it, and is not resumed)
        time.sleep(1.01 - time.time() % 1)
        res = cli(
            "backfill", "crashes", "--force", "--page-size", "50", "--file-rows", "50",
            "--max-seconds", "1", "--source", srv.url, "--dest", dest,
        )  # fmt: skip
        assert res.code == 3, res.text
        named = {f["path"] for b in manifest["batches"] for f in b["files"]}
        resumable = {
            k
            for k in at.listing()
            if k.startswith("crashes/runs/") or (k.startswith("crashes/data/") and k not in named)
        }
        assert resumable
        # what killed runs leave: an update's file never committed, a committed batch's run
        # record, an unfinished upload (S3) or a temporary file of a killed writer (a folder)
        dead = "crashes/data/20260101T000000Z-update-dead01/part-0000-000000.csv"
        debris = [dead, f"crashes/runs/{snapshot}/parts/0000-000000.json"]
        leave_debris(at, debris)
        srv.edit(CRASHES, 5)
        res = cli("reconcile", "crashes", "--source", srv.url, "--dest", dest)
        assert res.code == 0, res.text
        keys = set(at.listing())
        assert keys & set(debris) == set()
        assert at.uploads() == []
        assert [k for k in keys if k.rsplit("/", 1)[-1].startswith(".")] == []
        assert at.empty_folders() == []
        assert resumable <= keys
        named_files_exist(at)
        res = cli("update", "crashes", "--source", srv.url, "--dest", dest)  # the edits
        assert res.code == 0, res.text
        exact(srv, dest, "crashes", tmp_path)
        # the resumed backfill commits, and its progress records go
        res = cli("backfill", "crashes", "--force", "--source", srv.url, "--dest", dest)
        assert res.code == 0, res.text
        assert "resumed" in res.out
        assert [k for k in at.listing() if "/runs/" in k] == []
        assert at.empty_folders() == []
        # (rows the resumed run fetched before the edit: the next update brings them)
        assert cli("update", "crashes", "--source", srv.url, "--dest", dest).code == 0
        exact(srv, dest, "crashes", tmp_path)


def leave_debris(at: Destination, keys: list[str]) -> None:
    """Objects a killed run leaves: `keys`, plus an unfinished multipart upload (S3) or a
    temporary file whose writer was killed (a folder)."""
    for key in keys:
        if at.s3 is None:
            path = Path(at.dest) / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"left by a killed run\n")
        else:
            at.s3.put_object(Bucket=at.bucket, Key=f"{at.prefix}/{key}", Body=b"left\n")
    partial = "crashes/data/20260101T000000Z-update-dead01/part-0000-000001.csv"
    if at.s3 is not None:
        at.s3.create_multipart_upload(Bucket=at.bucket, Key=f"{at.prefix}/{partial}")
        return
    code = (
        "import os, sys; from pathlib import Path; "
        "from nyc_collisions.sink.local import LocalStorage; "
        "w = LocalStorage(Path(sys.argv[1])).open_writer(sys.argv[2]); w.write(b'partial'); "
        "os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", code, at.dest, partial], check=False)
    assert any(p.name.endswith(".tmp") for p in (Path(at.dest) / "crashes/data").rglob(".*"))


# -- one clear line for bad state -------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [{"expires": "soon"}, {"ttl": 1e9}],
    ids=["expires_not_a_time", "ttl_no_run_takes"],  # (the taker would watch it for 31 years)
)
def test_a_malformed_lease_gives_one_line_naming_it(
    soda_ro: FakeSoda, tmp_path: Path, damage: dict[str, object]
) -> None:
    dest = tmp_path / "land"
    land(soda_ro, str(dest))
    manifest = (dest / "crashes/manifest.json").read_bytes()
    lease = {"token": "t", "host": "h", "pid": 1, "since": "2026-01-01T00:00:00Z"}
    (dest / "crashes/lock.json").write_text(json.dumps({**lease, **damage}))
    res = cli("update", "crashes", "--source", soda_ro.url, "--dest", str(dest))
    assert res.code == 1
    one_line(res.err, str(dest / "crashes/lock.json"), "delete")
    assert (dest / "crashes/manifest.json").read_bytes() == manifest


def test_a_corrupt_part_record_gives_one_line_naming_it(tmp_path: Path) -> None:
    dest = tmp_path / "land"
    with FakeSoda(sizes=SIZES, seed=4, latency=SLOW) as srv:
        records: list[Path] = []
        while not records:  # a backfill stopped by its time budget, with a finished file
            res = cli(
                "backfill", "crashes", "--page-size", "50", "--file-rows", "50",
                "--max-seconds", "1", "--source", srv.url, "--dest", str(dest),
            )  # fmt: skip
            assert res.code == 3, res.text
            records = sorted((dest / "crashes/runs").rglob("parts/*.json"))
        doc = json.loads(records[0].read_text())
        del doc["seq"]
        records[0].write_text(json.dumps(doc))
        res = cli("backfill", "crashes", "--source", srv.url, "--dest", str(dest))
    assert res.code == 1
    one_line(res.err, str(records[0]), "delete")
    assert not (dest / "crashes/manifest.json").exists()


def test_a_full_disk_at_the_lease_gives_one_line_and_leaves_no_empty_lease(
    soda_ro: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease's first write fails for want of space: one line; no empty lock.json stays."""
    landed = tmp_path / "landed"
    land(soda_ro, str(landed))
    with small_disk(tmp_path, 4 << 20, monkeypatch) as disk:
        shutil.copytree(landed, disk.path / "d")
        manifest = (disk.path / "d/crashes/manifest.json").read_bytes()
        disk.fill()
        res = cli("compact", "crashes", "--dest", str(disk.path / "d"))
        assert res.code == 1, (disk.kind, res.text)
        one_line(res.err, "no space left")
        assert not (disk.path / "d/crashes/lock.json").exists()
        assert (disk.path / "d/crashes/manifest.json").read_bytes() == manifest
