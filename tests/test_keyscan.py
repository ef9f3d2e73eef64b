"""verify, reconcile and status at any size: the source's keys scanned over partitions, both sides
spilled into hash buckets, a reconcile that resumes after a stop or a kill, and status counts
read from the manifest alone."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import pytest

from nyc_collisions.sink.local import LocalStorage
from nyc_collisions.sink.s3 import S3Storage
from nyc_collisions.sink.storage import open_storage
from tests.fake_soda import FakeSoda, Latency
from tests.helpers import NAMES, cli, exact, paced_crashes

PERSONS = NAMES["persons"]


@pytest.fixture
def small_scans(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Key pages of 150 rows (several partitions) and buckets of 400 rows (several spill files)
    at test size; the spill goes to a folder of the test's own."""
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setenv("NYC_COLLISIONS_KEYSCAN_PAGE", "150")
    monkeypatch.setenv("NYC_COLLISIONS_KEYSCAN_BUCKET_ROWS", "400")
    monkeypatch.setenv("TMPDIR", str(spill))
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    return spill


def key_pages(srv: FakeSoda) -> list[dict[str, Any]]:
    """The keys requests the server answered (not the probes, counts or rows)."""
    return [
        r
        for r in srv.requests()
        if str(r["params"].get("$select", "")).startswith(":id,")
        and "$offset" not in r["params"]
        and r.get("status") == 200
    ]


def partitions_seen(srv: FakeSoda) -> set[str]:
    """The upper `:id` bounds of the keys requests: one a partition but the last."""
    uppers = set()
    for r in key_pages(srv):
        found = re.search(r":id <= '([^']+)'", str(r["params"].get("$where", "")))
        if found:
            uppers.add(found.group(1))
    return uppers


def run(*args: str, code: int = 0) -> str:
    res = cli(*args)
    assert res.code == code, res.text
    return res.out


def scan_records(dest: str, name: str) -> list[str]:
    return open_storage(dest).list_keys(f"{name}/runs/")


