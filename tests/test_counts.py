"""The current state's row count the manifest records (what `status` reports, see counts.py)
stays the source's through updates that stop midway and keys deleted and inserted again."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.fake_soda import FakeSoda
from tests.helpers import NAMES, cli, exact, paced_crashes

CRASHES = NAMES["crashes"]


def run(*args: str, code: int = 0) -> str:
    res = cli(*args)
    assert res.code == code, res.text
    return res.out


def status(srv: FakeSoda, dest: str, name: str) -> dict[str, Any]:
    doc = json.loads(run("status", name, "--json", "--source", srv.url, "--dest", dest))
    return dict(doc[0])


def manifest(dest: str) -> dict[str, Any]:
    return dict(json.loads((Path(dest) / "crashes/manifest.json").read_text()))


class _FirstDraw:
    """The fake server's generator, but its first `integers` draw is `first` (so that an insert
    makes the key chosen)."""

    def __init__(self, real: Any, first: np.ndarray) -> None:
        self.real = real
        self.first: np.ndarray | None = first

    def integers(self, *args: Any, **kw: Any) -> Any:
        if self.first is not None:
            out, self.first = self.first, None
            return out
        return self.real.integers(*args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def insert_again(srv: FakeSoda, dataset_id: str, key: int) -> dict[str, Any]:
    """Insert one row with the key `key` (one deleted before: a new :id and :created_at)."""
    registry = srv._registry
    first = int(registry.snapshot(dataset_id).key.max())
    real = registry._rng
    registry._rng = _FirstDraw(real, np.array([key - first], np.int64))
    try:
        return registry.insert(dataset_id, 1)
    finally:
        registry._rng = real


def test_a_key_deleted_and_inserted_again_is_counted_once_after_a_reconcile(
    soda: FakeSoda, tmp_path: Path
) -> None:
    """A publisher deletes a row and adds it again with its key (a new :id and :created_at): the
    update lands the new version, which replaces the old one in the current state, but counts it
    as a new key (telling would cost a read of every landed key). The next reconcile, finding
    nothing to repair, records the count it made, and status agrees again."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    run("backfill", "crashes", *where, "--page-size", "800")
    (key,) = soda.delete(CRASHES, 1)["keys"]
    assert insert_again(soda, CRASHES, int(key))["keys"] == [int(key)]
    run("update", "crashes", *where)
    exact(soda, dest, "crashes", tmp_path)  # one version of the key
    run("reconcile", "crashes", *where)
    st = status(soda, dest, "crashes")
    assert st["rows"] == len(soda.rows(CRASHES)), st
    assert st["agree"], st


def test_rows_the_snapshot_got_ahead_are_not_counted_again_after_a_stopped_update(
    tmp_path: Path,
) -> None:
    """Rows inserted (one :updated_at) while a backfill ran, some of them in its snapshot; the
    update that lands them stops within that :updated_at, and the next lands the rest: the rows
    the snapshot already held are not new."""
    with paced_crashes() as srv:
        dest = str(tmp_path / "land")
        where = ("--source", srv.url, "--dest", dest)
        paged = ("--page-size", "100", "--file-rows", "100")
        run("backfill", "crashes", *where, *paged, "--max-seconds", "0.6", code=3)
        srv.insert(CRASHES, 600)  # one :updated_at; some of them land in the resumed snapshot
        run("backfill", "crashes", *where, *paged)
        ahead = manifest(dest)["batches"][0]["rows"] - 3000
        assert 0 < ahead < 600, ahead
        # the first budget that stops an update within the inserted rows, however fast this is
        for budget in ("0.3", "0.6", "1.2", "2.4"):
            res = cli(
                "update", "crashes", *where, "--workers", "1", "--page-size", "50",
                "--file-rows", "50", "--max-seconds", budget,
            )  # fmt: skip
            assert res.code in (0, 3), res.text
            if res.code == 3 and manifest(dest)["batches"][-1]["kind"] == "update":
                break
        assert manifest(dest)["batches"][-1]["watermark"]["row_id"] is not None
        run("update", "crashes", *where, "--workers", "1")
        exact(srv, dest, "crashes", tmp_path)
        st = status(srv, dest, "crashes")
        assert st["rows"] == len(srv.rows(CRASHES)), st


def edit_ids(srv: FakeSoda, dataset_id: str, ids: list[str]) -> dict[str, Any]:
    """Edit exactly the rows with these `:id`s (one new `:updated_at`), as a publisher would."""
    registry = srv._registry
    snap = registry.snapshot(dataset_id)
    slots = np.sort(np.array([int(np.flatnonzero(snap.sid == i.encode())[0]) for i in ids]))
    real = registry._pick
    registry._pick = lambda _snap, _n: slots  # type: ignore[method-assign]
    try:
        return registry.edit(dataset_id, len(slots))
    finally:
        registry._pick = real  # type: ignore[method-assign]


