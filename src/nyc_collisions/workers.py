"""The workers of one snapshot: partitions on a queue, as many fetched at once as the source
serves, idle slots filled by splitting the largest range left, progress and Ctrl-C.

There are as many worker threads as the concurrency limit's ceiling; as many partitions are
fetched at once as the limit allows now (`ConcurrencyLimit.limit`). A worker that finds the
queue empty while the limit has room (more at the start as the limit grows, or at the tail as
partitions end) asks the partition with the most rows left to split (see `partition.py`): no
slot idles while a range still has rows worth a split.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, TypeVar

from .daemon import DaemonCalls
from .errors import Interrupted, RetriesStopped
from .partition import FetchContext, PartitionFetch, PlanBook
from .plan import MAX_PARTITIONS, Partition, ResumePoint, min_split_rows
from .socrata.concurrency import ConcurrencyLimit

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

TICK = 0.05  # seconds between looks at the limit while waiting


@dataclass
class BarProgress:
    """A progress bar shared by the workers."""

    bar: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)


@dataclass(frozen=True)
class PoolResult:
    files: int
    rows: int
    bytes: int
    splits: int


class PartitionPool:
    """Fetch the partitions of `book` (and those `planner` adds) with `limit.ceiling` workers."""

    def __init__(
        self,
        ctx: FetchContext,
        book: PlanBook,
        points: dict[int, ResumePoint],
        limit: ConcurrencyLimit,
        name: str,
    ) -> None:
        self.ctx = ctx
        self.book = book
        self.points = points
        self.limit = limit
        self.name = name
        self._cond = threading.Condition()
        self._queue: deque[Partition] = deque()
        self._active: dict[int, PartitionFetch] = {}
        self._finished: list[PartitionFetch] = []
        self._splitting = 0
        self._planning = True
        self._errors: list[BaseException] = []

    # -- what partitions tell the pool (`partition.Splits`) ----------------------------------
    def add(self, partition: Partition) -> None:
        with self._cond:
            self._queue.append(partition)
            self._cond.notify_all()

    def answered(self) -> None:
        with self._cond:
            self._splitting -= 1
            self._cond.notify_all()

    def _min_split(self) -> int:
        fetches = [*self._active.values(), *self._finished]
        rows = sum(f.page_rows for f in fetches)
        seconds = sum(f.seconds for f in fetches)
        row_seconds = seconds / rows if rows else None
        return min_split_rows(self.limit.ttfb_min, row_seconds, self.ctx.opts.page_size)

    def _remaining(self, p: Partition) -> int:
        done = self.points.get(p.index, ResumePoint()).rows
        return 0 if p.rows is None else max(0, p.rows - done)

    def _served(self) -> int:
        """Requests the source serves at once: one less than an adaptive limit below its
        ceiling, which keeps one waiting."""
        limit = self.limit.limit
        return max(1, limit - 1) if self.limit.adaptive and limit < self.limit.ceiling else limit

    def _share(self) -> int:
        """Rows a stream should have left for all to end together."""
        left = sum(f.remaining() for f in self._active.values())
        left += sum(self._remaining(p) for p in self._queue)
        return max(self._min_split(), -(-left // self._served()))

    # -- the workers -------------------------------------------------------------------------
    def _take(self) -> tuple[PartitionFetch, int] | None:
        """The next partition to fetch, once the limit has room for it, and how many of its
        rows to keep (0: all); None when all is done. It is active from here on: a worker that
        looked between its take and its start would see nothing left and end for good."""
        with self._cond:
            while True:
                if self.ctx.stop.is_set() or self._errors or self.ctx.opts.out_of_time():
                    return None
                room = len(self._active) + self._splitting < self.limit.limit
                if self._queue and (room or not self._active):
                    keep = 0
                    if len(self._queue) == 1 and not self._planning:  # the last: maybe too big
                        share = self._share()
                        if self._remaining(self._queue[0]) > share + share // 2:
                            keep = share
                    partition = self._queue.popleft()
                    fetch = PartitionFetch(
                        self.ctx,
                        self.book,
                        self,
                        partition,
                        self.points.get(partition.index, ResumePoint()),
                    )
                    self._active[partition.index] = fetch
                    return fetch, keep
                if not (self._queue or self._planning or self._active or self._splitting):
                    return None
                # a split makes one more stream: at the tail, only for a slot of the source that
                # would idle (one more would wait for a page of another, its rows with it)
                served = len(self._active) + self._splitting < self._served()
                if served and not self._queue and not self._planning:
                    self._ask_split()
                self._cond.wait(timeout=TICK)

    def _ask_split(self) -> None:
        """Ask the partition with the most rows left to give some to a new one: all but its
        share when it has much more, else half."""
        if len(self.book.plan.partitions) + self._splitting >= MAX_PARTITIONS:
            return
        least = self._min_split()
        candidates = [
            f
            for f in self._active.values()
            if not f.split_wanted.is_set() and f.remaining() >= least
        ]
        if not candidates:
            return
        victim = max(candidates, key=lambda f: f.remaining())
        share, left = self._share(), victim.remaining()
        victim.ask_split(share if left > share + share // 2 else left // 2)
        self._splitting += 1

    def _worker(self) -> None:
        while True:
            try:
                taken = self._take()
                if taken is None:
                    return
                fetch, keep = taken
                index = fetch.partition.index  # a cut or a split keeps it
                try:
                    if keep:
                        fetch.cut(keep)
                    fetch.run()
                finally:
                    with self._cond:
                        self._active.pop(index, None)
                        self._finished.append(fetch)
                        if fetch.split_wanted.is_set():  # it ended before it could split
                            self._splitting -= 1
                        self._cond.notify_all()
            except RetriesStopped:
                return  # the run is stopping, its other workers with it (`stopping_when`)
            except BaseException as exc:
                with self._cond:
                    self._errors.append(exc)
                    self._cond.notify_all()
                self.ctx.stop.set()
                return

    def run(self, planner: Iterable[Partition]) -> PoolResult:
        """Fetch until every partition ended (or a stop); raises the first worker's error."""
        splits_before = self.book.plan.splits
        for p in self.book.plan.partitions:
            if not self.points.get(p.index, ResumePoint()).done:
                self._queue.append(p)
        threads = [
            threading.Thread(target=self._worker, daemon=True, name=f"partition-{i}")
            for i in range(self.limit.ceiling)
        ]
        for t in threads:
            t.start()
        try:
            try:
                for p in planner:
                    self.add(p)
            except KeyboardInterrupt:
                raise
            except RetriesStopped:
                pass  # the run is stopping: no more partitions
            except BaseException as exc:  # a failed probe: stop the workers, then raise it
                with self._cond:
                    self._errors.append(exc)
                self.ctx.stop.set()
            finally:
                with self._cond:
                    self._planning = False
                    self._cond.notify_all()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=TICK)
                    self.limit.tick()
        except KeyboardInterrupt:
            self.ctx.stop.set()
            self.limit.interrupt()
            join_for(threads, STOP_WAIT)
            raise Interrupted(
                f"{self.name}: interrupted; committed files are kept and a rerun of "
                "the same command resumes from them"
            ) from None
        if self._errors:
            raise self._errors[0]
        done = self._finished
        return PoolResult(
            files=sum(f.files.files for f in done),
            rows=sum(f.files.landed_rows for f in done),
            bytes=sum(f.files.landed_bytes for f in done),
            splits=self.book.plan.splits - splits_before,
        )


def fetch_partitions(
    ctx: FetchContext,
    book: PlanBook,
    points: dict[int, ResumePoint],
    limit: ConcurrencyLimit,
    planner: Iterable[Partition],
    name: str,
) -> PoolResult:
    """Run a `PartitionPool`, with the executor its partitions' end counts run on."""
    ctx = replace(ctx, counts=DaemonCalls())
    return PartitionPool(ctx, book, points, limit, name).run(planner)


STOP_WAIT = 5.0  # seconds in all that an interrupted run waits for its workers to end


def join_for(threads: Iterable[threading.Thread], seconds: float) -> None:
    """Wait for `threads` to end, `seconds` in all. After a stop a worker ends within a chunk
    of its page; one held in a request the source does not answer is left behind (a daemon
    thread: it ends with the process, and records nothing once the lease is given back)."""
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