def test_verify_and_reconcile_stay_exact_over_partitions_and_buckets(
    soda: FakeSoda, dest: str, tmp_path: Path, small_scans: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = ("--source", soda.url, "--dest", dest)
    run("backfill", "crashes", "persons", *where, "--page-size", "800")
    for dataset_id in (NAMES["crashes"], PERSONS):
        soda.delete(dataset_id, 17)
        soda.insert(dataset_id, 5)
        soda.edit(dataset_id, 9)
    soda.reset_stats()
    out = run("verify", "crashes", "persons", *where, code=1)
    assert out.count("missing 5, extra 17, duplicated 0") == 2, out
    assert len(partitions_seen(soda)) >= 3  # the source's keys came over several partitions
    assert not list(small_scans.iterdir())  # the spill is gone
    run("update", "crashes", "persons", *where)
    with caplog.at_level(logging.INFO, logger="nyc_collisions.reconcile"):
        out = run("reconcile", "crashes", "persons", *where)
    assert out.count("vanished 17") == 2, out
    buckets = [int(n) for n in re.findall(r"comparing in (\d+) buckets", caplog.text)]
    assert buckets, caplog.text
    assert min(buckets) > 2, caplog.text
    for name in ("crashes", "persons"):
        exact(soda, dest, name, tmp_path)
        assert not scan_records(dest, name)  # the finished scan's records are gone
    out = run("verify", "crashes", "persons", *where)
    assert out.count(": OK:") == 2, out
    # the orphans report, bucket by bucket, counts what the source holds
    crashes = {r["collision_id"] for r in soda.rows(NAMES["crashes"])}
    lost = [r for r in soda.rows(PERSONS) if r.get("collision_id") not in crashes]
    assert f"persons: {len(lost):,} rows refer to" in out, out
    status = json.loads(run("status", "crashes", "persons", "--json", *where))
    assert all(s["agree"] and s["tombstones"] == 17 for s in status), status
    assert not list(small_scans.iterdir())


def slow_source(seed: int) -> FakeSoda:
    """Persons only, at 3,000 rows, on a server whose every request takes 0.1 s (3 at once)."""
    latency = Latency(base=0.1, per_row=0.0, per_skipped=0.0, max_concurrent=3, metadata=0.0)
    sizes = {"h9gi-nx95": 10, PERSONS: 3000, "bm4k-52h4": 10}
    return FakeSoda(sizes=sizes, seed=seed, latency=latency)


def test_a_reconcile_stopped_by_its_time_budget_goes_on_and_ends_exact(
    dest: str, tmp_path: Path, small_scans: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NYC_COLLISIONS_KEYSCAN_PAGE", "50")  # 60 pages: more than 2 s of scan
    with slow_source(seed=5) as srv:
        where = ("--source", srv.url, "--dest", dest)
        run("backfill", "persons", *where, "--page-size", "1000")
        srv.delete(PERSONS, 11)
        srv.insert(PERSONS, 6)
        srv.edit(PERSONS, 4)
        # the first budget that stops it after some keys were recorded (a chunk holds two pages
        # of a range), however loaded this machine is
        for budget in ("1.5", "3", "6", "12"):
            srv.reset_stats()  # the keys this attempt scanned (it goes on from the last one's)
            out = run("reconcile", "persons", *where, "--max-seconds", budget, code=3)
            assert "stopped during the key scan" in out, out
            scanned = sum(r["rows"] for r in key_pages(srv))
            if any("/keys/" in k for k in scan_records(dest, "persons")):
                break
        assert 0 < scanned < len(srv.rows(PERSONS))
        # other commands meanwhile: the rows an update lands in ranges already scanned are
        # not taken for deletions, and the cleanup of every command keeps the scan's records
        srv.insert(PERSONS, 25)
        run("update", "persons", *where)
        run("compact", "persons", "--dest", dest)
        assert any(k.endswith("/scan.json") for k in scan_records(dest, "persons"))
        srv.reset_stats()
        out = run("reconcile", "persons", *where)
        assert "resumed run" in out, out
        assert "vanished 11" in out, out
        rescanned = sum(r["rows"] for r in key_pages(srv))
        assert rescanned < len(srv.rows(PERSONS))  # it went on; it did not start over
        exact(srv, dest, "persons", tmp_path)
        assert not scan_records(dest, "persons")
        assert ": OK:" in run("verify", "persons", *where)
        status = json.loads(run("status", "persons", "--json", *where))
        assert status[0]["agree"], status


def test_a_killed_reconcile_goes_on_from_its_records(
    dest: str, tmp_path: Path, small_scans: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NYC_COLLISIONS_KEYSCAN_PAGE", "50")
    with slow_source(seed=6) as srv:
        where = ["--source", srv.url, "--dest", dest]
        run("backfill", "persons", *where, "--page-size", "1000")
        srv.delete(PERSONS, 9)
        proc = subprocess.Popen(
            [sys.executable, "-m", "nyc_collisions", "reconcile", "persons", *where],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not any("/parts/" in k for k in scan_records(dest, "persons")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no chunk was ever recorded"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(0.3)  # the lease of a dead process of this host is taken over at once
        out = run("reconcile", "persons", *where)
        assert "resumed run" in out, out
        assert "vanished 9" in out, out
        exact(srv, dest, "persons", tmp_path)
        assert not scan_records(dest, "persons")


def status_of(srv: FakeSoda, dest: str, name: str) -> dict[str, Any]:
    """`status --json` of one dataset, with every landed data file unreadable meanwhile."""
    real = {cls: cls.open_reader for cls in (LocalStorage, S3Storage)}

    def refuse(self: Any, key: str) -> IO[bytes]:
        if "/data/" in key:
            raise OSError(f"status read a data file: {key}")
        return real[type(self)](self, key)

    try:
        for cls in real:
            cls.open_reader = refuse  # type: ignore[method-assign]
        doc = json.loads(run("status", name, "--json", "--source", srv.url, "--dest", dest))
    finally:
        for cls, method in real.items():
            cls.open_reader = method  # type: ignore[method-assign]
    return dict(doc[0])


def test_status_counts_come_from_the_manifest(soda: FakeSoda, dest: str) -> None:
    where = ("--source", soda.url, "--dest", dest)
    run("backfill", "crashes", *where, "--page-size", "800")
    crashes = NAMES["crashes"]
    assert status_of(soda, dest, "crashes")["agree"]
    soda.insert(crashes, 40)
    soda.edit(crashes, 30)
    run("update", "crashes", *where, "--page-size", "25", "--file-rows", "30")
    assert status_of(soda, dest, "crashes")["agree"]
    soda.delete(crashes, 7)  # an update does not see deletions: the count says so
    soda.insert(crashes, 3)
    run("update", "crashes", *where)
    got = status_of(soda, dest, "crashes")
    assert got["rows"] == len(soda.rows(crashes)) + 7, got
    assert not got["agree"], got
    run("reconcile", "crashes", *where)
    assert status_of(soda, dest, "crashes")["agree"]
    run("compact", "crashes", "--dest", dest)
    assert status_of(soda, dest, "crashes")["agree"]
    soda.edit(crashes, 5)
    run("update", "crashes", *where)
    run("compact", "crashes", "--prune", "--grace", "0", "--dest", dest)
    got = status_of(soda, dest, "crashes")
    assert got["rows"] == len(soda.rows(crashes)), got
    assert got["agree"], got


def test_status_counts_stay_exact_after_runs_stopped_midway(tmp_path: Path) -> None:
    """A backfill stopped and resumed after rows were inserted (the snapshot holds some rows
    newer than its watermark), and an update stopped within one `:updated_at` whose rows are
    then edited: the counts each update records stay exact."""
    crashes = NAMES["crashes"]
    with paced_crashes() as srv:
        dest = str(tmp_path / "land")
        where = ("--source", srv.url, "--dest", dest)
        paged = ("--page-size", "100", "--file-rows", "100")
        res = cli("backfill", "crashes", *where, *paged, "--max-seconds", "0.6")
        assert res.code in (0, 3), res.text
        srv.insert(crashes, 300)
        run("backfill", "crashes", *where, *paged)
        run("update", "crashes", *where)
        assert status_of(srv, dest, "crashes")["agree"]
        srv.insert(crashes, 400)  # one :updated_at for all 400
        res = cli("update", "crashes", *where, "--page-size", "50", "--max-seconds", "0.3",
                  "--file-rows", "50")  # fmt: skip
        assert res.code in (0, 3), res.text
        srv.edit(crashes, 600)
        run("update", "crashes", *where)
        got = status_of(srv, dest, "crashes")
        assert got["rows"] == len(srv.rows(crashes)), got
        assert got["agree"], got
        exact(srv, dest, "crashes", tmp_path)


def test_the_daily_lambda_run_goes_on_with_a_stopped_reconcile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_scans: Path
) -> None:
    from nyc_collisions import aws

    class Context:
        def __init__(self, seconds: float) -> None:
            self.seconds = seconds

        def get_remaining_time_in_millis(self) -> int:
            return int(self.seconds * 1000)

    monkeypatch.setenv("NYC_COLLISIONS_KEYSCAN_PAGE", "50")
    with slow_source(seed=8) as srv:
        dest = str(tmp_path / "land")
        run("backfill", "persons", "--source", srv.url, "--dest", dest, "--page-size", "1000")
        srv.delete(PERSONS, 5)
        monkeypatch.setenv("NYC_COLLISIONS_DEST", dest)
        monkeypatch.setenv("SOCRATA_BASE_URL", srv.url)
        monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "persons")
        first = aws.handler({"reconcile": True}, Context(2.0))  # stops 0.5 s before the end
        assert not first["done"], first
        assert first["results"][-1]["status"] == "stopped", first
        daily = aws.handler({}, Context(120))  # not a reconcile day: it goes on all the same
        assert daily["done"], daily
        assert [r["status"] for r in daily["results"]] == ["updated", "reconciled"], daily
        assert daily["results"][-1]["vanished"] == 5, daily
        exact(srv, dest, "persons", tmp_path)
        again = aws.handler({}, Context(120))  # nothing left to go on with
        assert [r["status"] for r in again["results"]] == ["updated"], again


def stopped_scan(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, tuple[str, ...], Path]:
    """Persons landed, then a reconcile stopped by its deadline: the destination, the
    arguments that name it, and the stopped scan's record."""
    from nyc_collisions import reconcile
    from tests.helpers import deadline_past_for

    dest = tmp_path / "land"
    where = ("--source", soda.url, "--dest", str(dest))
    assert cli("backfill", "persons", *where).code == 0
    with monkeypatch.context() as late:
        late.setattr(reconcile, "Reconcile", deadline_past_for({"persons"}))
        assert cli("reconcile", "persons", *where).code == 3
    (scan,) = (dest / "persons" / "runs").rglob("scan.json")
    return dest, where, scan


def test_a_damaged_key_scan_record_is_scanned_anew(
    soda: FakeSoda,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stopped reconcile's `scan.json`, damaged: only the scan's progress, so the next
    reconcile says so and scans again (it failed every reconcile after it, the daily one too,
    with a line that named no way out)."""
    dest, where, scan = stopped_scan(soda, tmp_path, monkeypatch)
    scan.write_text(scan.read_text()[:40])
    soda.delete(NAMES["persons"], 3)
    with caplog.at_level(logging.WARNING):
        res = cli("reconcile", "persons", *where)
    assert res.code == 0, res.text
    assert "vanished 3" in res.out, res.out
    assert any("scan.json: unreadable" in r.getMessage() for r in caplog.records), caplog.text
    exact(soda, str(dest), "persons", tmp_path)


def test_a_damaged_key_scan_part_record_is_scanned_anew(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a damaged `scan.json`, a damaged part record of the scan (only its progress too) is
    dropped with the scan, which starts anew."""
    dest, where, scan = stopped_scan(soda, tmp_path, monkeypatch)
    parts = scan.parent / "parts"
    parts.mkdir(exist_ok=True)
    (parts / "0000-000000.json").write_text('{"partition": 0, "seq": 0, "do')
    soda.delete(NAMES["persons"], 3)
    res = cli("reconcile", "persons", *where)
    assert res.code == 0, res.text
    exact(soda, str(dest), "persons", tmp_path)
