"""A run whose lease was taken over (paused past its TTL: SIGSTOP, a stalled VM or network) writes
nothing over what the new holder recorded, nor drops it, when it wakes; and a live holder is
not taken over early."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from nyc_collisions.errors import DestinationBusy, LeaseLost
from nyc_collisions.keyscan import ScanPlan
from nyc_collisions.lease import Lease
from nyc_collisions.manifest import Batch, Manifest
from nyc_collisions.plan import Partition, ResumePoint, resume_points
from nyc_collisions.scanrecord import Chunks, ScanRecords
from nyc_collisions.sink.files import FileEntry
from nyc_collisions.sink.storage import open_storage
from nyc_collisions.state import DatasetState, PartRecord
from nyc_collisions.tidy import tidy
from tests.fake_soda import FakeSoda

SCHEMA = pa.schema([("key", pa.string()), ("socrata_id", pa.string())])


class Spill:
    """Where a key scan's chunks put the source's keys (`keyspill.KeySpill`'s side)."""

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []

    def add(self, side: str, table: pa.Table) -> None:
        self.tables.append(table)

    def ids(self) -> list[str]:
        return [i for t in self.tables for i in t.column("socrata_id").to_pylist()]


def keys(ids: list[str]) -> pa.Table:
    return pa.table({"key": ids, "socrata_id": ids}, schema=SCHEMA)


def scan_plan() -> ScanPlan:
    return ScanPlan(
        scan_id="20240101T000000Z-keyscan-abcdef",
        dataset_id="h9gi-nx95",
        key="collision_id",
        fields=("collision_id", ":id"),
        started="2024-01-01T00:00:00Z",
        scan_from=None,
        source_count=100,
        page=1000,  # chunks of many pages: only `end` closes one here
        planned=1,
        step=1,
        partitions=(Partition(0, None, None),),
    )


def paused(lease: Lease) -> None:
    """The holder stops renewing, as under SIGSTOP, and stays so past its TTL."""
    lease._done.set()
    assert lease._thread is not None
    lease._thread.join()
    time.sleep(4 * lease.ttl)  # unrenewed by the store's clock too (S3: to the second)


class Stall:
    """A storage's network from its first `method` request to a URL holding `part` on: every
    request of each S3 client it holds hangs until `release()`, then times out (a stalled
    network that comes back), so its lease's renewals stop too. `sent_again` counts such
    requests sent after it came back."""

    def __init__(self, storage: object, part: str, method: str = "PUT") -> None:
        self.part, self.method = part, method
        self.stalled = threading.Event()
        self.released = threading.Event()
        self.sent_again = 0
        for client in [v for v in vars(storage).values() if hasattr(v, "meta")]:
            client.meta.events.register("before-send.s3.*", self._send)

    def _send(self, request: Any, **_: Any) -> None:
        from botocore.exceptions import ReadTimeoutError

        ours = request.method == self.method and self.part in request.url
        if ours and self.released.is_set():
            self.sent_again += 1
        if ours:
            self.stalled.set()
        if self.stalled.is_set() and not self.released.is_set():
            self.released.wait(30)
            raise ReadTimeoutError(endpoint_url=request.url)

    def release(self) -> None:
        self.released.set()


@contextlib.contextmanager
def taken_over(network: Stall, lease_a: Lease, where: str, command: str) -> Iterator[DatasetState]:
    """Run B, holding the lease it took over once A's network stalled past a TTL."""
    assert network.stalled.wait(10)
    time.sleep(4 * lease_a.ttl)  # A's lease is unrenewed by S3's clock
    state_b = DatasetState(open_storage(where), "crashes")
    with Lease(state_b.storage, "crashes", command) as lease_b:  # takes over after a TTL
        state_b.lease = lease_b
        yield state_b


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "landing")
    return f"s3://{request.getfixturevalue('bucket')}/landing"


