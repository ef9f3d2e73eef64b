"""The orchestrator: metadata -> plan -> pages -> files -> manifest.

Only this module knows both the source and the sink. A backfill of one dataset:

1. takes the dataset's lock and reads its manifest (a committed snapshot is not landed twice
   unless `force`); an unfinished run of an earlier invocation is resumed from its committed files;
2. asks the source for its count and latest `:updated_at` (the watermark the next `update` starts
   from, so rows changed during the backfill are picked up), then probes partition boundaries;
3. workers fetch partitions by keyset pages and stream them into files, closing a file every
   `file_rows` rows and recording it under `runs/<batch>/parts/` (the unit a rerun resumes from);
4. when every partition has reached its end (an empty page that a count confirms, never just a
   short page), one manifest write commits the snapshot batch and its watermark; leftovers of
   killed runs are removed (`tidy`, as after every command that writes).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from .datasets import Dataset
from .drift import column_specs
from .errors import AlreadyLanded, Interrupted, NycCollisionsError, StateError, UsageError
from .lease import Lease
from .plan import Partition, partition_count, partition_step
from .rows import CsvRows
from .schema import Schema
from .sink.files import FileEntry, FileRotation
from .sink.formats import check_format
from .sink.storage import Storage
from .socrata import soql
from .socrata.client import SodaClient
from .socrata.source import DatasetSource, SourceInfo
from .state import Batch, DatasetState, Manifest, PartRecord, Watermark, new_batch_id, utc_now
from .tidy import tidy

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = 4
DEFAULT_PAGE_SIZE = 50_000
DEFAULT_FILE_ROWS = 500_000
EPOCH = "1970-01-01T00:00:00.000Z"


@dataclass(frozen=True)
class RunOptions:
    fmt: str = "csv"
    workers: int = DEFAULT_WORKERS
    page_size: int = DEFAULT_PAGE_SIZE
    file_rows: int = DEFAULT_FILE_ROWS
    force: bool = False
    deadline: float | None = None  # time.monotonic() value to stop cleanly before
    progress: bool = True
    table: str | None = None  # keep <dest>/<dataset>/table/ in this format (table.py)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def __post_init__(self) -> None:
        check_format(self.fmt)
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1, not {self.workers}")
        if self.page_size < 1:
            raise UsageError(f"--page-size must be a positive number of rows, not {self.page_size}")
        if self.file_rows < 1:
            raise UsageError(f"--file-rows must be positive, not {self.file_rows}")


@dataclass
class DatasetResult:
    dataset: str
    status: str  # "landed" | "skipped" | "stopped" | "updated" | ...
    rows: int = 0
    files: int = 0
    bytes: int = 0
    requests: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0
    batch_id: str | None = None
    location: str = ""
    source_count: int | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- partition workers -------------------------------------------------------------------------


@dataclass
class _Progress:
    bar: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)


def _run_partition(
    source: DatasetSource,
    state: DatasetState,
    schema: Schema,
    opts: RunOptions,
    batch_id: str,
    partition: Partition,
    resume: dict[str, Any],
    stop: threading.Event,
    progress: _Progress,
) -> FileRotation:
    def record(entry: FileEntry | None, last: pa.Table | None, done: bool) -> None:
        last_id = last.column("socrata_id")[0].as_py() if last is not None else after
        record = PartRecord(
            partition=partition.index,
            seq=files.seq,
            done=done,
            path=entry.path if entry else None,
            rows=entry.rows if entry else 0,
            bytes=entry.bytes if entry else 0,
            last_id=last_id,
        )
        state.put_json(
            f"{state.run_prefix(batch_id)}/parts/{partition.index:04d}-{files.seq:06d}.json",
            record.to_dict(),
        )

    files = FileRotation(
        state.storage,
        schema,
        opts.fmt,
        opts.file_rows,
        lambda seq: state.data_key(batch_id, partition.index, seq, opts.fmt),
        resume["next_seq"],
        record,
    )
    after: str | None = resume["after"] if resume["after"] is not None else partition.lower

    def params() -> dict[str, str]:
        return source.page_params(after=after, upper=partition.upper, limit=opts.page_size)

    def emit(table: pa.Table) -> None:
        nonlocal after
        files.write(table)
        after = table.column("socrata_id")[-1].as_py()
        progress.add(table.num_rows)

    def emit_rows(rows: CsvRows) -> None:
        nonlocal after
        files.write(rows)
        after = rows.last_id
        progress.add(rows.num_rows)

    # CSV pages go to CSV files unparsed where they can (see `CsvPageStream`)
    pass_through = emit_rows if opts.fmt == "csv" else None
    empty = 0
    try:
        while True:
            if stop.is_set() or opts.out_of_time():
                files.commit(done=False)
                return files
            if source.stream_rows(schema, params, emit, pass_through) > 0:
                empty = 0
                continue
            empty += 1
            if source.confirm_empty(soql.id_range(after, partition.upper), empty):
                files.commit(done=True)
                return files
    except BaseException:
        files.abort()
        raise


# -- one dataset's backfill -------------------------------------------------------------------


class DatasetJob:
    """One command on one dataset: holds its lease, measures what it did, and cleans up after
    killed runs before it gives the lease back (`tidy`)."""

    command = ""
    status = ""
    snapshot_committed = False  # a new snapshot supersedes unfinished backfills too

    def __init__(
        self, client: SodaClient, storage: Storage, dataset: Dataset, opts: RunOptions
    ) -> None:
        self.client = client
        self.storage = storage
        self.dataset = dataset
        self.opts = opts
        self.source = DatasetSource(client, dataset)
        self.state = DatasetState(storage, dataset.name)

    def run(self, stop: threading.Event) -> DatasetResult:
        started = time.monotonic()
        requests0, bytes0 = self.client.stats.requests, self.client.stats.bytes
        result = DatasetResult(
            self.dataset.name, self.status, location=f"{self.storage.url}/{self.dataset.name}/"
        )
        try:
            with Lease(self.storage, self.dataset.name, self.command, stop) as lease:
                self.state.lease = lease
                try:
                    manifest = self.state.load()
                    if manifest is not None:
                        self._keyed_as_landed(manifest.key)
                    self._run(stop, result)
                    lease.check()  # a lease lost during the run fails it; during cleanup, not
                    self._sync_table()
                    lease.finished()
                    tidy(self.state, lease, drop_unfinished=self.snapshot_committed)
                finally:
                    self.state.lease = None
        finally:
            result.requests = self.client.stats.requests - requests0
            result.wire_bytes = self.client.stats.bytes - bytes0
            result.seconds = time.monotonic() - started
        return result

    def _sync_table(self) -> None:
        """With a table format: bring the dataset's table up to its manifest (table.py)."""
        if self.opts.table:
            from .table import sync_table

            sync_table(self.storage, self.dataset, self.state)

    def _keyed_as_landed(self, key: str) -> None:
        """Work with the key the dataset was landed with (see `Dataset.keyed_as_landed`)."""
        dataset = self.dataset.keyed_as_landed(key, f"{self.storage.url}/{self.dataset.name}/")
        if dataset is not self.dataset:
            self.dataset = dataset
            self.source = DatasetSource(self.client, dataset)

    def _run(self, stop: threading.Event, result: DatasetResult) -> None:
        raise NotImplementedError


