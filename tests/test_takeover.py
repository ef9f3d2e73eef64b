"""A run whose lease was taken over (paused past its TTL: SIGSTOP, a stalled VM or network) writes
nothing over what the new holder recorded, nor drops it, when it wakes."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pytest

from nyc_collisions.errors import LeaseLost
from nyc_collisions.keyscan import ScanPlan
from nyc_collisions.lease import Lease
from nyc_collisions.plan import Partition, ResumePoint, resume_points
from nyc_collisions.scanrecord import Chunks, ScanRecords
from nyc_collisions.sink.storage import open_storage
from nyc_collisions.state import DatasetState

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
