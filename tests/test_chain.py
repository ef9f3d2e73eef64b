"""The two chains that plan a snapshot's partitions (`chain.py`), against a source whose rows
are deleted and added between every two probes: the partitions never overlap and leave no
gap, however the chains' probes interleave and whatever the changes do to the counts.

The rows are integers here (`row-00001234`), so this test can order them; the planner never
does, it only asks the source.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from nyc_collisions.chain import plan_partitions
from nyc_collisions.keyscan import KeyScan, ScanPlan
from nyc_collisions.partition import PlanBook
from nyc_collisions.plan import Partition, SnapshotPlan, partition_step
from tests.memsource import snapshot_plan

P = ParamSpec("P")
T = TypeVar("T")


def _id(n: int) -> str:
    return f"row-{n:08d}"


def _num(row_id: str | None, default: float) -> float:
    return default if row_id is None else int(row_id[4:])


class ChangingSource:
    """Rows kept in order; before each probe, `change` rows are deleted or added anywhere."""

    def __init__(self, rows: int, change: int, seed: int) -> None:
        self.rows = list(range(0, 10 * rows, 10))
        self.change = change
        self.rng = random.Random(seed)
        self.seen = set(self.rows)
        self.probes = 0

    def _mutate(self) -> None:
        self.probes += 1
        for _ in range(self.rng.randrange(self.change + 1)):
            if self.rows and self.rng.random() < 0.7:
                self.rows.pop(self.rng.randrange(len(self.rows)))
            else:
                new = self.rng.randrange(10 * len(self.seen) + 10)
                if new not in self.seen:
                    self.seen.add(new)
                    self.rows.append(new)
                    self.rows.sort()

    def probe(self, after: str | None, offset: int, upper: str | None = None) -> str | None:
        self._mutate()
        lo, hi = _num(after, -1), _num(upper, float("inf"))
        inside = [r for r in self.rows if lo < r <= hi]
        return _id(inside[offset]) if offset < len(inside) else None

    def probe_below(self, before: str | None, offset: int, lower: str | None) -> str | None:
        self._mutate()
        lo, hi = _num(lower, -1), _num(before, float("inf"))
        inside = [r for r in reversed(self.rows) if lo < r <= hi]
        return _id(inside[offset]) if offset < len(inside) else None


class Interleaved(Executor):
    """Runs each call when it is submitted or only when its result is asked, as drawn: the
    probe down answers before or after the probe up beside it."""

    def __init__(self, eager: Callable[[], bool]) -> None:
        self.eager = eager

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        if self.eager():
            future.set_result(fn(*args, **kwargs))
            return future
        lazy = future.result

        def result(timeout: float | None = None) -> T:
            if not future.done():
                future.set_result(fn(*args, **kwargs))
            return lazy(timeout)

        future.result = result  # type: ignore[method-assign]
        return future


class MemoryState:
    def run_prefix(self, batch_id: str) -> str:
        return f"runs/{batch_id}"

    def put_run_json(self, key: str, doc: dict[str, Any]) -> None:
        pass


def _snapshot_book(count: int, planned: int) -> PlanBook:
    return PlanBook(MemoryState(), _plan(count, planned))  # type: ignore[arg-type]


def _snapshot_resumed(book: Any) -> PlanBook:
    stored = SnapshotPlan.from_dict(book.plan.to_dict(), "plan.json")
    return PlanBook(MemoryState(), stored)  # type: ignore[arg-type]


def _scan(plan: ScanPlan) -> KeyScan:
    return KeyScan(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        plan,
        workers=1,
        stop=threading.Event(),
        out_of_time=lambda: False,
        open_sink=None,  # type: ignore[arg-type]
    )


def _scan_book(count: int, planned: int) -> KeyScan:
    return _scan(
        ScanPlan(
            scan_id="s",
            dataset_id="test-0001",
            key="id",
            fields=("id",),
            started="2026-01-01T00:00:00Z",
            scan_from=None,
            source_count=count,
            page=100,
            planned=planned,
            step=partition_step(count, planned),
        )
    )


def _scan_resumed(book: Any) -> KeyScan:
    return _scan(ScanPlan.from_dict(book.plan.to_dict(), "scan.json"))


BOOKS = {
    "snapshot": (_snapshot_book, _snapshot_resumed),
    "keyscan": (_scan_book, _scan_resumed),
}


def _plan(count: int, planned: int) -> SnapshotPlan:
    return snapshot_plan(count, planned, 100, "csv")


def _holding(parts: list[Partition], n: int) -> int:
    return sum(1 for p in parts if _num(p.lower, -float("inf")) < n <= _num(p.upper, float("inf")))


def _held_rows(parts: list[Partition], rows: list[int]) -> list[int]:
    return [sum(1 for r in rows if _holding([p], r)) for p in parts]


@settings(max_examples=400, deadline=None)
@given(
    rows=st.integers(0, 400),
    planned=st.integers(1, 12),
    change=st.sampled_from([0, 2, 40, 400]),
    stop_after=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    order=st.lists(st.booleans(), min_size=1, max_size=20),
    kind=st.sampled_from(sorted(BOOKS)),
)
def test_partitions_tile_the_rows_while_rows_change_and_after_a_resume(
    rows: int,
    planned: int,
    change: int,
    stop_after: int,
    seed: int,
    order: list[bool],
    kind: str,
) -> None:
    """For a backfill's plan and a key scan's: a first run stops after `stop_after` partitions
    and a second goes on from the plan as stored."""
    new, resume = BOOKS[kind]
    source = ChangingSource(rows, change, seed)
    turns = iter(order * 20)
    calls = Interleaved(lambda: next(turns))
    book = new(rows, planned)
    made: list[Partition] = []
    down_too = kind == "snapshot"  # as each plans: key scans go up only
    first = plan_partitions(
        book,
        source,  # type: ignore[arg-type]
        calls,
        lambda: len(made) < stop_after,
        down_too=down_too,
    )
    for p in first:
        made.append(p)
    resumed = resume(book)
    made += plan_partitions(resumed, source, calls, lambda: True, down_too=down_too)  # type: ignore[arg-type]
    plan = resumed.plan
    assert plan.complete
    assert list(plan.partitions) == made
    assert len(made) <= planned
    # every row that ever was, and every place a row could be added, in exactly one partition
    for n in range(-1, 10 * len(source.seen) + 11):
        assert _holding(made, n) == 1, (n, made)
    if change == 0 and rows >= 3 * planned:  # unchanged: as planned, each a step of rows
        step = plan.step or 1
        # a last partition that the rows fill exactly leaves one more, empty, to one chain
        assert min(planned, -(-rows // step)) <= len(made) <= min(planned, rows // step + 1)
        assert sorted(_held_rows(made, source.rows))[1:] == [step] * (len(made) - 1)
