"""Daily updates, reconciliation and compaction keep the landed state equal to the source."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fake_soda import FakeSoda, Latency
from tests.helpers import NAMES, cli, each_destination_and_format, exact, stopped_snapshot


def land(srv: FakeSoda, dest: str, *extra: str) -> None:
    res = cli("backfill", "--source", srv.url, "--dest", dest, "--page-size", "800", *extra)
    assert res.code == 0, res.text


def update(srv: FakeSoda, dest: str, *extra: str) -> str:
    res = cli("update", "--source", srv.url, "--dest", dest, "--page-size", "300", *extra)
    assert res.code == 0, res.text
    return res.out


def mutate(srv: FakeSoda, cycle: int) -> None:
    for dataset_id in NAMES.values():
        srv.insert(dataset_id, 40 + cycle)
        srv.edit(dataset_id, 25)
    if cycle == 1:
        srv.replace("h9gi-nx95")


@each_destination_and_format(on_s3="csv")
def test_cycles_of_changes_stay_exact(soda: FakeSoda, dest: str, fmt: str, tmp_path: Path) -> None:
    land(soda, dest, "--format", fmt)
    for cycle in range(3):
        mutate(soda, cycle)
        update(soda, dest)
        for name in NAMES:
            exact(soda, dest, name, tmp_path, ".csv" if cycle % 2 else ".parquet")
    # nothing changed: the second update in a row lands nothing
    out = update(soda, dest)
    assert "total: 0 rows" in out


def test_update_sees_late_edits_of_old_rows(soda: FakeSoda, tmp_path: Path) -> None:
    dest = str(tmp_path / "land")
    land(soda, dest, "crashes")
    soda.edit("h9gi-nx95", 10)
    out = update(soda, dest, "crashes")
    assert "updated 10 rows" in out
    exact(soda, dest, "crashes", tmp_path)


@pytest.mark.parametrize("workers", ["1", "4"], ids=["stream", "snapshot"])
def test_full_replace_is_a_large_update(soda: FakeSoda, tmp_path: Path, workers: str) -> None:
    """With one worker a full replace comes as one stream of changes; with more, as a fresh
    snapshot over the partitions (every row changed, so every row is fetched either way)."""
    dest = str(tmp_path / "land")
    land(soda, dest, "persons")
    soda.edit("f55k-p6yu", 30)
    assert "landed a fresh snapshot" not in update(soda, dest, "persons", "--workers", workers)
    soda.replace("f55k-p6yu")
    soda.delete("f55k-p6yu", 20)
    out = update(soda, dest, "persons", "--file-rows", "1000", "--workers", workers)
    assert f"updated {len(soda.rows('f55k-p6yu')):,} rows" in out
    assert ("landed a fresh snapshot" in out) == (workers == "4")
    manifest = json.loads((Path(dest) / "persons/manifest.json").read_text())
    assert manifest["batches"][-1]["kind"] == ("snapshot" if workers == "4" else "update")
    if workers == "1":  # the stream does not see deletions: reconcile does
        assert cli("reconcile", "persons", "--source", soda.url, "--dest", dest).code == 0
    exact(soda, dest, "persons", tmp_path)
    assert "total: 0 rows" in update(soda, dest, "persons", "--workers", workers)


def test_the_rows_landed_since_the_snapshot_never_pass_half_of_it(
    soda: FakeSoda, tmp_path: Path
) -> None:
    """Updates that each change under half the rows (a publisher's partial replaces) pile up
    after the snapshot; readers of the current state (export, verify, reconcile) hold the later
    batches' keys at once, so an update that would take them past half the snapshot lands a
    fresh snapshot instead, and the current state stays exact."""
    dest = str(tmp_path / "land")
    land(soda, dest, "crashes")
    rows = len(soda.rows("h9gi-nx95"))
    fresh = 0
    for _ in range(4):
        soda.edit("h9gi-nx95", rows * 3 // 10)
        fresh += "landed a fresh snapshot" in update(soda, dest, "crashes")
        manifest = json.loads((Path(dest) / "crashes/manifest.json").read_text())
        batches = manifest["batches"]
        last = max(i for i, b in enumerate(batches) if b["kind"] == "snapshot")
        since = sum(b["rows"] for b in batches[last + 1 :])
        assert since <= batches[last]["rows"] // 2, (since, batches[last]["rows"])
    assert fresh  # (three tenths a time: the second, at the latest, passes half)
    exact(soda, dest, "crashes", tmp_path)


@pytest.mark.parametrize("workers", [[], ["--workers", "1"]], ids=["default", "one worker"])
def test_the_batches_since_the_snapshot_stay_bounded_year_round(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: list[str]
) -> None:
    """A dataset left running keeps a bounded number of batches: each day's update and each
    week's tombstones add one, and every reader of the current state reads them all, so once
    `REFRESH_BATCHES` were landed since the snapshot an update lands a fresh one (its bound
    made small here: the same path as a hundred)."""
    from nyc_collisions import incremental

    monkeypatch.setattr(incremental, "REFRESH_BATCHES", 3)
    dest = str(tmp_path / "land")
    land(soda, dest, "crashes")
    fresh = 0
    for day in range(8):
        soda.insert("h9gi-nx95", 2)
        soda.edit("h9gi-nx95", 1)
        if day % 3 == 2:
            soda.delete("h9gi-nx95", 1)
            reconciled = cli("reconcile", "crashes", "--source", soda.url, "--dest", dest)
            assert reconciled.code == 0, reconciled.text
        fresh += "batches landed since the last snapshot" in update(soda, dest, "crashes", *workers)
        batches = json.loads((Path(dest) / "crashes/manifest.json").read_text())["batches"]
        last = max(i for i, b in enumerate(batches) if b["kind"] == "snapshot")
        assert len(batches) - last - 1 <= 3, [b["kind"] for b in batches]
    assert fresh >= 2
    exact(soda, dest, "crashes", tmp_path)


def test_update_without_backfill_says_so(soda_ro: FakeSoda, tmp_path: Path) -> None:
    res = cli("update", "crashes", "--source", soda_ro.url, "--dest", str(tmp_path))
    assert res.code == 1
    assert "run `nyc-collisions backfill crashes` first" in res.err
    assert len(res.err.strip().splitlines()) == 1


def test_reconcile_records_deletions_and_refetches_gaps(
    soda: FakeSoda, dest: str, tmp_path: Path
) -> None:
    land(soda, dest)
    for dataset_id in NAMES.values():
        soda.delete(dataset_id, 17)
        soda.insert(dataset_id, 5)
    res = cli("verify", "--source", soda.url, "--dest", dest)
    assert res.code == 1
    assert "missing 5" in res.out
    assert "extra 17" in res.out
    res = cli("update", "--reconcile", "--source", soda.url, "--dest", dest)
    assert res.code == 0, res.text
    assert "vanished 17" in res.out
    for name in NAMES:
        exact(soda, dest, name, tmp_path)
    res = cli("verify", "--source", soda.url, "--dest", dest)
    assert res.code == 0, res.text
    assert res.out.count(": OK:") == 3
    assert "collision_ids that are not in crashes" in res.out
    status = json.loads(cli("status", "--json", "--source", soda.url, "--dest", dest).out)
    assert all(s["agree"] for s in status)
    assert all(s["tombstones"] == 17 for s in status)


def test_reconcile_alone_after_deletions(soda: FakeSoda, tmp_path: Path) -> None:
    dest = str(tmp_path / "land")
    land(soda, dest, "vehicles")
    soda.delete("bm4k-52h4", 30)
    res = cli("reconcile", "vehicles", "--source", soda.url, "--dest", dest)
    assert res.code == 0, res.text
    exact(soda, dest, "vehicles", tmp_path)


def test_status_with_the_source_unreachable_says_so(soda: FakeSoda, tmp_path: Path) -> None:
    """Landed rows against a source that cannot be reached: not compared, rather than "DIFFER"
    (or `"agree": false`), which would say the source has other rows."""
    dest = str(tmp_path / "land")
    land(soda, dest, "crashes")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{s.getsockname()[1]}"
    args = ("status", "crashes", "--source", gone, "--retries", "1", "--dest", dest)
    res = cli(*args)
    assert res.code == 0, res.text
    assert "DIFFER" not in res.out
    assert "not compared" in res.out
    (entry,) = json.loads(cli(*args, "--json").out)
    assert entry["agree"] is None
    res = cli("status", "crashes", "--source", soda.url, "--dest", dest)
    assert ": agree" in res.out, res.out
    # the count answered but the metadata did not: the count is still compared
    soda.add_fault("body", times=None, match="/api/views", status=404, body='{"code":"x"}')
    got = cli("status", "crashes", "--json", "--source", soda.url, "--retries", "1", "--dest", dest)
    (entry,) = json.loads(got.out)
    assert entry["agree"] is True, entry
    assert entry["source_error"], entry


def test_compact_then_prune(soda: FakeSoda, tmp_path: Path) -> None:
    dest = tmp_path / "land"
    land(soda, str(dest), "crashes")
    for _ in range(2):
        soda.edit("h9gi-nx95", 20)
        soda.insert("h9gi-nx95", 20)
        update(soda, str(dest), "crashes")
    soda.delete("h9gi-nx95", 5)
    assert cli("reconcile", "crashes", "--source", soda.url, "--dest", str(dest)).code == 0
    res = cli("compact", "crashes", "--dest", str(dest))
    assert res.code == 0, res.text
    manifest = json.loads((dest / "crashes/manifest.json").read_text())
    assert [b["kind"] for b in manifest["batches"]][-1] == "snapshot"
    assert [b["kind"] for b in manifest["batches"]] == [
        "snapshot",
        "update",
        "update",
        "tombstones",
        "snapshot",
    ]
    exact(soda, str(dest), "crashes", tmp_path)
    res = cli("compact", "crashes", "--prune", "--grace", "0", "--dest", str(dest))
    assert res.code == 0, res.text
    manifest = json.loads((dest / "crashes/manifest.json").read_text())
    assert len(manifest["batches"]) == 1
    on_disk = {p.relative_to(dest).as_posix() for p in (dest / "crashes/data").rglob("*.csv")}
    assert on_disk == {f["path"] for f in manifest["batches"][0]["files"]}
    exact(soda, str(dest), "crashes", tmp_path)
    soda.edit("h9gi-nx95", 3)
    update(soda, str(dest), "crashes")
    exact(soda, str(dest), "crashes", tmp_path)


def test_a_day_of_deletions_only_lags_until_a_reconcile_lands_them(
    soda: FakeSoda, tmp_path: Path
) -> None:
    """A deletion moves the source's last change (`rowsUpdatedAt`) but no row's `:updated_at`,
    so the watermark never reaches it: the lag (status, the Lambda's LagSeconds behind its
    alarm) counts from when the landed state last matched the source's keys as well, and is
    0 once a reconcile has landed the deletion, not until some row is edited again. Edits past
    the watermark lag until an update lands them, a reconcile between or not."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)

    def lag() -> float:
        return float(json.loads(cli("status", "crashes", "--json", *where).out)[0]["lag_seconds"])

    land(soda, dest, "crashes")
    soda.edit("h9gi-nx95", 3)
    update(soda, dest, "crashes")
    time.sleep(2.1)  # the deletion comes whole seconds later, as `rowsUpdatedAt` counts them
    soda.delete("h9gi-nx95", 2)  # the publisher's only change of the day
    update(soda, dest, "crashes")
    assert lag() >= 1  # the update does not see deletions: the landed state is behind
    res = cli("reconcile", "crashes", *where)
    assert res.code == 0, res.text
    assert "vanished 2" in res.out, res.out
    exact(soda, dest, "crashes", tmp_path)
    assert lag() == 0
    # edits are a reconcile's to leave to the next update: they lag until it lands them
    time.sleep(1.1)
    soda.edit("h9gi-nx95", 5)
    time.sleep(1.1)
    res = cli("reconcile", "crashes", *where)
    assert res.code == 0, res.text
    assert lag() >= 1
    update(soda, dest, "crashes")
    assert lag() == 0


def test_status_shows_watermark_runs_and_lag(soda: FakeSoda, tmp_path: Path) -> None:
    dest = str(tmp_path / "land")
    land(soda, dest, "crashes")
    soda.edit("h9gi-nx95", 4)
    status = json.loads(
        cli("status", "crashes", "--json", "--source", soda.url, "--dest", dest).out
    )[0]
    assert status["lag_seconds"] > 0
    update(soda, dest, "crashes")
    status = json.loads(
        cli("status", "crashes", "--json", "--source", soda.url, "--dest", dest).out
    )[0]
    assert status["last_update"]["rows"] == 4
    assert status["watermark"]["row_id"]
    assert status["lag_seconds"] == 0
    assert status["agree"]
    text = cli("status", "crashes", "--source", soda.url, "--dest", dest).out
    assert "watermark" in text
    assert "last update" in text


def test_update_killed_mid_run_then_rerun_is_exact(tmp_path: Path) -> None:
    sizes = {"h9gi-nx95": 3000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    latency = Latency(base=0.04, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=9, latency=latency) as srv:
        dest = str(tmp_path / "land")
        land(srv, dest, "crashes")
        srv.replace("h9gi-nx95")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nyc_collisions.cli",
                "update",
                "crashes",
                "--source",
                srv.url,
                "--dest",
                dest,
                "--page-size",
                "100",
                "--file-rows",
                "200",
                "--workers",
                "1",  # the stream of changes, not a fresh snapshot (that is a backfill's resume)
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        manifest = Path(dest) / "crashes/manifest.json"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and b'"update"' not in manifest.read_bytes():
            time.sleep(0.05)
        # from its first commit on, every page of changes is held: the kill lands mid-run
        srv.add_fault("slow", times=None, match=":updated_at,:id", seconds=5)
        while time.monotonic() < deadline and not srv.stats()["faults"].get("slow"):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        srv.clear_faults()
        landed = json.loads(manifest.read_bytes())
        [batch] = [b for b in landed["batches"] if b["kind"] == "update"]
        assert 0 < batch["rows"] < 3000, "the kill did not land mid-run"
        res = cli("update", "crashes", "--source", srv.url, "--dest", dest)
        assert res.code == 0, res.text
        exact(srv, dest, "crashes", tmp_path)
        assert "total: 0 rows" in update(srv, dest, "crashes")


def test_a_refresh_killed_mid_run_resumes_and_is_exact(tmp_path: Path) -> None:
    """A full replace lands as a fresh snapshot; killed half way, the next update resumes it
    from its committed files (as a backfill does) and the state is exact."""
    sizes = {"h9gi-nx95": 3000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    latency = Latency(base=0.04, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=5, latency=latency) as srv:
        dest = str(tmp_path / "land")
        land(srv, dest, "crashes")
        srv.replace("h9gi-nx95")
        srv.insert("h9gi-nx95", 50)
        args = ["--source", srv.url, "--dest", dest, "--page-size", "100", "--file-rows", "200"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "nyc_collisions.cli", "update", "crashes", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        runs = Path(dest) / "crashes/runs"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(runs.rglob("parts/*"))) < 3:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert list(runs.rglob("parts/*")), "the refresh committed no file before the kill"
        res = cli("update", "crashes", *args)
        assert res.code == 0, res.text
        assert "landed a fresh snapshot" in res.out
        assert "resumed run " in res.out
        assert "%" not in res.err  # no progress bar where stderr is not a terminal
        manifest = json.loads((Path(dest) / "crashes/manifest.json").read_text())
        assert [b["kind"] for b in manifest["batches"]] == ["snapshot"]  # the first one retired
        exact(srv, dest, "crashes", tmp_path)
        assert "total: 0 rows" in update(srv, dest, "crashes")


def test_a_mixed_landing_and_a_skipped_backfill_say_what_is_there_now(
    soda: FakeSoda, tmp_path: Path
) -> None:
    """After an update in another format, status names both formats (it named the last one);
    a backfill skipped as landed gives the rows there now beside the snapshot's."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    land(soda, dest, "crashes")
    snapshot = len(soda.rows("h9gi-nx95"))
    soda.insert("h9gi-nx95", 20)
    res = cli("update", "crashes", "--format", "parquet", *where)
    assert res.code == 0, res.text
    status = json.loads(cli("status", "crashes", "--json", *where).out)[0]
    assert status["format"] == "csv, parquet"
    res = cli("backfill", "crashes", *where)
    assert res.code == 0, res.text
    assert f"({snapshot:,} rows, " in res.out, res.out
    assert f"; {snapshot + 20:,} rows now)" in res.out, res.out


def test_a_source_emptied_by_deletions_lags_until_the_reconcile(
    soda: FakeSoda, tmp_path: Path
) -> None:
    """Every row deleted at the source (no latest `:updated_at` at all): the reconcile that
    lands the deletions ends the lag."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)

    def status() -> dict[str, Any]:
        return dict(json.loads(cli("status", "crashes", "--json", *where).out)[0])

    land(soda, dest, "crashes")
    time.sleep(2.1)
    soda.delete("h9gi-nx95", len(soda.rows("h9gi-nx95")))
    assert status()["lag_seconds"] >= 1
    res = cli("reconcile", "crashes", *where)
    assert res.code == 0, res.text
    after = status()
    assert after["rows"] == 0, after
    assert after["agree"], after
    assert after["lag_seconds"] == 0, after


def test_an_update_resuming_a_stopped_snapshot_lands_the_rows_changed_since_it_began(
    tmp_path: Path,
) -> None:
    """An update that lands a fresh snapshot by resuming a stopped `backfill --force` holds the
    source as that run began; rows inserted since, with `:id`s below where its ranges had
    landed, are landed by the same update (found by a kill soak)."""
    sizes = {NAMES["crashes"]: 3000, NAMES["persons"]: 10, NAMES["vehicles"]: 10}
    latency = Latency(base=0.2, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=3, latency=latency) as srv:
        common = ["crashes", "--source", srv.url, "--page-size", "100", "--file-rows", "200"]
        # every row changed: the next update lands a snapshot (resuming the stopped one)
        dest = stopped_snapshot(srv, tmp_path, common, lambda: srv.replace(NAMES["crashes"]))
        # the source changes after that run began: inserted rows get `:id`s all over the range,
        # so some fall below where the stopped run's partitions have already landed
        srv.insert(NAMES["crashes"], 200)
        res = cli("update", *common, "--dest", str(dest))
        assert res.code == 0, res.text
        assert "landed a fresh snapshot" in res.out, res.out
        assert "resumed run" in res.out, res.out
        # the update exited 0: the current state must hold every row the source had when it began
        exact(srv, str(dest), "crashes", tmp_path)
