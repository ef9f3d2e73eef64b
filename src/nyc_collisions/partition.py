"""One partition of a snapshot, fetched by keyset pages into files, and the plan that lists them.

A partition ends when the row at its upper bound is landed: nothing can follow it in the range,
and a body cut short would not have held it. A partition without an upper bound (or whose upper
row was deleted meanwhile) ends only where a count finds no rows after its last landed row,
never on a short page alone (a body cut short can look like one): after a short page the count
is asked first, so the end costs one round trip.

A partition is split when the pool asks (`split_wanted`): its page is dropped where it is, the
`:id` half its remaining rows further is probed from the last row it landed, and the plan
records the split before either half goes on.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from .chain import extended
from .errors import RetriesStopped
from .plan import MAX_PARTITIONS, Partition, ResumePoint, SnapshotPlan
from .rows import CsvRows
from .schema import Schema
from .sink.files import FileEntry, FileRotation
from .socrata import soql
from .source import DatasetSource
from .state import DatasetState, PartRecord

if TYPE_CHECKING:
    from .job import RunOptions


class Progress(Protocol):
    def add(self, rows: int) -> None: ...


class Splits(Protocol):
    """What a partition tells its pool: a new partition to fetch, a split request answered."""

    def add(self, partition: Partition) -> None: ...

    def answered(self) -> None: ...


@dataclass(frozen=True)
class FetchContext:
    """What every partition of one snapshot run shares."""

    source: DatasetSource
    state: DatasetState
    schema: Schema
    opts: RunOptions
    batch_id: str
    stop: threading.Event
    progress: Progress
    counts: Executor | None = None  # counts that confirm a range's end run here, beside a page


class PlanBook:
    """A run's plan (`runs/<batch>/plan.json`): partitions are added and split under one lock,
    and the plan is written before a new or changed partition is used."""

    def __init__(self, state: DatasetState, plan: SnapshotPlan) -> None:
        self.state = state
        self._plan = plan
        self._lock = threading.Lock()

    @property
    def plan(self) -> SnapshotPlan:
        return self._plan

    @property
    def key(self) -> str:
        return f"{self.state.run_prefix(self._plan.batch_id)}/plan.json"

    def extend(
        self, lower: str | None, upper: str | None, rows: int, *, down: bool = False
    ) -> Partition:
        """The planner's next partition (see `chain.extended`), recorded before it is used."""
        with self._lock:
            plan, partition = extended(self._plan, lower, upper, rows, down=down)
            self._write(plan)
            return partition

    @property
    def full(self) -> bool:
        """Whether the plan has as many partitions as file names can number."""
        return len(self._plan.partitions) >= MAX_PARTITIONS

    def split(
        self, partition: Partition, bound: str, kept: int, rest: int
    ) -> tuple[Partition, Partition] | None:
        """`partition` ends at `bound`, a new one takes the rest; None when the plan is full."""
        with self._lock:
            plan = self._plan
            parts = list(plan.partitions)
            if len(parts) >= MAX_PARTITIONS:
                return None
            mine, new = partition.split_at(bound, len(parts), kept, rest)
            parts[partition.index] = mine
            parts.append(new)
            self._write(replace(plan, partitions=tuple(parts), splits=plan.splits + 1))
            return mine, new

    def _write(self, plan: SnapshotPlan) -> None:
        self.state.put_run_json(self.key, plan.to_dict())
        self._plan = plan