def test_a_late_key_chunk_never_replaces_the_new_holders(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reconcile A has a chunk of keys open when it is paused; B takes the lease over, resumes the
    scan at the same chunk and records it; A wakes and closes its chunk. A resumed scan then
    reads B's keys, as B recorded them (A's chunk had the same name and replaced B's: the keys
    after it were lost to a later resume, and a reconcile would have tombstoned their rows)."""
    monkeypatch.setenv("NYC_COLLISIONS_LEASE_TTL", "0.5")
    plan = scan_plan()
    part = plan.partitions[0]
    storage_a = open_storage(where)
    state_a = DatasetState(storage_a, "crashes")
    lease_a = Lease(storage_a, "crashes", "reconcile")
    lease_a.__enter__()
    state_a.lease = lease_a
    chunks_a = Chunks(state_a, plan, part, ResumePoint(), Spill(), SCHEMA)
    chunks_a.write(keys(["a1", "a2"]))
    paused(lease_a)

    storage_b = open_storage(where)
    state_b = DatasetState(storage_b, "crashes")
    with Lease(storage_b, "crashes", "reconcile") as lease_b:
        state_b.lease = lease_b
        chunks_b = Chunks(state_b, plan, part, ResumePoint(), Spill(), SCHEMA)
        chunks_b.write(keys(["a1", "a2", "a3", "a4", "a5"]))
        chunks_b.end(False, "a5")
        with pytest.raises(LeaseLost):  # A wakes: its stop ends the partition
            chunks_a.end(False, "a2")
        with pytest.raises(LeaseLost):  # nor can it drop the scan B goes on with
            state_a.drop_run(plan.scan_id)
        records = state_b.part_records(plan.scan_id)
        assert [(r.seq, r.rows, r.last_id) for r in records] == [(0, 5, "a5")]
        assert resume_points(records)[0].after == "a5"
        spill = Spill()
        ScanRecords(state_b, None).reload(plan, records, spill)  # type: ignore[arg-type]
        assert spill.ids() == ["a1", "a2", "a3", "a4", "a5"]
        state_b.end_run()


def test_a_commit_stalled_past_a_take_over_is_not_sent_again(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Update A has uploaded its file and sends its commit; its network stalls (every request
    hangs, its lease's renewals too) for over a TTL. B takes the lease over, has nothing to
    commit, and its cleanup deletes A's file (no manifest names it). A's network comes back: its
    commit is not sent again (boto3 would have, its If-Match still holding), so the manifest
    never names the deleted file; A fails with the lease lost."""
    monkeypatch.setenv("NYC_COLLISIONS_LEASE_TTL", "0.5")
    where = f"s3://{bucket}/landing"
    storage_a = open_storage(where)
    state_a = DatasetState(storage_a, "crashes")

    with Lease(storage_a, "crashes", "update") as lease_a:
        state_a.lease = lease_a
        state_a.commit(Manifest("crashes", "h9gi-nx95", "collision_id", []))
        manifest = state_a.load()
        assert manifest is not None
        path = state_a.data_key("B-update", 0, 0, "csv")
        storage_a.put_bytes(path, b"collision_id\n1\n")
        files = [FileEntry(path, 1, 15)]
        batch = Batch("B-update", "update", "csv", "2024-01-01T00:00:00Z", files, 1)
        manifest.batches.append(batch)
        network = Stall(storage_a, "manifest.json")
        failure: list[BaseException] = []

        def commit() -> None:
            try:
                state_a.commit(manifest)
            except BaseException as exc:
                failure.append(exc)

        committing = threading.Thread(target=commit)
        committing.start()
        with taken_over(network, lease_a, where, "update") as state_b:
            assert state_b.lease is not None
            state_b.lease.finished()
            tidy(state_b, state_b.lease)
            assert state_b.storage.get_bytes(path) is None  # A's file, deleted
            state_b.end_run()
        network.release()
        committing.join(60)
        lease_a.finished()
    assert [type(e) for e in failure] == [LeaseLost]
    final = state_b.load()
    assert final is not None
    assert [f.path for b in final.batches for f in b.files] == []


