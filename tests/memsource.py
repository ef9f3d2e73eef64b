"""The real chains, pool, partition fetches and `page_until_empty` against an in-memory source whose
rows change before every call (deleted and added anywhere in `:id` order), with its pages cut
short and retried mid-way at random, and files and run records kept in memory: thousands of
interleavings a second, where the fake server gives a few.

Rows are `row-%08d` (string order == number order). Nothing here orders rows for the code under
test: it only asks the fake source.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pyarrow as pa

from nyc_collisions import partition as partition_mod
from nyc_collisions.chain import plan_partitions
from nyc_collisions.partition import FetchContext, PlanBook
from nyc_collisions.plan import SnapshotPlan, partition_count, partition_step, resume_points
from nyc_collisions.socrata.client import PageCancelled
from nyc_collisions.socrata.concurrency import ConcurrencyLimit
from nyc_collisions.socrata.setup import RetryPolicy
from nyc_collisions.source import DatasetSource
from nyc_collisions.state import PartRecord
from nyc_collisions.workers import DaemonCalls, fetch_partitions


def rid(n: int) -> str:
    return f"row-{n:08d}"


_GT = re.compile(r":id > '([^']*)'")
_LE = re.compile(r":id <= '([^']*)'")


def bounds(where: str | None) -> tuple[str | None, str | None]:
    if not where:
        return None, None
    gt, le = _GT.search(where), _LE.search(where)
    return (gt.group(1) if gt else None), (le.group(1) if le else None)


class MemSource(DatasetSource):
    """The source: sorted ids; `change` rows deleted/added before each request."""

    def __init__(
        self, rows: int, change: int, seed: int, *, cut: float = 0.0, pause: float = 0.001
    ) -> None:
        self.pause = pause
        self.client = SimpleNamespace(
            retry=RetryPolicy(attempts=6, base=0.0), wait_to_retry=lambda seconds: True
        )
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.ids = [rid(10 * i) for i in range(rows)]
        self.start = set(self.ids)
        self.ever = set(self.ids)
        self.deleted: set[str] = set()
        self.change = change
        self.cut = cut  # chance a page body is cut short at a row boundary (a short page)
        self.next_new = 10 * rows

    def mutate(self) -> None:
        with self.lock:
            for _ in range(self.rng.randrange(self.change + 1)):
                if self.ids and self.rng.random() < 0.5:
                    gone = self.ids.pop(self.rng.randrange(len(self.ids)))
                    self.deleted.add(gone)
                else:
                    n = self.rng.randrange(10 * len(self.ever) + 10)
                    new = rid(n)
                    if new not in self.ever:
                        self.ever.add(new)
                        self.ids.append(new)
                        self.ids.sort()

    def _inside(self, lo: str | None, hi: str | None) -> list[str]:
        with self.lock:
            return [i for i in self.ids if (lo is None or i > lo) and (hi is None or i <= hi)]

    # -- what the code under test calls --------------------------------------------------------
    def count(self, where: str | None = None) -> int:
        self.mutate()
        time.sleep(self.rng.random() * 0.002)
        return len(self._inside(*bounds(where)))

    def probe(self, after: str | None, offset: int, upper: str | None = None) -> str | None:
        self.mutate()
        time.sleep(self.rng.random() * 0.002)
        inside = self._inside(after, upper)
        return inside[offset] if offset < len(inside) else None

    def probe_below(self, before: str | None, offset: int, lower: str | None) -> str | None:
        self.mutate()
        time.sleep(self.rng.random() * 0.002)
        inside = self._inside(lower, before)[::-1]
        return inside[offset] if offset < len(inside) else None

    def page_params(self, *, after: str | None, upper: str | None, limit: int) -> dict[str, Any]:
        return {"after": after, "upper": upper, "limit": limit}

    def stream_rows(self, schema, params, emit, emit_rows=None, cancelled=None) -> int:  # type: ignore[override]
        if cancelled is not None and cancelled():
            raise PageCancelled
        for _attempt in range(3):
            p = params()
            self.mutate()
            rows = self._inside(p["after"], p["upper"])[: p["limit"]]
            if self.cut and self.rng.random() < self.cut:
                rows = rows[: self.rng.randrange(len(rows) + 1)]
            got = 0
            retry = self.rng.random() < 0.1 and len(rows) > 2
            stop_at = self.rng.randrange(len(rows)) if retry else len(rows)
            i = 0
            while i < stop_at:
                if cancelled is not None and cancelled():
                    raise PageCancelled
                step = min(stop_at - i, self.rng.randrange(1, 4))
                chunk = rows[i : i + step]
                ids = pa.array(chunk, pa.string())
                emit(pa.table({"socrata_id": ids, "socrata_updated_at": ids}))  # (any text)
                got += len(chunk)
                i += step
                if self.rng.random() < 0.3:
                    time.sleep(self.pause)
            if not retry:
                return got
        return got


@dataclass
class MemStore:
    """Run records and data files, as committed."""

    plan: dict[str, Any] | None = None
    records: dict[tuple[int, int], PartRecord] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class MemState:
    def __init__(self, store: MemStore) -> None:
        self.store = store
        self.storage = store

    def run_prefix(self, batch_id: str) -> str:
        return f"runs/{batch_id}"

    def put_run_json(self, key: str, doc: dict[str, Any]) -> None:
        with self.store.lock:
            self.store.plan = doc

    def put_part_record(self, batch_id: str, record: PartRecord) -> None:
        with self.store.lock:
            self.store.records[(record.partition, record.seq)] = record

    def data_key(self, batch_id: str, partition: int, seq: int, fmt: str) -> str:
        return f"data/{partition:04d}-{seq:06d}"


class MemRotation:
    """`FileRotation` with files as lists of ids in `MemStore.files`."""

    def __init__(self, storage, schema, fmt, file_rows, path_for, first_seq, on_file) -> None:  # type: ignore[no-untyped-def]
        self.store: MemStore = storage
        self.file_rows = file_rows
        self.path_for = path_for
        self.seq = first_seq
        self.on_file = on_file
        self._open: list[str] | None = None
        self.last_row: pa.Table | None = None
        self.landed_rows = self.landed_bytes = self.files = 0

    def write(self, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        if self._open is None:
            self._open = []
        self._open += rows.column("socrata_id").to_pylist()
        self.last_row = rows.slice(rows.num_rows - 1)
        if len(self._open) >= self.file_rows:
            self.commit(done=False)

    def commit(self, *, done: bool) -> None:
        from nyc_collisions.sink.files import FileEntry

        entry = None
        if self._open is not None:
            path = self.path_for(self.seq)
            with self.store.lock:
                self.store.files[path] = list(self._open)
            entry = FileEntry(path, len(self._open), len(self._open))
            self.landed_rows += entry.rows
            self.files += 1
        elif not done:
            return
        self._open = None
        self.on_file(entry, self.last_row, done)
        self.seq += 1

    def abort(self) -> None:
        self._open = None


def new_plan(source: MemSource, workers: int, page: int) -> SnapshotPlan:
    count = len(source.ids)
    return snapshot_plan(count, partition_count(count, workers, page), page)


def snapshot_plan(count: int, planned: int, page: int, fmt: str = "parquet") -> SnapshotPlan:
    """A new backfill plan of `count` rows in `planned` partitions, none found yet."""
    return SnapshotPlan(
        batch_id="b",
        dataset_id="test-0001",
        key="id",
        format=fmt,
        columns=(),
        started="2026-01-01T00:00:00Z",
        source_count=count,
        max_updated_at=None,
        rows_updated_at=None,
        page_size=page,
        planned=planned,
        step=partition_step(count, planned),
    )


def run_once(
    source: MemSource,
    store: MemStore,
    plan: SnapshotPlan,
    *,
    workers: int,
    page: int,
    file_rows: int,
    stop_after: float | None = None,
    deadline: float | None = None,
) -> tuple[SnapshotPlan, bool]:
    """One run of the pool over `plan` (from the stored records); the plan after and whether
    every partition of a complete plan is done."""
    state = MemState(store)
    records = sorted(store.records.values(), key=lambda r: (r.partition, r.seq))
    points = resume_points(records)
    book = PlanBook(state, plan)  # type: ignore[arg-type]
    stop = threading.Event()
    ends = None if deadline is None else time.monotonic() + deadline
    opts = SimpleNamespace(
        page_size=page,
        fmt="parquet",
        file_rows=file_rows,
        out_of_time=lambda: ends is not None and time.monotonic() >= ends,
    )
    ctx = FetchContext(
        source,
        state,
        None,
        opts,
        plan.batch_id,
        stop,
        SimpleNamespace(add=lambda n: None),  # type: ignore[arg-type]
    )
    limit = ConcurrencyLimit(workers, adaptive=False)
    timer = None
    if stop_after is not None:
        timer = threading.Timer(stop_after, stop.set)
        timer.start()

    def go_on() -> bool:
        return not stop.is_set() and not opts.out_of_time()

    try:
        with mock.patch.object(partition_mod, "FileRotation", MemRotation):
            planner = plan_partitions(book, source, DaemonCalls(), go_on)
            fetch_partitions(ctx, book, points, limit, planner, "test")
    finally:
        if timer is not None:
            timer.cancel()
    after = resume_points(sorted(store.records.values(), key=lambda r: (r.partition, r.seq)))
    plan = book.plan
    # what a rerun reads: the plan as stored
    stored = SnapshotPlan.from_dict(store.plan, "plan.json") if store.plan else plan
    assert stored == plan, "the stored plan differs from the one in memory"
    ends = [after.get(p.index) for p in plan.partitions]
    finished = plan.complete and all(e is not None and e.done for e in ends)
    return plan, finished


def landed(store: MemStore) -> list[str]:
    out: list[str] = []
    for rec in store.records.values():
        if rec.path:
            out += store.files[rec.path]
    return out


def check(source: MemSource, store: MemStore) -> None:
    ids = landed(store)
    seen: set[str] = set()
    dups = set()
    for i in ids:
        if i in seen:
            dups.add(i)
        seen.add(i)
    assert not dups, f"{len(dups)} rows landed twice, e.g. {sorted(dups)[:5]}"
    stable = source.start - source.deleted
    missing = stable - seen
    assert not missing, f"{len(missing)} rows present throughout not landed: {sorted(missing)[:5]}"
    assert seen <= source.ever
