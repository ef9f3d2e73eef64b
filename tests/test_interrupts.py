"""Ctrl-C in each phase of each command: one line, exit 130, nothing partial, and a rerun works;
SIGTERM likewise, with exit 143."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fake_soda import FakeSoda
from tests.helpers import cli, exact

# A terminal's Ctrl-C: SIGINT raises KeyboardInterrupt in the CLI even when the test runs where
# SIGINT is ignored (a background job, which its children inherit and Python keeps).
INTERACTIVE = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
    " sys.argv[0] = 'nyc-collisions'; runpy.run_module('nyc_collisions', "
    "run_name='__main__', alter_sys=True)"
)


def interrupt_while_held(
    soda: FakeSoda,
    match: str,
    args: list[str],
    seconds: float = 30,
    sig: signal.Signals = signal.SIGINT,
) -> subprocess.Popen[str]:
    """Start the CLI, hold the first request that matches `match` `seconds` long, and Ctrl-C it
    there (or send it `sig`)."""
    soda.add_fault("slow", times=None, match=match, seconds=seconds)
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERACTIVE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not soda.stats()["faults"].get("slow"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the phase was never reached"
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc


def assert_one_interrupted_line(proc: subprocess.Popen[str], status: int = 130) -> None:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == status, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("nyc-collisions: "), err
    assert "interrupted" in lines[0], err


def assert_stopped_cleanly(
    proc: subprocess.Popen[str],
    soda: FakeSoda,
    tmp_path: Path,
    before: bytes | None,
    held: float,
    status: int = 130,
) -> None:
    """The run just signalled ends with one line and `status` well before the request the
    source holds `held` seconds, its manifest as it was (`before`) and its lease given back."""
    sent = time.monotonic()
    assert_one_interrupted_line(proc, status)
    assert time.monotonic() - sent < held / 4, "the stop waited for the held request"
    soda.clear_faults()
    manifest = tmp_path / "land" / "crashes" / "manifest.json"
    assert (manifest.read_bytes() if manifest.exists() else None) == before
    assert not (tmp_path / "land" / "crashes" / "lock.json").exists()


@pytest.mark.parametrize(
    ("command", "match"),
    [
        ("backfill", "$offset"),  # planning: a partition boundary probe
        ("backfill", "count(*)"),  # starting: the source's count
        ("update", ":updated_at,:id"),  # a page of changes
        ("reconcile", ":id,collision_id,:updated_at"),  # the source's keys
        ("verify", ":id,collision_id"),  # the source's keys
    ],
    ids=["backfill_planning", "backfill_count", "update", "reconcile", "verify"],
)
def test_ctrl_c_in_each_phase(soda: FakeSoda, tmp_path: Path, command: str, match: str) -> None:
    dest = str(tmp_path / "land")
    where = ["--source", soda.url, "--dest", dest]
    manifest = tmp_path / "land" / "crashes" / "manifest.json"
    if command != "backfill":
        res = cli("backfill", "crashes", *where)
        assert res.code == 0, res.text
        soda.insert("h9gi-nx95", 30)
        soda.edit("h9gi-nx95", 20)
        soda.delete("h9gi-nx95", 10)
    before = manifest.read_bytes() if manifest.exists() else None
    paged = ["--page-size", "400"] if command in ("backfill", "update") else []
    proc = interrupt_while_held(soda, match, [command, "crashes", *where, *paged])
    assert_one_interrupted_line(proc)
    soda.clear_faults()
    assert (manifest.read_bytes() if manifest.exists() else None) == before
    assert not (tmp_path / "land" / "crashes" / "lock.json").exists()
    # the same command again finishes the work
    res = cli(command, "crashes", *where)
    if command == "verify":
        assert "MISMATCH" in res.out, res.text  # it ran to the end: the source changed
        return
    assert res.code == 0, res.text
    # what the source holds now, whatever phase was interrupted
    for catch_up in ("update", "reconcile"):
        res = cli(catch_up, "crashes", *where)
        assert res.code == 0, res.text
    exact(soda, dest, "crashes", tmp_path)


@pytest.mark.parametrize(
    ("command", "match", "flags"),
    [
        ("backfill", "$select=*", ["--page-size", "400", "--workers", "4"]),
        ("reconcile", ":id,collision_id,:updated_at", []),
    ],
    ids=["backfill", "reconcile"],
)
def test_sigterm_stops_a_run_as_ctrl_c_does(
    soda: FakeSoda, tmp_path: Path, command: str, match: str, flags: list[str]
) -> None:
    """`docker stop`, an ECS task stopping, `kill`: SIGTERM while pages or key pages are held at
    the source by several workers gives one line and exit 143 without waiting for them (a
    container is killed seconds later), nothing partial committed and the lease given back (a
    rerun elsewhere need not wait for it to expire); the same command again finishes the work."""
    dest = str(tmp_path / "land")
    where = ["--source", soda.url, "--dest", dest]
    manifest = tmp_path / "land" / "crashes" / "manifest.json"
    if command == "reconcile":
        assert cli("backfill", "crashes", *where).code == 0
        soda.delete("h9gi-nx95", 10)
    before = manifest.read_bytes() if manifest.exists() else None
    held = 60.0  # far longer than the stop may take
    args = [command, "crashes", *where, *flags]
    proc = interrupt_while_held(soda, match, args, seconds=held, sig=signal.SIGTERM)
    assert_stopped_cleanly(proc, soda, tmp_path, before, held, status=128 + signal.SIGTERM)
    res = cli(command, "crashes", *where, *flags)
    assert res.code == 0, res.text
    exact(soda, dest, "crashes", tmp_path)


def test_a_second_sigterm_ends_the_stop_at_once(soda: FakeSoda, tmp_path: Path) -> None:
    """A first SIGTERM waits a few seconds for the workers the source holds; a second one (an
    impatient operator, an orchestrator that sends it again) ends the process there: exit 143,
    no line written, nothing committed, and the same command again (on this host: the lease
    of a process that is gone is taken over at once) lands the source exactly."""
    dest = str(tmp_path / "land")
    where = ["--source", soda.url, "--dest", dest]
    args = ["backfill", "crashes", *where, "--page-size", "400", "--workers", "4"]
    proc = interrupt_while_held(soda, "$select=*", args, seconds=60.0, sig=signal.SIGTERM)
    time.sleep(1.0)  # the first stop is waiting for the held workers (up to 5 s)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert "interrupted" not in err, err  # ended before the stop's own line
    soda.clear_faults()
    assert not (tmp_path / "land" / "crashes" / "manifest.json").exists()
    res = cli(*args)
    assert res.code == 0, res.text
    exact(soda, dest, "crashes", tmp_path)


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("backfill", ["--page-size", "400"]),
        # one range whose last page is full (2,500 rows): the count comes after the empty page
        ("backfill", ["--page-size", "500", "--workers", "1"]),
        # a key scan's partition ends at a count too
        ("verify", []),
        ("reconcile", []),
    ],
    ids=["after-a-short-page", "after-the-empty-page", "verify", "reconcile"],
)
def test_ctrl_c_while_a_partition_end_count_is_held(
    soda: FakeSoda, tmp_path: Path, command: str, flags: list[str]
) -> None:
    """The count that confirms a partition's end hangs at the source: Ctrl-C does not wait for
    it (nor would it for one that never answers), and a rerun resumes from what was committed."""
    dest = str(tmp_path / "land")
    where = ["--source", soda.url, "--dest", dest]
    manifest = tmp_path / "land" / "crashes" / "manifest.json"
    if command != "backfill":
        assert cli("backfill", "crashes", *where).code == 0
    before = manifest.read_bytes() if manifest.exists() else None
    held = 60.0  # far longer than the interrupt may take
    args = [command, "crashes", *where, *flags]
    proc = interrupt_while_held(soda, "count(*) AS n&$where=:id", args, seconds=held)
    assert_stopped_cleanly(proc, soda, tmp_path, before, held)
    res = cli(command, "crashes", *where, *flags)
    assert res.code == 0, res.text
    if command == "backfill":
        assert "resumed run" in res.out, res.text
    exact(soda, dest, "crashes", tmp_path)


def test_a_worker_left_behind_writes_no_plan_nor_part_record(tmp_path: Path) -> None:
    """A worker still alive after its run gave the lease back (Ctrl-C waits only so long for
    it) cannot split the run's plan nor record a part: a newer run may own them by then."""
    from nyc_collisions.datasets import resolve
    from nyc_collisions.errors import LeaseLost
    from nyc_collisions.partition import PlanBook
    from nyc_collisions.plan import Partition, ResumePoint, SnapshotPlan
    from nyc_collisions.scanrecord import Chunks, ScanRecords
    from nyc_collisions.sink.storage import open_storage
    from nyc_collisions.state import DatasetState

    dest = tmp_path / "land"
    plan = SnapshotPlan(
        batch_id="b1",
        dataset_id="h9gi-nx95",
        key="collision_id",
        format="parquet",
        columns=(("collision_id", "number"),),
        started="2024-01-01T00:00:00Z",
        source_count=10,
        max_updated_at=None,
        rows_updated_at=None,
        page_size=5,
        planned=1,
        step=10,
        partitions=(Partition(0, None, None, 10),),
        complete=True,
    )
    state = DatasetState(open_storage(str(dest)), "crashes")  # no lease: the run has ended
    book = PlanBook(state, plan)
    with pytest.raises(LeaseLost):
        book.split(book.plan.partitions[0], "row-5", 5, 5)
    assert book.plan == plan
    with pytest.raises(LeaseLost):
        state.put_run_json(f"{state.run_prefix('b1')}/parts/0000-000000.json", {})
    # nor a reconcile's key scan: its plan, nor the record of a partition's chunks
    records = ScanRecords(state, resolve("crashes"))
    scan = SimpleNamespace(scan_id="s1", page=10, to_dict=lambda: {})
    with pytest.raises(LeaseLost):
        records.record_plan(scan)  # type: ignore[arg-type]
    chunks = Chunks(state, scan, Partition(0, None, None, 10), ResumePoint(), None, None)  # type: ignore[arg-type]
    with pytest.raises(LeaseLost):
        chunks.end(done=True, after="row-9")
    assert not [p for p in dest.rglob("*") if p.is_file()]