@contextlib.contextmanager
def on_changes_page(n: int, act: Any, mp: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A context in which `act()` runs when an update asks for its `n`th page of changes."""
    from nyc_collisions.source import DatasetSource

    real = DatasetSource.changes_params
    calls = 0

    def params(self: DatasetSource, **kw: Any) -> dict[str, str]:
        nonlocal calls
        calls += 1
        if calls == n:
            act()
        return real(self, **kw)

    with mp.context() as m:
        m.setattr(DatasetSource, "changes_params", params)
        yield m


def update_stopped_after_a_page(where: tuple[str, ...], mp: pytest.MonkeyPatch) -> None:
    """An update whose time budget runs out once its first page of changes is committed."""
    from nyc_collisions.job import RunOptions

    late = False

    def run_out() -> None:
        nonlocal late
        late = True

    with on_changes_page(2, run_out, mp) as m:
        m.setattr(RunOptions, "out_of_time", lambda self: late)
        res = cli("update", "crashes", *where, "--page-size", "50", "--file-rows", "50")
    assert res.code in (0, 3), res.text


def update_skipping_a_new_row(
    soda: FakeSoda, where: tuple[str, ...], mp: pytest.MonkeyPatch, also: Any = None
) -> None:
    """Backfill, then an update while which a row inserted past the watermark is edited (with
    `also()`): the update ends past the row's `:created_at` without it."""
    run("backfill", "crashes", *where)
    soda.edit(CRASHES, 100)  # older changes, paged first
    (new_id,) = soda.insert(CRASHES, 1)["ids"]
    soda.insert(CRASHES, 10)  # later changes: the update's watermark ends past the new row

    def edit() -> None:
        if also is not None:
            also()
        edit_ids(soda, CRASHES, [new_id])

    with on_changes_page(2, edit, mp):
        run("update", "crashes", *where, "--page-size", "50")


def agrees(soda: FakeSoda, dest: str, tmp_path: Path) -> None:
    exact(soda, dest, "crashes", tmp_path)
    st = status(soda, dest, "crashes")
    assert (st["rows"], st["agree"]) == (len(soda.rows(CRASHES)), True), st


def test_a_new_row_edited_while_an_update_runs_is_counted(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next update lands the row the last one skipped: it is new to the current state,
    though created before the next update's mark."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    update_skipping_a_new_row(soda, where, monkeypatch)
    run("update", "crashes", *where, "--page-size", "50")
    agrees(soda, dest, tmp_path)


def test_a_skipped_new_row_is_counted_after_a_stopped_update(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update stopped before the skipped row comes between: the one after it lands the row."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    update_skipping_a_new_row(soda, where, monkeypatch, also=lambda: soda.edit(CRASHES, 60))
    update_stopped_after_a_page(where, monkeypatch)
    kinds = [b["kind"] for b in manifest(dest)["batches"]]
    assert kinds == ["snapshot", "update", "update"], kinds
    run("update", "crashes", *where, "--page-size", "50")
    agrees(soda, dest, tmp_path)


def test_a_skipped_new_row_is_counted_after_a_compaction(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction comes between (the update that skipped the row is then in the compacted
    snapshot): the next update lands the row."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    update_skipping_a_new_row(soda, where, monkeypatch)
    run("compact", "crashes", "--dest", dest)
    run("update", "crashes", *where, "--page-size", "50")
    agrees(soda, dest, tmp_path)


def _landed_ids(dest: str, batch: dict[str, Any]) -> list[str]:
    import pyarrow.csv as pcsv

    return [
        i
        for f in batch["files"]
        for i in pcsv.read_csv(Path(dest) / f["path"]).column("socrata_id").to_pylist()
    ]


@pytest.mark.parametrize("stopped", [1, 2])
def test_rows_stopped_updates_landed_at_their_mark_are_not_counted_again(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped: int
) -> None:
    """600 rows inserted at one `:updated_at` T; one or two updates in a row stop within T
    (watermark T and a row id), the next lands the rest; three rows the first stopped update
    landed are then edited, and the update after lands them: created at T, where the window
    starts, and landed already."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    run("backfill", "crashes", *where)
    soda.insert(CRASHES, 600)
    marks = []
    for _ in range(stopped):
        update_stopped_after_a_page(where, monkeypatch)
        marks.append(manifest(dest)["batches"][-1])
    first = marks[0]
    assert (first["kind"], first["rows"]) == ("update", 50), first
    assert {m["watermark"]["updated_at"] for m in marks} == {first["watermark"]["updated_at"]}
    assert first["watermark"]["row_id"] is not None
    soda.edit(CRASHES, 5)  # the next update ends past T
    run("update", "crashes", *where)
    assert manifest(dest)["batches"][-1]["info"]["done"] is True
    edit_ids(soda, CRASHES, _landed_ids(dest, first)[:3])
    run("update", "crashes", *where)
    agrees(soda, dest, tmp_path)


def test_a_row_the_snapshot_got_ahead_and_the_first_update_skipped_is_not_counted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row inserted while the backfill ran (the snapshot holds it), then edited while the
    first update ran (which skips it): the second update lands it again, and it is not new."""
    from nyc_collisions.source import DatasetSource

    sizes = {CRASHES: 2000, NAMES["persons"]: 10, NAMES["vehicles"]: 10}
    with FakeSoda(sizes=sizes, seed=4) as srv:
        dest = str(tmp_path / "land")
        where = ("--source", srv.url, "--dest", dest)
        inserted: list[str] = []
        pages = DatasetSource.page_params

        def page_params(self: DatasetSource, **kw: Any) -> dict[str, str]:
            if not inserted:  # the count is taken: changes come while the backfill runs
                srv.edit(CRASHES, 100)  # (paged by the first update before the new row)
                inserted.extend(srv.insert(CRASHES, 1)["ids"])
            return pages(self, **kw)

        with monkeypatch.context() as backfilling:
            backfilling.setattr(DatasetSource, "page_params", page_params)
            run("backfill", "crashes", *where, "--workers", "1")
        srv.edit(CRASHES, 10)  # later changes: the first update's watermark ends past the row
        changes = DatasetSource.changes_params
        calls = 0

        def changes_params(self: DatasetSource, **kw: Any) -> dict[str, str]:
            nonlocal calls
            calls += 1
            if calls == 2:
                edit_ids(srv, CRASHES, inserted)
            return changes(self, **kw)

        with monkeypatch.context() as updating:
            updating.setattr(DatasetSource, "changes_params", changes_params)
            run("update", "crashes", *where, "--page-size", "50")
        run("update", "crashes", *where, "--page-size", "50")
        exact(srv, dest, "crashes", tmp_path)
        st = status(srv, dest, "crashes")
        assert (st["rows"], st["agree"]) == (len(srv.rows(CRASHES)), True), st


@pytest.mark.parametrize("prune", [False, True])
def test_skipped_row_counted_after_compaction_then_a_stopped_update(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prune: bool
) -> None:
    """An update skips a new row; a compaction records `recent_since`; the next update stops
    before the row (it lands other changes first); the one after lands the row: it is new."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    update_skipping_a_new_row(soda, where, monkeypatch, also=lambda: soda.edit(CRASHES, 60))
    run("compact", "crashes", "--dest", dest, *(("--prune", "--grace", "0") if prune else ()))
    update_stopped_after_a_page(where, monkeypatch)
    kinds = [b["kind"] for b in manifest(dest)["batches"]]
    assert kinds[-2:] == ["snapshot", "update"], kinds
    assert manifest(dest)["batches"][-1]["info"]["done"] is False
    run("update", "crashes", *where, "--page-size", "50")
    agrees(soda, dest, tmp_path)


def test_an_update_that_got_to_its_end_records_done_when_its_rows_fill_its_last_file(
    soda: FakeSoda, tmp_path: Path
) -> None:
    """50 changes, `--file-rows 50`: the last file is committed by the rotation (done False),
    and the end's commit finds no open file: the batch must still say it got to its end."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    run("backfill", "crashes", *where)
    soda.edit(CRASHES, 50)
    run("update", "crashes", *where, "--file-rows", "50")
    last = manifest(dest)["batches"][-1]
    assert (last["kind"], last["rows"]) == ("update", 50), last
    assert last["info"]["done"] is True, last["info"]


def _count_full_reads(mp: pytest.MonkeyPatch) -> list[int]:
    """Each call of `NewRows._resolve` (a read of every landed key): the number of keys."""
    from nyc_collisions.counts import NewRows

    calls: list[int] = []
    real = NewRows._resolve

    def spy(self: NewRows, keys: object) -> int:
        calls.append(len(keys))  # type: ignore[arg-type]
        return real(self, keys)  # type: ignore[arg-type]

    mp.setattr(NewRows, "_resolve", spy)
    return calls


def test_a_daily_update_does_not_read_every_landed_key_when_yesterdays_new_rows_are_edited(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ordinary daily flow: yesterday's publish inserted new crashes (one `:updated_at` T,
    created at T) and yesterday's update landed them, ending at T; today some of them are
    edited. Where they are is known (yesterday's update, in the recent window), yet today's
    update reads every landed key (`_resolve`) to count them."""
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    run("backfill", "crashes", *where)
    run("update", "crashes", *where)  # a first daily update (the snapshot's ahead is behind)
    soda.edit(CRASHES, 20)  # day 1: edits, then the day's new crashes, published last
    new = soda.insert(CRASHES, 10)["ids"]
    run("update", "crashes", *where)
    last = manifest(dest)["batches"][-1]
    assert set(_landed_ids(dest, last)) >= set(new)
    edit_ids(soda, CRASHES, new[:2])  # day 2: two of yesterday's new crashes are edited
    reads = _count_full_reads(monkeypatch)
    run("update", "crashes", *where)
    agrees(soda, dest, tmp_path)
    assert reads == [], f"read every landed key to count {reads} rows"