HOLD = """
import sys, time
from nyc_collisions.lease import Lease
from nyc_collisions.sink.storage import open_storage
with Lease(open_storage(sys.argv[1]), "crashes", "update"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs unshare -p (root)"
)
def test_a_live_holder_in_another_pid_namespace_is_not_taken_over(tmp_path: Path) -> None:
    """Two containers of one host that share its name (`--network host`, Kubernetes'
    hostNetwork, ECS host mode) and a destination: the same host name and boot, their own pids.
    The holder's pid (1 in its namespace) names another process here: the live holder must not
    be judged gone, nor its lease taken before a whole TTL unrenewed."""
    where = str(tmp_path / "landing")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    unshare = ["unshare", "-p", "-f", "--kill-child", "--mount-proc"]
    holder = subprocess.Popen(
        [*unshare, sys.executable, "-c", HOLD, where], stdout=subprocess.PIPE, env=env
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(DestinationBusy):
            Lease(open_storage(where), "crashes", "update").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_run_record_stalled_past_a_take_over_is_not_sent_again(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backfill A sends a part record; its network stalls past a TTL. B takes the lease over,
    resumes at the same file number and records its own. A's network comes back: its record is
    not sent again over B's (boto3 would have: the commit would then name A's file with B's
    boundaries), and A fails with the lease lost."""
    monkeypatch.setenv("NYC_COLLISIONS_LEASE_TTL", "0.5")
    where = f"s3://{bucket}/landing"
    storage_a = open_storage(where)
    state_a = DatasetState(storage_a, "crashes")

    def record(state: DatasetState, last_id: str) -> PartRecord:
        return PartRecord(0, 5, False, f"crashes/data/b/part-{last_id}.csv", 10, 100, last_id)

    with Lease(storage_a, "crashes", "backfill") as lease_a:
        state_a.lease = lease_a
        network = Stall(storage_a, "/parts/")
        failure: list[BaseException] = []

        def write() -> None:
            try:
                state_a.put_part_record("b", record(state_a, "from-a"))
            except BaseException as exc:
                failure.append(exc)

        writing = threading.Thread(target=write)
        writing.start()
        with taken_over(network, lease_a, where, "backfill") as state_b:
            state_b.put_part_record("b", record(state_b, "from-b"))
            network.release()
            writing.join(60)
            assert [r.last_id for r in state_b.part_records("b")] == ["from-b"]
            state_b.end_run()
        lease_a.finished()
    assert [type(e) for e in failure] == [LeaseLost]