def test_sigterm_while_s3_holds_part_uploads_ends_within_seconds(
    bucket: str, s3_server: str, tmp_path: Path
) -> None:
    """S3 holds every part upload a minute (throttling, a stalled network): SIGTERM ends the run
    within seconds with 143 and the lease given back; the interpreter's exit had waited for
    each part held, and `docker stop` then killed it (137)."""
    import os

    import boto3

    from tests.s3_proxy import S3FaultProxy

    held = 60.0
    with (
        S3FaultProxy(s3_server, hold_parts=held) as proxy,
        FakeSoda(sizes={"h9gi-nx95": 30_000}, seed=3) as soda,
    ):
        dest = f"s3://{bucket}/collisions_raw_data"
        proc = subprocess.Popen(
            [sys.executable, "-m", "nyc_collisions", "backfill", "crashes", "--source",
             soda.url, "--dest", dest, "--workers", "1", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "AWS_ENDPOINT_URL": proxy.url},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not proxy.held:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "no part was uploaded"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            _, err = proc.communicate(timeout=held + 30)
            took = time.monotonic() - sent
        finally:
            proc.kill()
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert took < held / 2, f"the stop took {took:.0f}s, parts held {held:.0f}s: {err}"
        lock = "collisions_raw_data/crashes/lock.json"
        assert not boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=lock).get("Contents")


def test_a_part_whose_thread_cannot_start_gives_its_slot_back(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the interpreter's exit a thread cannot start: the part's slot comes back, or every
    writer of the storage would wait for one forever."""
    from nyc_collisions.daemon import DaemonCalls
    from nyc_collisions.sink.s3 import S3Storage
    from nyc_collisions.sink.s3_transfer import PART_SIZE, PARTS_IN_FLIGHT

    def refuse(self: DaemonCalls, *args: object, **kwargs: object) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    storage = S3Storage(bucket, "p")
    monkeypatch.setattr(DaemonCalls, "submit", refuse)
    refused = []

    def parts() -> None:
        for _ in range(PARTS_IN_FLIGHT + 1):
            with contextlib.suppress(RuntimeError):
                storage.open_writer("x.csv").write(b"x" * PART_SIZE)
                continue
            refused.append(1)

    thread = threading.Thread(target=parts, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), f"a writer waits for a slot after {len(refused)} parts"
    assert len(refused) == PARTS_IN_FLIGHT + 1
