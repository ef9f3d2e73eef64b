"""A backfill against sources that serve 1 to 16 requests at once, with default flags: exact,
ranges split where workers would idle, never more requests in flight than allowed, and a run
killed right after a split resumes exactly. Nothing here depends on how fast the machine is:
splits are read from the landed plan, requests in flight from the fake server's stats."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from nyc_collisions.sink.storage import open_storage
from tests.fake_soda import FakeSoda, Latency
from tests.helpers import cli, exact

ROWS = 20_000
SIZES = {"h9gi-nx95": ROWS, "f55k-p6yu": 10, "bm4k-52h4": 10}


def latency(capacity: int, per_row: float = 1e-4) -> Latency:
    # pages stream at 10,000 rows a second per slot, as in the bench's model, but each request
    # costs 20 ms instead of 150 (fast tests)
    return Latency(base=0.02, per_row=per_row, per_skipped=0.0, max_concurrent=capacity)


def manifest(dest: str) -> dict[str, Any]:
    data = open_storage(dest).get_bytes("crashes/manifest.json")
    assert data is not None
    doc: dict[str, Any] = orjson.loads(data)
    return doc


@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_backfill_is_exact_whatever_the_source_serves(
    dest: str, tmp_path: Path, capacity: int
) -> None:
    with FakeSoda(sizes=SIZES, seed=capacity, latency=latency(capacity)) as srv:
        res = cli("backfill", "crashes", "--source", srv.url, "--dest", dest, "--page-size", "5000")
        assert res.code == 0, res.text
        assert "concurrency:" in res.out
        assert srv.stats()["peak_in_flight"] <= 8
        exact(srv, dest, "crashes", tmp_path)


@pytest.mark.parametrize("cut", [None, 1000], ids=["whole", "page_cut_short"])
def test_a_run_costs_one_request_before_its_pages_and_one_after_its_rows(
    dest: str, tmp_path: Path, cut: int | None
) -> None:
    """On a source that serves one request at a time every request is a round trip of the run:
    the count and the latest `:updated_at` come in one request, and the range ends at a count
    after its short last page, with no empty page asked. A page cut short (well formed) is not
    taken for the end: the count finds the rows after it."""
    sizes = {"h9gi-nx95": 3000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    with FakeSoda(sizes=sizes, seed=5, latency=latency(1)) as srv:
        if cut is not None:
            srv.add_fault("truncate_rows", match="$order", after_rows=cut)
        res = cli("backfill", "crashes", "--source", srv.url, "--dest", dest)
        assert res.code == 0, res.text
        data = [r for r in srv.requests() if r["kind"] == "data"]
        pages = [i for i, r in enumerate(data) if r["params"].get("$select", "").startswith("*")]
        assert pages[0] == 1  # one request before the first page
        assert all(data[i]["rows"] > 0 for i in pages)  # no page asked only to find nothing
        exact(srv, dest, "crashes", tmp_path)


@pytest.mark.parametrize("command", ["backfill", "update"])
def test_the_first_aggregate_goes_beside_the_metadata(
    dest: str, tmp_path: Path, command: str
) -> None:
    """A run needs the metadata (its columns) and an aggregate (a backfill's count, an update's
    latest `:updated_at`) before its first page; neither needs the other, so they are asked at
    once and the metadata's round trip (held 2 s here) is not one of the run's."""
    sizes = {"h9gi-nx95": 3000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    with FakeSoda(sizes=sizes, seed=5) as srv:
        args = ["crashes", "--source", srv.url, "--dest", dest]
        if command == "update":
            assert cli("backfill", *args).code == 0
            srv.insert("h9gi-nx95", 5)
            srv.reset_stats()
        srv.add_fault("slow", match="/api/views/", seconds=2.0)
        res = cli(command, *args)
        assert res.code == 0, res.text
        log = srv.requests()
        meta = next(r for r in log if r["kind"] == "metadata")
        first = next(r for r in log if r["kind"] == "data")
        assert first["fault"] is None
        assert meta["fault"] == "slow"
        # the aggregate was asked before the metadata was answered
        assert first["time"] - first["seconds"] < meta["time"]
        exact(srv, dest, "crashes", tmp_path)


def test_a_range_asks_for_its_last_rows_in_one_page_the_top_one_too(
    dest: str, tmp_path: Path
) -> None:
    """Two ranges of 3,000 rows, pages of 2,500: each asks for all its rows at once (one first
    byte less), the top one (no upper bound) as the other; the top one then ends at a count."""
    sizes = {"h9gi-nx95": 6000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    with FakeSoda(sizes=sizes, seed=5, latency=latency(2)) as srv:
        args = ["--source", srv.url, "--dest", dest, "--page-size", "2500", "--workers", "2"]
        res = cli("backfill", "crashes", *args)  # two workers: no split
        assert res.code == 0, res.text
        assert manifest(dest)["batches"][0]["info"]["partitions"] == 2
        pages = [r for r in srv.requests() if r["params"].get("$select", "").startswith("*")]
        assert [r["rows"] for r in pages] == [3000, 3000]
        exact(srv, dest, "crashes", tmp_path)


def test_idle_workers_split_the_largest_range(dest: str, tmp_path: Path) -> None:
    """Four partitions of 5,000 rows for eight workers: the idle ones split ranges (recorded in
    the plan, so the manifest says how many), and the landing is exact. Rows stream slowly
    next to a first byte, so that even a busy machine finds them worth a split."""
    with FakeSoda(sizes=SIZES, seed=4, latency=latency(8, per_row=4e-4)) as srv:
        res = cli(
            "backfill",
            "crashes",
            "--source",
            srv.url,
            "--dest",
            dest,
            "--page-size",
            "5000",
            "--workers",
            "8",
        )
        assert res.code == 0, res.text
        info = manifest(dest)["batches"][0]["info"]
        assert info["planned"] == 4
        assert info["splits"] >= 1
        assert info["partitions"] == info["planned"] + info["splits"]
        files = manifest(dest)["batches"][0]["files"]
        parts = {int(f["path"].rsplit("/part-", 1)[1][:4]) for f in files}
        assert max(parts) >= info["planned"]  # files of partitions made by splits
        exact(srv, dest, "crashes", tmp_path)


def test_bounded_ranges_end_at_their_upper_row_without_a_count(tmp_path: Path) -> None:
    """Only the last range (no upper bound) needs an empty page and a count to end; the others
    end when their upper row is landed, so the tail does not wait on counts."""
    with FakeSoda(sizes=SIZES, seed=5, latency=latency(3)) as srv:
        dest = str(tmp_path / "land")
        res = cli("backfill", "crashes", "--source", srv.url, "--dest", dest, "--page-size", "3000")
        assert res.code == 0, res.text
        counts = [
            r["params"].get("$where")
            for r in srv.requests()
            if "count(*)" in r["params"].get("$select", "")
        ]
        assert counts[0] is None  # the dataset's count, at the start
        assert counts[1:], "the last range's end was not confirmed by a count"
        assert all(":id <=" not in (w or "") for w in counts)
        exact(srv, dest, "crashes", tmp_path)


@pytest.mark.parametrize(
    ("flags", "most"),
    [([], 8), (["--max-concurrency", "3"], 3), (["--workers", "2"], 2)],
    ids=["default", "max-concurrency", "workers"],
)
def test_requests_in_flight_never_exceed_the_ceiling(
    tmp_path: Path, flags: list[str], most: int
) -> None:
    """A source that would serve 16 at once gets at most the polite ceiling (default 8), the
    ceiling given, or exactly what --workers says."""
    with FakeSoda(sizes=SIZES, seed=6, latency=latency(16)) as srv:
        dest = str(tmp_path / "land")
        args = ["--source", srv.url, "--dest", dest, "--page-size", "1000", *flags]
        res = cli("backfill", "crashes", *args)
        assert res.code == 0, res.text
        assert 1 <= srv.stats()["peak_in_flight"] <= most
        exact(srv, dest, "crashes", tmp_path)


def test_max_concurrency_from_the_environment_and_bad_values(tmp_path: Path) -> None:
    with FakeSoda(sizes=SIZES, seed=7, latency=latency(16)) as srv:
        dest = str(tmp_path / "land")
        args = ["backfill", "crashes", "--source", srv.url, "--dest", dest, "--page-size", "2000"]
        res = cli(*args, env={"NYC_COLLISIONS_MAX_CONCURRENCY": "2"})
        assert res.code == 0, res.text
        assert srv.stats()["peak_in_flight"] <= 2
    for bad, env in [
        (["--max-concurrency", "0"], {}),
        (["--workers", "2", "--max-concurrency", "4"], {}),
        ([], {"NYC_COLLISIONS_MAX_CONCURRENCY": "many"}),
    ]:
        res = cli("backfill", "crashes", "--dest", str(tmp_path / "x"), *bad, env=env)
        assert res.code == 2, res.text
        assert res.err.startswith("nyc-collisions: error: "), res.err
        assert len(res.err.strip().splitlines()) == 1, res.err
        assert "Traceback" not in res.err


def test_a_run_killed_right_after_a_split_resumes_exactly(tmp_path: Path) -> None:
    """SIGKILL as soon as the plan records a split; the rerun goes on from the plan (both halves
    of the split range) and lands every row once."""
    with FakeSoda(sizes=SIZES, seed=8, latency=latency(8, per_row=4e-4)) as srv:
        dest = tmp_path / "land"
        args = ["--source", srv.url, "--dest", str(dest), "--page-size", "5000"]
        args += ["--file-rows", "1000", "--workers", "8"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "nyc_collisions.cli", "backfill", "crashes", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        split = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not split:
            for plan in dest.glob("crashes/runs/*/plan.json"):
                with contextlib.suppress(ValueError):  # being written
                    split = json.loads(plan.read_text()).get("splits", 0) >= 1
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert split, "no split was recorded before the run ended"
        assert not (dest / "crashes/manifest.json").exists()
        res = cli("backfill", "crashes", *args)
        assert res.code == 0, res.text
        assert "resumed run" in res.out
        assert manifest(str(dest))["batches"][0]["info"]["splits"] >= 1
        exact(srv, str(dest), "crashes", tmp_path)


@pytest.mark.parametrize(
    ("flags", "most"),
    [([], 8), (["--max-concurrency", "2"], 2), (["--workers", "1"], 1)],
    ids=["default", "max-concurrency", "workers"],
)
def test_key_scans_keep_to_the_ceiling_too(tmp_path: Path, flags: list[str], most: int) -> None:
    """verify and reconcile scan keys over partitions: as many requests at once as a backfill
    may send, never more (a source that would serve 16 gets the ceiling), and they still find a
    deletion."""
    with FakeSoda(sizes=SIZES, seed=8, latency=latency(16)) as srv:
        dest = str(tmp_path / "land")
        where = ["--source", srv.url, "--dest", dest]
        assert cli("backfill", "crashes", *where, "--page-size", "1000").code == 0
        srv.delete("h9gi-nx95", 1)
        env = {"NYC_COLLISIONS_KEYSCAN_PAGE": "500"}  # many key pages, so many could overlap
        for command, code in [("verify", 1), ("reconcile", 0), ("verify", 0)]:
            srv.reset_stats()
            res = cli(command, "crashes", *where, *flags, env=env)
            assert res.code == code, res.text
            assert 1 <= srv.stats()["peak_in_flight"] <= most, command
        exact(srv, dest, "crashes", tmp_path)
