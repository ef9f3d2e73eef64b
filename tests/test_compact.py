"""Compaction and its grace, and a fresh snapshot resumed after later commits: nothing deleted at
the source comes back, and what `status` says of the last match with the source survives."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.fake_soda import FakeSoda
from tests.helpers import NAMES, assert_exact, cli, columns, paced_crashes, read_export

CRASHES = NAMES["crashes"]


def run(*args: str) -> str:
    res = cli(*args)
    assert res.code == 0, res.text
    return res.out


def _named(dest: str) -> set[str]:
    doc = json.loads((Path(dest) / "crashes/manifest.json").read_text())
    return {f["path"] for b in doc["batches"] for f in b["files"]}


def _on_disk(dest: str) -> set[str]:
    root = Path(dest)
    return {p.relative_to(root).as_posix() for p in (root / "crashes/data").rglob("*.csv")}


def _fetched(runs: Path) -> int:
    """Rows in the finished files of the unfinished snapshot runs under `runs`."""
    return sum(json.loads(p.read_text())["rows"] for p in runs.glob("*/parts/*.json"))


def _stopped_midway(srv: FakeSoda, args: tuple[str, ...], runs: Path) -> int:
    """Run `args` under growing budgets until it stops (exit 3) with 200 rows or more of its
    snapshot fetched: those rows. Meanwhile each page takes 0.2 s more, so that no budget lets
    the run end, however fast the machine (2,400 rows at most in 2 s, on 3 slots)."""
    srv.add_fault("slow", times=None, match="$order", seconds=0.2)
    try:
        for budget in ("0.5", "0.5", "1", "1", "2"):
            res = cli(*args, "--max-seconds", budget)
            assert res.code == 3, res.text
            if _fetched(runs) >= 200:
                break
    finally:
        srv.clear_faults()
    return _fetched(runs)


def _export_is_exact(srv: FakeSoda, dest: str, out: Path) -> None:
    run("export", "crashes", "--dest", dest, "-o", str(out))
    want = columns(srv.url, CRASHES)
    assert_exact(srv.rows(CRASHES), read_export(out), want, "collision_id")


@contextlib.contextmanager
def backfilled(
    tmp_path: Path,
) -> Iterator[tuple[FakeSoda, str, tuple[str, ...], tuple[str, ...], Path]]:
    """The paced crashes server, landed in small pages and files: the server, the destination,
    its `--source/--dest` flags, the paging flags, and the folder of its runs' records."""
    with paced_crashes() as srv:
        dest = str(tmp_path / "land")
        where = ("--source", srv.url, "--dest", dest)
        paged = ("--page-size", "100", "--file-rows", "100")
        run("backfill", "crashes", *where, *paged)
        yield srv, dest, where, paged, Path(dest) / "crashes/runs"


def test_a_refresh_begun_before_a_reconcile_is_not_resumed_after_it(tmp_path: Path) -> None:
    """An update's fresh snapshot stops midway, its run left to resume. A compaction resets the
    rows landed since the snapshot, so the next updates do not refresh; rows are deleted at the
    source and a reconcile tombstones them. When a refresh comes again it must not resume the
    old run: its rows were fetched before the deletions, and as the newest snapshot it would
    bring them back."""
    with backfilled(tmp_path) as (srv, dest, where, paged, runs):
        srv.edit(CRASHES, 1000)
        run("update", "crashes", *where, *paged)  # 1,000 landed since the snapshot
        srv.edit(CRASHES, 700)  # 700 + 1,000 > half of 3,000: a refresh, stopped by the budget
        assert _stopped_midway(srv, ("update", "crashes", *where, *paged), runs) >= 200
        assert len(list(runs.glob("*/plan.json"))) == 1
        run("compact", "crashes", "--prune", "--grace", "0", "--dest", dest)
        srv.delete(CRASHES, 300)
        assert "vanished 300" in run("reconcile", "crashes", *where)
        run("update", "crashes", *where, *paged)  # 700 <= 1,500 after the compaction
        _export_is_exact(srv, dest, tmp_path / "after-reconcile.csv")
        srv.edit(CRASHES, 1600)  # a refresh again
        run("update", "crashes", *where, *paged)
        _export_is_exact(srv, dest, tmp_path / "after-refresh.csv")


def test_a_stopped_forced_backfill_resumes_across_an_update(tmp_path: Path) -> None:
    """A `backfill --force` stops; the daily update commits a batch; the rerun resumes the
    stopped run (its watermark is where it began, so the next update fetches again what changed
    meanwhile) rather than start over, which in chunks between daily updates would never end."""
    with backfilled(tmp_path) as (srv, dest, where, paged, runs):
        _stopped_midway(srv, ("backfill", "crashes", "--force", *where, *paged), runs)
        (plan,) = runs.glob("*/plan.json")
        srv.edit(CRASHES, 10)
        run("update", "crashes", *where)
        out = run("backfill", "crashes", "--force", *where, *paged)
        assert f"resumed run {plan.parent.name}" in out, out
        run("update", "crashes", *where)
        _export_is_exact(srv, dest, tmp_path / "out.csv")


def test_prune_keeps_when_the_data_last_matched_the_source(soda: FakeSoda, tmp_path: Path) -> None:
    """The backfill's snapshot counts as reconciled as of its start; `compact --prune` drops
    that snapshot, and the time must stay (or the daily run reconciles when it is not due)."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    run("backfill", "crashes", *where)
    soda.edit(CRASHES, 10)
    run("update", "crashes", *where)

    def last_reconciled() -> Any:
        (entry,) = json.loads(run("status", "crashes", "--json", *where))
        return entry["last_reconciled"]

    before = last_reconciled()
    assert before
    run("compact", "crashes", "--prune", "--grace", "0", "--dest", dest)
    assert last_reconciled() == before


def test_the_grace_never_ends_early() -> None:
    """The time a retired file may go is rounded up to the manifest's whole seconds."""
    from nyc_collisions.tidy import retire_after

    for _ in range(5):
        start = time.time()
        until = datetime.strptime(retire_after(0.9 / 3600), "%Y-%m-%dT%H:%M:%SZ")
        assert until.replace(tzinfo=UTC).timestamp() >= start + 0.9
        time.sleep(0.13)


def test_a_grace_that_is_not_a_number_is_refused(soda: FakeSoda, tmp_path: Path) -> None:
    """`--grace nan` passed click's range and meant "delete now": every superseded file went at
    once, with exit 0."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    run("backfill", "crashes", *where)
    soda.edit(CRASHES, 10)
    run("update", "crashes", *where)
    old = _named(dest)
    res = cli("compact", "crashes", "--prune", "--grace", "nan", "--dest", dest)
    assert res.code == 2, res.text
    assert len(res.err.strip().splitlines()) == 1, res.err
    assert old <= _on_disk(dest)