class PartitionFetch:
    """Fetch one partition from its resume point to its end (see the module docstring)."""

    def __init__(
        self,
        ctx: FetchContext,
        book: PlanBook,
        pool: Splits,
        partition: Partition,
        point: ResumePoint,
    ) -> None:
        self.ctx = ctx
        self.book = book
        self.pool = pool
        self.partition = partition
        self.after = point.after if point.after is not None else partition.lower
        self.landed = point.rows  # rows of this partition landed so far, committed or not
        self.split_wanted = threading.Event()
        self.split_keep = 0
        self._asked = ctx.opts.page_size  # rows the current page asks for
        self.seconds = 0.0  # spent in pages: with `page_rows`, how long a row takes
        self.latest = ""  # the latest `:updated_at` it landed (see `PartRecord.latest`)
        self.page_rows = 0
        opts = ctx.opts
        self.files = FileRotation(
            ctx.state.storage,
            ctx.schema,
            opts.fmt,
            opts.file_rows,
            lambda seq: ctx.state.data_key(ctx.batch_id, self.partition.index, seq, opts.fmt),
            point.next_seq,
            self._record,
        )

    def remaining(self) -> int:
        """Rows it is thought to have left (0 when unknown)."""
        rows = self.partition.rows
        return 0 if rows is None else max(0, rows - self.landed)

    def run(self) -> None:
        try:
            done = self.ctx.source.page_until_empty(
                self._next,
                lambda: soql.id_range(self.after, self.partition.upper),
                stopped=lambda: self.ctx.stop.is_set() or self.ctx.opts.out_of_time(),
                asked=lambda: self._asked,
                ended=self._upper_landed,
                counts=self.ctx.counts,
            )
            self.files.commit(done=done)
        except BaseException:
            self.files.abort()
            raise

    def _upper_landed(self) -> bool:
        """Whether the row at its upper bound is landed: nothing can follow it in the range."""
        upper = self.partition.upper
        return upper is not None and self.after == upper

    # -- pages -------------------------------------------------------------------------------
    def _limit(self) -> int:
        """Rows to ask for: a page, or all that is left when that is at most half a page more
        (one request less: each costs the source a first byte), in the top range too (more
        rows than asked come back as a full page, and paging goes on)."""
        page = self.ctx.opts.page_size
        left = self.remaining()
        if 0 < left <= page + page // 2:
            return left + max(1, left // 20)  # a little more, in case rows were added
        return page

    def _params(self) -> dict[str, str]:
        return self.ctx.source.page_params(
            after=self.after, upper=self.partition.upper, limit=self._asked
        )

    # `latest` first: a file the write fills is recorded within it
    def _emit(self, table: pa.Table) -> None:
        self.latest = max(self.latest, pc.max(table.column("socrata_updated_at")).as_py() or "")
        self.files.write(table)
        self.after = table.column("socrata_id")[-1].as_py()
        self.landed += table.num_rows
        self.ctx.progress.add(table.num_rows)

    def _emit_rows(self, rows: CsvRows) -> None:
        self.latest = max(self.latest, rows.latest)
        self.files.write(rows)
        self.after = rows.last_id
        self.landed += rows.num_rows
        self.ctx.progress.add(rows.num_rows)

    def _next(self) -> int | None:
        """The next page, or a split when one is wanted (None)."""
        if self.split_wanted.is_set():
            with contextlib.suppress(RetriesStopped):  # (a stop: its rows so far are committed)
                self._split()
            return None
        return self._page()

    def _page(self) -> int | None:
        """One page; None when it was dropped (for a split, or on a stop)."""
        # CSV pages go to CSV files unparsed where they can (see `CsvPageStream`)
        pass_through = self._emit_rows if self.ctx.opts.fmt == "csv" else None
        started, landed = time.monotonic(), self.landed
        self._asked = self._limit()
        try:
            return self.ctx.source.page(
                self.ctx.schema,
                self._params,
                self._emit,
                pass_through,
                # dropped where it is for a split, or on a stop (Ctrl-C, SIGTERM, a lost lease,
                # the time budget)
                cancelled=lambda: (
                    self.split_wanted.is_set()
                    or self.ctx.stop.is_set()
                    or self.ctx.opts.out_of_time()
                ),
            )
        finally:
            self.seconds += time.monotonic() - started
            self.page_rows += self.landed - landed

    # -- splits ------------------------------------------------------------------------------
    def ask_split(self, keep: int) -> None:
        """Ask it to keep only `keep` of the rows it has left (the pool's side)."""
        self.split_keep = keep
        self.split_wanted.set()

    def _split(self) -> None:
        """Answer `ask_split`: the page was dropped where it was, so nothing past `after` is
        landed, and the halves meet exactly at the probed boundary."""
        try:
            self.cut(self.split_keep)
        finally:
            self.split_wanted.clear()
            self.pool.answered()

    def cut(self, keep: int) -> None:
        """Keep the next `keep` rows; the rest of the range becomes a new partition, recorded
        in the plan before either goes on. Called between pages only."""
        remaining = self.remaining()
        if not 0 < keep < remaining or self.book.full:
            return
        upper = self.partition.upper
        bound = self.ctx.source.probe(self.after, keep - 1, upper=upper)
        if bound is None or bound == upper:
            # fewer rows than thought: it keeps them, and is not asked again
            p = self.partition
            self.partition = Partition(p.index, p.lower, upper, self.landed)
            return
        both = self.book.split(self.partition, bound, self.landed + keep, remaining - keep)
        if both is None:  # another split filled the plan meanwhile: it keeps the whole range
            return
        self.partition, new = both
        self.pool.add(new)

    # -- part records ------------------------------------------------------------------------
    def _record(self, entry: FileEntry | None, last: pa.Table | None, done: bool) -> None:
        last_id = last.column("socrata_id")[0].as_py() if last is not None else self.after
        record = PartRecord(
            partition=self.partition.index,
            seq=self.files.seq,
            done=done,
            path=entry.path if entry else None,
            rows=entry.rows if entry else 0,
            bytes=entry.bytes if entry else 0,
            last_id=last_id,
            latest=self.latest,
        )
        self.ctx.state.put_part_record(self.ctx.batch_id, record)