class Backfill(DatasetJob):
    """Backfill one dataset into `storage` (see the module docstring)."""

    command = "backfill"
    status = "landed"

    def _run(self, stop: threading.Event, result: DatasetResult) -> None:
        manifest = self.state.load()
        if manifest and manifest.current_batches() and not self.opts.force:
            self._sync_table()  # the table of a landed dataset, written (or healed) anyway
            snap = manifest.current_batches()[0]
            raise AlreadyLanded(
                f"{self.dataset.name}: a backfill is already committed at "
                f"{result.location} ({snap.rows:,} rows, {snap.committed_at}); "
                "`nyc-collisions update` keeps it fresh, --force lands a new snapshot"
            )
        schema = self.source.schema()
        plan = self._plan(schema, result)
        self._fetch(schema, plan, result, stop)
        if result.status != "stopped":
            self._commit(manifest, schema, plan, result)

    def _plan(self, schema: Schema, result: DatasetResult) -> dict[str, Any]:
        """Resume the unfinished run if there is one that fits, or probe and record a new plan."""
        columns = [[c.field_name, c.data_type] for c in schema.columns]
        for batch_id in reversed(self.state.unfinished_runs()):
            plan = self.state.get_json(f"{self.state.run_prefix(batch_id)}/plan.json")
            if (
                plan
                and plan.get("kind") == "snapshot"
                and plan.get("format") == self.opts.fmt
                and plan.get("columns") == columns
                and isinstance(plan.get("key"), str)
                and (plan["key"] == self.dataset.key or not self.dataset.key_given)
            ):
                self._keyed_as_landed(plan["key"])  # a rerun without --key keeps the run's key
                logger.info("%s: resuming run %s", self.dataset.name, batch_id)
                result.extra["resumed"] = batch_id
                return plan
            logger.info(
                "%s: dropping unfinished run %s (different format or columns)",
                self.dataset.name,
                batch_id,
            )
            self.state.drop_run(batch_id)
        info: SourceInfo = self.source.info()
        batch_id = new_batch_id("backfill")
        n = partition_count(info.count, self.opts.workers, self.opts.page_size)
        plan = {
            "kind": "snapshot",
            "batch_id": batch_id,
            "dataset_id": self.dataset.dataset_id,
            "key": self.dataset.key,
            "format": self.opts.fmt,
            "columns": columns,
            "started": utc_now(),
            "source_count": info.count,
            "max_updated_at": info.max_updated_at,
            "rows_updated_at": info.rows_updated_at,
            "page_size": self.opts.page_size,
            # partitions are added as their boundaries are found (see `_planner`)
            "planned": n,
            "step": partition_step(info.count, n),
            "complete": False,
            "partitions": [],
        }
        self.state.put_json(f"{self.state.run_prefix(batch_id)}/plan.json", plan)
        return plan

    def _planner(self, plan: dict[str, Any], stop: threading.Event) -> Iterator[Partition]:
        """Partitions as their boundaries are found, each recorded in the plan before it is used.

        Fetching starts with the first boundary instead of after the last: the probes skip
        rows by `$offset`, slow on the real server, and run beside the partitions' pages.
        """
        parts: list[dict[str, Any]] = plan["partitions"]
        while not plan["complete"] and not stop.is_set() and not self.opts.out_of_time():
            after = parts[-1]["upper"] if parts else None
            bound = None
            if len(parts) < plan["planned"] - 1:
                bound = self.source.probe(after, plan["step"] - 1)
            partition = Partition(len(parts), after, bound)
            plan["complete"] = bound is None
            parts.append(partition.to_dict())
            self.state.put_json(f"{self.state.run_prefix(plan['batch_id'])}/plan.json", plan)
            yield partition

    def _resume_points(self, plan: dict[str, Any]) -> tuple[dict[int, dict[str, Any]], int]:
        """Per partition: where to go on (`after`, `next_seq`, `done`); and rows already landed."""
        points: dict[int, dict[str, Any]] = {
            p["index"]: {"after": None, "next_seq": 0, "done": False} for p in plan["partitions"]
        }
        rows = 0
        for rec in self.state.part_records(plan["batch_id"]):
            point = points.setdefault(rec.partition, {"after": None, "next_seq": 0, "done": False})
            if rec.seq >= point["next_seq"]:
                point["next_seq"] = rec.seq + 1
                point["after"] = rec.last_id
            point["done"] = point["done"] or rec.done
            rows += rec.rows
        return points, rows

    def _fetch(
        self,
        schema: Schema,
        plan: dict[str, Any],
        result: DatasetResult,
        stop: threading.Event,
    ) -> None:
        points, landed_before = self._resume_points(plan)
        partitions = [Partition.from_dict(p) for p in plan["partitions"]]
        todo = [p for p in partitions if not points[p.index]["done"]]
        bar = tqdm(
            total=plan["source_count"],
            initial=landed_before,
            unit=" rows",
            desc=self.dataset.name,
            disable=not self.opts.progress,
            unit_scale=True,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        progress = _Progress(bar)
        work: queue.Queue[Partition | None] = queue.Queue()
        for p in todo:
            work.put(p)
        n_threads = max(1, min(self.opts.workers, plan.get("planned", len(partitions))))
        errors: list[BaseException] = []
        finished: list[FileRotation] = []
        lock = threading.Lock()

        def worker() -> None:
            while not stop.is_set():
                p = work.get()
                if p is None:
                    return
                try:
                    files = _run_partition(
                        self.source,
                        self.state,
                        schema,
                        self.opts,
                        plan["batch_id"],
                        p,
                        points.get(p.index, {"after": None, "next_seq": 0, "done": False}),
                        stop,
                        progress,
                    )
                except BaseException as exc:
                    with lock:
                        errors.append(exc)
                    stop.set()
                    return
                with lock:
                    finished.append(files)

        threads = [
            threading.Thread(target=worker, daemon=True, name=f"partition-{i}")
            for i in range(n_threads)
        ]
        for t in threads:
            t.start()
        try:
            try:
                for p in self._planner(plan, stop):
                    work.put(p)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # a failed probe: stop the workers, then raise it
                with lock:
                    errors.append(exc)
                stop.set()
            finally:
                for _ in threads:
                    work.put(None)
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
        except KeyboardInterrupt:
            stop.set()
            for t in threads:
                t.join(timeout=30)
            raise Interrupted(
                f"{self.dataset.name}: interrupted; committed files are kept and a rerun of "
                "the same command resumes from them"
            ) from None
        finally:
            bar.close()
        result.files = sum(f.files for f in finished)
        result.rows = sum(f.landed_rows for f in finished)
        result.bytes = sum(f.landed_bytes for f in finished)
        if errors:
            raise errors[0]
        points_after, _ = self._resume_points(plan)
        if not plan.get("complete", True) or not all(
            points_after.get(p["index"], {}).get("done") for p in plan["partitions"]
        ):
            result.status = "stopped"
            result.batch_id = plan["batch_id"]
            result.message = (
                f"stopped before the end ({'time budget' if not stop.is_set() else 'stop'}); "
                "a rerun resumes from the committed files"
            )

    def _commit(
        self, manifest: Manifest | None, schema: Schema, plan: dict[str, Any], result: DatasetResult
    ) -> None:
        files = [
            FileEntry(r.path, r.rows, r.bytes)
            for r in self.state.part_records(plan["batch_id"])
            if r.path
        ]
        total = sum(f.rows for f in files)
        batch = Batch(
            batch_id=plan["batch_id"],
            kind="snapshot",
            format=self.opts.fmt,
            committed_at=utc_now(),
            files=files,
            rows=total,
            source_count=plan["source_count"],
            watermark=Watermark(plan["max_updated_at"] or EPOCH, None),
            info={
                "started": plan["started"],
                "rows_updated_at": plan["rows_updated_at"],
                "partitions": len(plan["partitions"]),
                # no row of the snapshot was created after this (see counts.py)
                "ahead_until": self.source.max_updated_at(),
            },
        )
        columns = column_specs(schema.columns)
        if manifest is None:
            manifest = Manifest(
                dataset=self.dataset.name,
                dataset_id=self.dataset.dataset_id,
                key=self.dataset.key,
                columns=columns,
            )
        elif manifest.dataset_id != self.dataset.dataset_id:
            raise StateError(
                f"{result.location} holds dataset {manifest.dataset_id}, not "
                f"{self.dataset.dataset_id}"
            )
        manifest.key = self.dataset.key
        change = manifest.change_columns(columns, batch.batch_id)
        if change is not None:
            result.extra["schema_change"] = change.summary()
            logger.info("%s: snapshot %s lands the new columns", self.dataset.name, batch.batch_id)
        manifest.batches.append(batch)
        self.state.commit(manifest)
        self.snapshot_committed = True
        result.batch_id = batch.batch_id
        result.source_count = plan["source_count"]
        result.extra["total_rows"] = total
        result.extra["total_files"] = len(files)


def backfill(
    client: SodaClient,
    storage: Storage,
    datasets: list[Dataset],
    opts: RunOptions,
    on_result: Callable[[DatasetResult], None] | None = None,
) -> list[DatasetResult]:
    """Backfill each dataset in turn; a dataset already landed is skipped with a message."""
    storage.check_writable()
    try:
        return _backfill_each(client, storage, datasets, opts, on_result)
    except BaseException:
        storage.discard_if_empty()
        raise


def _backfill_each(
    client: SodaClient,
    storage: Storage,
    datasets: list[Dataset],
    opts: RunOptions,
    on_result: Callable[[DatasetResult], None] | None,
) -> list[DatasetResult]:
    stop = threading.Event()
    results = []
    for ds in datasets:
        try:
            result = Backfill(client, storage, ds, opts).run(stop)
        except AlreadyLanded as exc:
            result = DatasetResult(
                ds.name, "skipped", message=str(exc), location=f"{storage.url}/{ds.name}/"
            )
        results.append(result)
        if on_result:
            on_result(result)
        if result.status == "stopped":
            break
    return results


__all__ = [
    "Backfill",
    "DatasetJob",
    "DatasetResult",
    "NycCollisionsError",
    "RunOptions",
    "backfill",
]
