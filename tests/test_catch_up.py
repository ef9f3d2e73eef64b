"""An update whose fresh snapshot resumed a stopped run, then caught up with the rows changed
since that run began (`Update._catch_up`): counts, the summary, the table, a catch-up stopped,
new columns, and when it is left to the next update."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from nyc_collisions import incremental
from nyc_collisions.errors import Interrupted, RetriesStopped
from nyc_collisions.source import DatasetSource
from tests.fake_soda import FakeSoda, Latency
from tests.helpers import NAMES, cli, exact, stopped_snapshot

CRASHES = NAMES["crashes"]


def _stopped_snapshot(srv: FakeSoda, tmp_path: Path, common: list[str], *extra: str) -> Path:
    """A landed dataset whose every row then changed, and a `backfill --force` stopped after
    some committed files."""
    for budget in (0.8, 1.6, 3.2, 6.4):
        dest = tmp_path / f"land-{budget}"
        res = cli("backfill", *common, "--dest", str(dest), *extra)
        assert res.code == 0, res.text
        srv.replace(CRASHES)
        first = cli(
            "backfill", *common, "--force", "--dest", str(dest), "--max-seconds", str(budget),
            *extra,
        )  # fmt: skip
        assert first.code in (0, 3), first.text
        parts = list(dest.glob("crashes/runs/*/parts/*.json"))
        if first.code == 3 and sum(json.loads(p.read_bytes())["rows"] for p in parts):
            return dest
    raise AssertionError("no budget stopped the backfill after a committed file")


def _server() -> FakeSoda:
    sizes = {CRASHES: 3000, NAMES["persons"]: 10, NAMES["vehicles"]: 10}
    latency = Latency(base=0.2, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    return FakeSoda(sizes=sizes, seed=3, latency=latency)


COMMON = ["crashes", "--page-size", "100", "--file-rows", "200"]


def _status(srv: FakeSoda, dest: Path) -> dict[str, Any]:
    res = cli("status", "crashes", "--json", "--source", srv.url, "--dest", str(dest))
    assert res.code == 0, res.text
    return dict(json.loads(res.out)[0])


def _update_resumes_and_agrees(srv: FakeSoda, common: list[str], dest: Path, tmp: Path) -> str:
    """An update resumes the stopped run; then the landed state is the source's, and `status`
    counts its rows and agrees. Returns what the update printed."""
    res = cli("update", *common, "--dest", str(dest))
    assert res.code == 0, res.text
    assert "resumed run" in res.out, res.out
    exact(srv, str(dest), "crashes", tmp)
    st = _status(srv, dest)
    assert (st["rows"], st["agree"]) == (len(srv.rows(CRASHES)), True), st
    return res.out


def test_a_catch_up_lands_its_batch_and_says_so(tmp_path: Path) -> None:
    """Rows inserted and edited while the run was stopped: after the update the landed state
    is the source's and `status` agrees; the catch-up is a batch of changes, and the summary
    prints its watermark (the manifest's) and the rows it landed."""
    with _server() as srv:
        common = [*COMMON, "--source", srv.url]
        dest = _stopped_snapshot(srv, tmp_path, common)
        srv.insert(CRASHES, 200)
        srv.edit(CRASHES, 30)
        out = _update_resumes_and_agrees(srv, common, dest, tmp_path)
        manifest = json.loads((dest / "crashes/manifest.json").read_text())
        kinds = [b["kind"] for b in manifest["batches"]]
        assert kinds[-1] == "update", kinds
        wm = manifest["batches"][-1]["watermark"]
        assert f"watermark {wm['updated_at']} {wm.get('row_id') or ''}".rstrip() in out, out
        assert "rows changed since its run began" in out, out


def test_a_catch_up_stopped_is_finished_by_the_next_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catch-up stops (time budget) before its first page: the update says stopped and
    exits 3; the next update lands the rest, exactly."""
    real = incremental.Update._changes
    calls = {"n": 0}

    def changes(self: Any, landed: Any, watermark: Any, until: Any, fmt: Any, stop: Any,
                result: Any) -> None:  # fmt: skip
        calls["n"] += 1
        if calls["n"] == 1:  # the catch-up of the first update
            stop = threading.Event()
            stop.set()
        real(self, landed, watermark, until, fmt, stop, result)

    with _server() as srv:
        common = [*COMMON, "--source", srv.url]
        dest = _stopped_snapshot(srv, tmp_path, common)
        srv.insert(CRASHES, 200)
        monkeypatch.setattr(incremental.Update, "_changes", changes)
        res = cli("update", *common, "--dest", str(dest))
        assert calls["n"] == 1
        assert res.code == 3, res.text
        assert "stopped" in res.out, res.out
        monkeypatch.setattr(incremental.Update, "_changes", real)
        res = cli("update", *common, "--dest", str(dest))
        assert res.code == 0, res.text
        exact(srv, str(dest), "crashes", tmp_path)
        st = _status(srv, dest)
        assert (st["rows"], st["agree"]) == (len(srv.rows(CRASHES)), True), st


def test_the_table_holds_the_catch_up(tmp_path: Path) -> None:
    """With --table delta the table is synced after the catch-up: it equals the export."""
    pytest.importorskip("deltalake")
    from tests.test_table import assert_table_is_export

    with _server() as srv:
        common = [*COMMON, "--source", srv.url]
        dest = _stopped_snapshot(srv, tmp_path, common, "--table", "delta")
        srv.insert(CRASHES, 200)
        res = cli("update", *common, "--dest", str(dest), "--table", "delta")
        assert res.code == 0, res.text
        exact(srv, str(dest), "crashes", tmp_path)
        n = assert_table_is_export(str(dest), "crashes", tmp_path)
        assert n == len(srv.rows(CRASHES))


def _stopped_new_columns(srv: FakeSoda, tmp_path: Path, common: list[str]) -> Path:
    """A landed dataset, a column added, and the update landing it stopped after some
    committed files; then rows inserted."""
    for budget in (0.8, 1.6, 3.2, 6.4):
        dest = tmp_path / f"d-{budget}"
        assert cli("backfill", *common, "--dest", str(dest)).code == 0
        srv.add_column(CRASHES, f"extra_{str(budget).replace('.', '_')}", "text")
        first = cli("update", *common, "--dest", str(dest), "--max-seconds", str(budget))
        parts = list(dest.glob("crashes/runs/*/parts/*.json"))
        if first.code == 3 and sum(json.loads(p.read_bytes())["rows"] for p in parts):
            srv.insert(CRASHES, 200)
            return dest
    raise AssertionError("no budget stopped the update after a committed file")


def test_new_columns_resumed_then_caught_up(tmp_path: Path) -> None:
    """Drift: a stopped update landing new columns, rows inserted, the next update resumes the
    snapshot and catches up with the new schema."""
    with _server() as srv:
        common = [*COMMON, "--source", srv.url]
        dest = _stopped_new_columns(srv, tmp_path, common)
        _update_resumes_and_agrees(srv, common, dest, tmp_path)


@pytest.mark.parametrize("error", [RetriesStopped, Interrupted])
def test_a_stop_while_the_catch_up_asks_its_end_says_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    """The run's stop (its time budget, Ctrl-C) reaching the catch-up's side request for the
    latest `:updated_at`: the update did not reach its end, so it says so (exit 3, which the
    Lambda carries on; Ctrl-C its own status), not 'updated' with exit 0."""
    with _server() as srv:
        common = [*COMMON, "--source", srv.url]
        dest = _stopped_new_columns(srv, tmp_path, common)

        def stopping(self: DatasetSource) -> str | None:
            raise error(f"{srv.url}: not sent, the run is stopping")

        monkeypatch.setattr(DatasetSource, "max_updated_at", stopping)
        res = cli("update", *common, "--dest", str(dest))
        assert res.code != 0, (res.code, res.text)
        if error is RetriesStopped:
            assert res.code == 3, res.text
            assert "stopped" in res.out, res.text


def test_new_columns_land_though_the_latest_updated_at_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update that lands new columns with no run to resume needs no latest `:updated_at`:
    a failure of that side request (asked beside the metadata) does not fail it."""
    from nyc_collisions.errors import SourceUnavailable
    from nyc_collisions.source import DatasetSource

    with FakeSoda(sizes={CRASHES: 300, NAMES["persons"]: 10, NAMES["vehicles"]: 10}, seed=4) as srv:
        common = ["crashes", "--source", srv.url, "--page-size", "100"]
        dest = tmp_path / "land"
        assert cli("backfill", *common, "--dest", str(dest)).code == 0
        srv.add_column(CRASHES, "extra_note", "text")
        calls = {"n": 0}

        def failing(self: DatasetSource) -> str | None:
            calls["n"] += 1
            raise SourceUnavailable("the source kept failing: 503 (max :updated_at)")

        monkeypatch.setattr(DatasetSource, "max_updated_at", failing)
        res = cli("update", *common, "--dest", str(dest))
        manifest = json.loads((dest / "crashes/manifest.json").read_text())
        assert [b["kind"] for b in manifest["batches"]] == ["snapshot"]
        assert res.code == 0, (res.code, res.text)
        assert "landed a fresh snapshot with the new columns" in res.out, res.out


def test_a_catch_up_of_a_second_full_replace_keeps_the_refresh_share(tmp_path: Path) -> None:
    """A full replace while the stopped run waited: the rows changed since pass the share an
    update lands as changes (`_refresh_instead`: readers hold later batches' keys in memory),
    so the catch-up leaves them to the next update, which lands a fresh snapshot."""
    with _server() as srv:
        common = [*COMMON, "--source", srv.url]
        dest = _stopped_snapshot(srv, tmp_path, common)
        srv.replace(CRASHES)  # the publisher replaces everything again meanwhile
        res = cli("update", *common, "--dest", str(dest))
        assert res.code == 0, res.text
        manifest = json.loads((dest / "crashes/manifest.json").read_text())
        snapshot, *later = [b for b in manifest["batches"] if not b.get("retired")]
        assert snapshot["kind"] == "snapshot"
        since = sum(b["rows"] for b in later)
        assert since <= incremental.REFRESH_SHARE * snapshot["rows"], (
            since,
            snapshot["rows"],
            res.out,
        )
        # left to the next update, which lands a fresh snapshot for them
        res = cli("update", *common, "--dest", str(dest))
        assert res.code == 0, res.text
        exact(srv, str(dest), "crashes", tmp_path)


def test_a_reconcile_whose_new_columns_resumed_a_stopped_snapshot_still_finds_deletions(
    tmp_path: Path,
) -> None:
    """A reconcile that finds new columns lands a fresh snapshot, which may resume a stopped
    `backfill --force` begun before rows were deleted: it then compares keys as any reconcile
    does, so that it ends with what it claims (the deletions since that run began found)."""
    sizes = {NAMES["crashes"]: 3000, NAMES["persons"]: 10, NAMES["vehicles"]: 10}
    latency = Latency(base=0.2, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=5, latency=latency) as srv:
        common = ["crashes", "--source", srv.url, "--page-size", "100", "--file-rows", "200"]
        # the stopped snapshot is in the new columns; each try lands the old ones first
        dest = stopped_snapshot(
            srv,
            tmp_path,
            common,
            change=lambda: srv.add_column(NAMES["crashes"], "weather", "text"),
            before=lambda: srv.drop_column(NAMES["crashes"], "weather"),
        )
        srv.delete(NAMES["crashes"], 300)  # some of them in ranges the stopped run landed
        res = cli("reconcile", "crashes", "--source", srv.url, "--dest", str(dest))
        assert res.code == 0, res.text
        assert "resumed run" in res.out, res.out
        check = cli("verify", "crashes", "--source", srv.url, "--dest", str(dest))
        assert check.code == 0, check.text
