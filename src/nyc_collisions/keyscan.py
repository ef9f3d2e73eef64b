"""Every key of a dataset on the source, fetched over `:id` partitions at once, as a backfill does.

`verify` and `reconcile` need each row's `(:id, key)` (and `:updated_at`). One stream of keyset
pages leaves all but one of the server's slots idle; here the `:id` range is split at boundaries
found by one-row probes (`chain.py`, its chain up only), found while the first partitions are
already being fetched, and `workers` threads page through the partitions (keyset pages ordered
by `:id`, streamed and parsed a few MiB at a time, so memory holds pieces, never a page). Each
partition's rows go to a `PartitionSink` the caller opens: a spill to local files (`keyspill`),
and for a reconcile also chunk files under `runs/` that a later run resumes from.

A partition ends only where a count finds no rows left (`DatasetSource.page_until_empty`), as a
backfill's do. A stop (Ctrl-C, `--max-seconds`, the Lambda deadline, a lost lease) ends each
partition at a page boundary with `end(done=False)`: the sink records where to go on.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from . import settings
from .chain import extended, plan_partitions
from .daemon import DaemonCalls
from .errors import Interrupted, RetriesStopped, StateError
from .plan import (
    Partition,
    ResumePoint,
    chain_doc,
    chain_ends,
    partition_count,
    partition_step,
)
from .schema import Column, Schema
from .socrata import soql
from .source import DatasetSource
from .workers import STOP_WAIT, join_for

logger = logging.getLogger(__name__)

KEYS_PAGE = "NYC_COLLISIONS_KEYSCAN_PAGE"
DEFAULT_KEYS_PAGE = 100_000  # rows a keys request; its bytes are streamed, never held whole


def keys_page() -> int:
    """Rows per keys request (env NYC_COLLISIONS_KEYSCAN_PAGE: smaller pages, more partitions)."""
    return settings.env_int(KEYS_PAGE, DEFAULT_KEYS_PAGE, 1, 10_000_000)


def key_schema(source: DatasetSource, extra: tuple[str, ...] = ()) -> Schema:
    """The columns a key scan fetches: the key, `:id` and `extra` system fields, typed as the
    source's metadata says (a number key reads back as the number's text, as landed)."""
    dataset = source.dataset
    full = source.schema()
    types = {c.field_name: c.data_type for c in full.columns}
    fields = list(dict.fromkeys([dataset.key, ":id", *extra]))
    columns = tuple(Column(f, types[f]) for f in fields)
    return Schema(columns, full.integer_fields, full.text_fields)


def scan_threads(source: DatasetSource, workers: int | None) -> int:
    """Threads of a key scan: `--workers` when given, else the ceiling of requests in flight
    (the source's client holds what is sent to what the source serves)."""
    return workers if workers is not None else source.client.limit.ceiling


@dataclass(frozen=True)
class ScanPlan:
    """A key scan's partitions, found as it goes (`runs/<scan_id>/scan.json` for a reconcile).

    `scan_from` is the source's latest `:updated_at` when the scan started: a landed row changed
    after it may be newer than what the scan saw of it.
    """

    scan_id: str
    dataset_id: str
    key: str
    fields: tuple[str, ...]
    started: str
    scan_from: str | None
    source_count: int
    page: int
    planned: int
    step: int
    partitions: tuple[Partition, ...] = ()
    complete: bool = False
    chain_after: str | None = None  # the chains' ends, as in `SnapshotPlan` (see `chain.py`)
    chain_before: str | None = None
    chain_made: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "keyscan",
            "scan_id": self.scan_id,
            "dataset_id": self.dataset_id,
            "key": self.key,
            "fields": list(self.fields),
            "started": self.started,
            "scan_from": self.scan_from,
            "source_count": self.source_count,
            "page": self.page,
            "planned": self.planned,
            "step": self.step,
            "partitions": [p.to_dict() for p in self.partitions],
            "complete": self.complete,
            "chain": chain_doc(self.chain_after, self.chain_before, self.chain_made),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str) -> ScanPlan:
        try:
            if doc.get("kind") != "keyscan":
                raise ValueError(f"kind is {doc.get('kind')!r}")
            parts = tuple(Partition.from_dict(p) for p in doc["partitions"])
            after, before, made = chain_ends(doc.get("chain"), parts)
            return cls(
                scan_id=str(doc["scan_id"]),
                dataset_id=str(doc["dataset_id"]),
                key=str(doc["key"]),
                fields=tuple(str(f) for f in doc["fields"]),
                started=str(doc["started"]),
                scan_from=None if doc["scan_from"] is None else str(doc["scan_from"]),
                source_count=int(doc["source_count"]),
                page=int(doc["page"]),
                planned=int(doc["planned"]),
                step=int(doc["step"]),
                partitions=parts,
                complete=bool(doc["complete"]),
                chain_after=after,
                chain_before=before,
                chain_made=made,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{where}: a corrupt key scan record ({exc})") from exc

    @classmethod
    def start(
        cls, scan_id: str, source: DatasetSource, fields: tuple[str, ...], workers: int, page: int
    ) -> ScanPlan:
        """A new plan: the source's count and latest `:updated_at` now; no partition yet."""
        from .manifest import utc_now

        count = source.count()
        # a partition may be smaller than a page: its end costs a short page and a count
        planned = partition_count(count, workers, max(1, page // 10))
        return cls(
            scan_id=scan_id,
            dataset_id=source.dataset.dataset_id,
            key=source.dataset.key,
            fields=fields,
            started=utc_now(),
            scan_from=source.max_updated_at(),
            source_count=count,
            page=page,
            planned=planned,
            step=partition_step(count, planned),
        )


class PartitionSink(Protocol):
    """Where one partition's key tables go."""

    def write(self, table: pa.Table) -> None: ...
    def end(self, done: bool, after: str | None) -> None: ...
    def abort(self) -> None: ...


OpenSink = Callable[[Partition], PartitionSink]


class KeyScan:
    """Scan the source's keys over the partitions of `plan` (see the module docstring).

    `record(plan)` is called each time the plan grows (a reconcile writes it under `runs/`);
    `self.plan` is the plan as found so far.
    """

    def __init__(
        self,
        source: DatasetSource,
        schema: Schema,
        plan: ScanPlan,
        *,
        workers: int,
        stop: threading.Event,
        out_of_time: Callable[[], bool],
        open_sink: OpenSink,
        record: Callable[[ScanPlan], None] | None = None,
    ) -> None:
        self.source = source
        self.schema = schema
        self.plan = plan
        self.workers = workers
        self.stop = stop
        self.out_of_time = out_of_time
        self.open_sink = open_sink
        self.record = record
        self.rows = 0
        self._lock = threading.Lock()

    def run(
        self,
        resume: dict[int, ResumePoint] | None = None,
        beside: Callable[[threading.Event], None] | None = None,
    ) -> bool:
        """Fetch every partition not done, while `beside` (reading the landed keys, say) runs in
        a thread of its own under the same stop. True when every partition reached its end."""
        resume = resume or {}
        work: queue.Queue[tuple[Partition, ResumePoint] | None] = queue.Queue()
        ended = {i: p.done for i, p in resume.items()}
        for p in self.plan.partitions:
            point = resume.get(p.index, ResumePoint())
            if not point.done:
                work.put((p, point))
        errors: list[BaseException] = []

        def guarded(task: Callable[[], None]) -> Callable[[], None]:
            def run_task() -> None:
                try:
                    task()
                except RetriesStopped:
                    pass  # the run is stopping, its other threads with it (`stopping_when`)
                except BaseException as exc:
                    with self._lock:
                        errors.append(exc)
                    self.stop.set()

            return run_task

        def worker() -> None:
            while not self.stop.is_set():
                item = work.get()
                if item is None:
                    return
                done = self._partition(*item)
                with self._lock:
                    ended[item[0].index] = done

        n = max(1, min(self.workers, self.plan.planned))
        threads = [
            threading.Thread(target=guarded(worker), daemon=True, name=f"keys-{i}")
            for i in range(n)
        ]
        if beside is not None:
            task = functools.partial(beside, self.stop)
            threads.append(threading.Thread(target=guarded(task), daemon=True, name="landed"))
        for t in threads:
            t.start()
        try:
            try:
                planner = plan_partitions(
                    self, self.source, DaemonCalls(), self._go_on, down_too=False
                )
                for partition in planner:
                    work.put((partition, ResumePoint()))
            except KeyboardInterrupt:
                raise
            except RetriesStopped:
                pass  # the run is stopping: no more partitions
            except BaseException as exc:  # a failed probe: stop the workers, then raise it
                with self._lock:
                    errors.append(exc)
                self.stop.set()
            finally:
                for _ in range(n):
                    work.put(None)
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
        except KeyboardInterrupt:
            self.stop.set()
            self.source.client.limit.interrupt()
            join_for(threads, STOP_WAIT)
            raise Interrupted(
                f"{self.source.dataset.name}: interrupted; nothing partial was committed"
            ) from None
        if errors:
            raise errors[0]
        return self.plan.complete and all(ended.get(p.index) for p in self.plan.partitions)

    def _go_on(self) -> bool:
        return not self.stop.is_set() and not self.out_of_time()

    def extend(
        self, lower: str | None, upper: str | None, rows: int, *, down: bool = False
    ) -> Partition:
        """The planner's next partition (see `chain.extended`), recorded before it is used."""
        plan, partition = extended(self.plan, lower, upper, rows, down=down)
        if self.record is not None:
            self.record(plan)
        self.plan = plan
        return partition

    def _partition(self, partition: Partition, point: ResumePoint) -> bool:
        sink = self.open_sink(partition)
        after = point.after if point.after is not None else partition.lower
        key = self.source.dataset.key
        extra = tuple(f for f in self.schema.field_names if f not in (":id", key))
        page = self.plan.page

        def params() -> dict[str, str]:
            return soql.keys_params(
                key=key, after=after, upper=partition.upper, limit=page, extra=extra
            )

        def emit(table: pa.Table) -> None:
            nonlocal after
            sink.write(table)
            after = table.column("socrata_id")[-1].as_py()
            with self._lock:
                self.rows += table.num_rows

        def stopped() -> bool:
            return self.stop.is_set() or self.out_of_time()

        try:
            done = self.source.page_until_empty(
                # dropped where it is on a stop: the keys emitted so far are whole
                lambda: self.source.page(self.schema, params, emit, cancelled=stopped),
                lambda: soql.id_range(after, partition.upper),
                asked=lambda: page,
                stopped=stopped,
            )
            sink.end(done, after)
            return done
        except BaseException:
            sink.abort()
            raise