def test_a_cleanup_delete_stalled_past_a_take_over_is_not_sent_again(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A has committed snapshot S; its cleanup sends one delete for the unfinished run X that S
    supersedes, and its network stalls past a TTL. B takes the lease over and (as `backfill
    --force` or an update's refresh would) resumes X from its part records and commits it. A's
    network comes back: the delete is not sent again (boto3 would have), so the files B's
    manifest names are all there."""
    monkeypatch.setenv("NYC_COLLISIONS_LEASE_TTL", "0.5")
    where = f"s3://{bucket}/landing"
    storage_a = open_storage(where)
    state_a = DatasetState(storage_a, "crashes")
    x = "20240101T000000Z-backfill-xxxxxx"
    x_file = f"crashes/data/{x}/part-0000-000000-aaaaaa.csv"
    with Lease(storage_a, "crashes", "backfill") as lease_a:
        state_a.lease = lease_a
        state_a.put_run_json(f"crashes/runs/{x}/plan.json", {"kind": "snapshot", "batch_id": x})
        storage_a.put_bytes(x_file, b"collision_id\n1\n")
        state_a.put_part_record(x, PartRecord(0, 0, True, x_file, 1, 15, "row-1"))
        s_file = "crashes/data/S/part-0000-000000-bbbbbb.csv"
        storage_a.put_bytes(s_file, b"collision_id\n1\n")
        manifest = Manifest("crashes", "h9gi-nx95", "collision_id", [])
        manifest.batches.append(
            Batch("S", "snapshot", "csv", "2024-01-02T00:00:00Z", [FileEntry(s_file, 1, 15)], 1)
        )
        state_a.commit(manifest)
        lease_a.finished()
        network = Stall(storage_a, "delete", method="POST")
        cleaning = threading.Thread(
            target=tidy, args=(state_a, lease_a), kwargs={"drop_unfinished": True}
        )
        cleaning.start()
        with taken_over(network, lease_a, where, "backfill") as state_b:
            resumed = state_b.load()
            assert resumed is not None
            parts = state_b.part_records(x)
            assert [p.path for p in parts] == [x_file]
            files = [FileEntry(p.path, p.rows, p.bytes) for p in parts if p.path]
            resumed.batches.append(Batch(x, "snapshot", "csv", "2024-01-03T00:00:00Z", files, 1))
            state_b.commit(resumed)
            state_b.end_run()
        network.release()
        cleaning.join(120)
        state_a.end_run()
    final = state_b.load()
    assert final is not None
    named = [f.path for b in final.current_batches() for f in b.files]
    assert named == [x_file]
    assert [p for p in named if state_b.storage.get_bytes(p) is None] == [], (
        f"deleted by A's cleanup, sent again {network.sent_again} times after the take-over"
    )


def test_a_holder_woken_from_suspend_asks_the_store_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holds the lease; its host suspends (a laptop's lid closed): every thread of A stops,
    and so does Linux's CLOCK_MONOTONIC (not CLOCK_BOOTTIME). B takes the lease over after a
    whole TTL and records a part of A's run. A wakes: to its monotonic clock its last renewal
    was a moment ago, yet its next record is refused, and B's stays."""
    import nyc_collisions.lease as lease_module

    monkeypatch.setenv("NYC_COLLISIONS_LEASE_TTL", "1")
    where = str(tmp_path / "landing")
    state_a = DatasetState(open_storage(where), "crashes")
    lease_a = Lease(state_a.storage, "crashes", "backfill")
    lease_a.acquire()  # held, its renewer not started: A is suspended from here on
    state_a.lease = lease_a
    suspended_at = time.monotonic()
    time.sleep(2 * lease_a.ttl)
    state_b = DatasetState(open_storage(where), "crashes")
    state_b.lease = Lease(state_b.storage, "crashes", "backfill")
    state_b.lease.acquire()  # watches a whole TTL, then takes over
    b_record = PartRecord(0, 1, False, "crashes/data/X/part-0000-000001-bbbbbb.csv", 9, 90, "b9")
    state_b.put_part_record("X", b_record)
    asleep = time.monotonic() - suspended_at

    class Suspended:
        """`time` as A sees it: its monotonic clock stood still while the host slept."""

        @staticmethod
        def monotonic() -> float:
            return time.monotonic() - asleep

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

    monkeypatch.setattr(lease_module, "time", Suspended())
    a_record = PartRecord(0, 1, False, "crashes/data/X/part-0000-000001-aaaaaa.csv", 5, 50, "a5")
    with pytest.raises(LeaseLost):
        state_a.put_part_record("X", a_record)
    monkeypatch.setattr(lease_module, "time", time)
    assert [r.last_id for r in state_b.part_records("X")] == ["b9"]
    state_b.end_run()


def test_a_run_that_lost_its_lease_records_no_new_run(soda_ro: FakeSoda, tmp_path: Path) -> None:
    """A new snapshot's first record (its plan) is written under the lease like every other."""
    from nyc_collisions.connect import SourceSettings
    from nyc_collisions.datasets import resolve
    from nyc_collisions.extract import Backfill
    from nyc_collisions.job import RunOptions
    from nyc_collisions.results import DatasetResult
    from nyc_collisions.snapshot import _Snapshot

    dest = tmp_path / "land"
    storage = open_storage(str(dest))
    with SourceSettings(url=soda_ro.url).client() as client:
        job = Backfill(client, storage, resolve("crashes"), RunOptions(progress=False))
        lost = Lease(storage, "crashes", "backfill")
        lost._lose("another run took it over")  # as the renewer marks it
        job.state.lease = lost
        with pytest.raises(LeaseLost):
            _Snapshot(job, "csv")._plan(
                job.source.schema(), DatasetResult("crashes", "landed"), [], None
            )
    assert list(dest.rglob("plan.json")) == []
