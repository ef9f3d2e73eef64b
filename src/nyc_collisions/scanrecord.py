"""A reconcile's key scan as recorded under `runs/<scan>/`, so that a run stopped or killed goes
on from it: the plan (`scan.json`), the keys in chunk files (`keys/`, Arrow IPC), each recorded
in `parts/` as a backfill records its files. Records older than a week are dropped (a fresh scan
sees more deletions), and so are those of another key or other fields."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.ipc as ipc

from .datasets import Dataset
from .errors import StateError
from .keyscan import ScanPlan, keys_page, scan_threads
from .keyspill import KeySpill
from .manifest import new_batch_id
from .plan import Partition, ResumePoint
from .schema import Schema
from .sink.storage import Storage, Writer
from .source import DatasetSource
from .state import DatasetState, PartRecord

logger = logging.getLogger(__name__)

MAX_AGE_HOURS = 7 * 24.0  # older scan records are dropped: a fresh scan sees more deletions
CHUNK_PAGES = 2  # a chunk file holds about this many pages of keys: what a kill loses at most
_IPC = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=1))


def scan_pending(storage: Storage, dataset: Dataset) -> bool:
    """Whether a reconcile of `dataset` stopped before its end and left its key scan to resume."""
    return any(k.endswith("/scan.json") for k in storage.list_keys(f"{dataset.name}/runs/"))


class Chunks:
    """One partition's keys: to the spill, and to chunk files recorded under `runs/<scan>/`."""

    def __init__(
        self,
        state: DatasetState,
        plan: ScanPlan,
        partition: Partition,
        point: ResumePoint,
        spill: KeySpill,
        schema: pa.Schema,
    ) -> None:
        self.state = state
        self.scan_id = plan.scan_id
        self.prefix = state.run_prefix(plan.scan_id)
        self.partition = partition
        self.seq = point.next_seq
        self.spill = spill
        self.schema = schema
        self.chunk_rows = CHUNK_PAGES * plan.page
        self._writer: Writer | None = None
        self._ipc: ipc.RecordBatchStreamWriter | None = None
        self._rows = 0
        self._path = ""

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names)
        self.spill.add("source", table)
        if self._writer is None:
            # the run's attempt in the name, as data files have: a run that lost its lease (paused
            # past its TTL) closing its chunk late never replaces the one the new holder recorded
            name = f"{self.partition.index:04d}-{self.seq:06d}-{self.state.attempt}"
            self._path = f"{self.prefix}/keys/{name}.arrow"
            self._writer = self.state.storage.open_writer(self._path)
            self._ipc = ipc.new_stream(self._writer, self.schema, options=_IPC)
        assert self._ipc is not None
        self._ipc.write_table(table)
        self._rows += table.num_rows
        if self._rows >= self.chunk_rows:
            self._record(False, table.column("socrata_id")[-1].as_py())

    def end(self, done: bool, after: str | None) -> None:
        if self._writer is not None or done:
            self._record(done, after)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = self._ipc = None

    def _record(self, done: bool, last_id: str | None) -> None:
        path, size = None, 0
        if self._writer is not None:
            assert self._ipc is not None
            self._ipc.close()
            self._writer.close()
            path, size = self._path, self._writer.bytes_written
        record = PartRecord(self.partition.index, self.seq, done, path, self._rows, size, last_id)
        self.state.put_part_record(self.scan_id, record)
        self._writer = self._ipc = None
        self._rows = 0
        self.seq += 1


class ScanRecords:
    """The recorded scans of one dataset (see the module docstring)."""

    def __init__(self, state: DatasetState, dataset: Dataset) -> None:
        self.state = state
        self.dataset = dataset

    def resume_or_start(
        self, source: DatasetSource, keys: Schema, workers: int | None
    ) -> tuple[ScanPlan, list[PartRecord]]:
        """The recorded scan of an earlier run that fits (others are dropped) with the records of
        the chunks it fetched, or a new one with none."""
        fields = tuple(keys.field_names)
        found: list[ScanPlan] = []
        for k in self.state.storage.list_keys(f"{self.state.folder}/runs/"):
            if not k.endswith("/scan.json"):
                continue
            try:
                doc = self.state.get_json(k)
                where = f"{self.state.storage.url}/{k}"
                plan = None if doc is None else ScanPlan.from_dict(doc, where)
            except StateError as exc:  # only a scan's progress: a new scan replaces it
                logger.warning("%s; scanning anew", exc)
                plan = None
            if plan is not None and self._fits(plan, fields):
                found.append(plan)
            else:
                self.state.drop_run(k.split("/")[-2])
        found.sort(key=lambda p: p.started)
        for stale in found[:-1]:
            self.state.drop_run(stale.scan_id)
        if found:
            plan = found[-1]
            try:
                parts = self.state.part_records(plan.scan_id)
            except StateError as exc:  # as a damaged scan record: the scan starts anew
                logger.warning("%s; scanning anew", exc)
                self.state.drop_run(plan.scan_id)
            else:
                logger.info("%s: resuming key scan %s", self.dataset.name, plan.scan_id)
                return plan, parts
        plan = ScanPlan.start(
            new_batch_id("keyscan"),
            source,
            fields,
            scan_threads(source, workers),
            keys_page(),
        )
        self.record_plan(plan)
        return plan, []

    def _fits(self, plan: ScanPlan, fields: tuple[str, ...]) -> bool:
        try:
            started = datetime.strptime(plan.started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            return False
        age = (datetime.now(UTC) - started).total_seconds() / 3600
        return (
            plan.dataset_id == self.dataset.dataset_id
            and plan.key == self.dataset.key
            and plan.fields == fields
            and 0 <= age < MAX_AGE_HOURS
        )

    def record_plan(self, plan: ScanPlan) -> None:
        self.state.put_run_json(f"{self.state.run_prefix(plan.scan_id)}/scan.json", plan.to_dict())

    def reload(self, plan: ScanPlan, parts: list[PartRecord], spill: KeySpill) -> None:
        """The chunks an earlier run of this scan fetched (`parts`), back into the spill."""
        for rec in parts:
            if rec.path is None:
                continue
            where = f"{self.state.storage.url}/{rec.path}"
            try:
                with self.state.storage.open_reader(rec.path) as f, ipc.open_stream(f) as reader:
                    for chunk in reader:
                        spill.add("source", pa.Table.from_batches([chunk]))
            except (pa.ArrowException, OSError) as exc:
                raise StateError(
                    f"{where}: a key scan chunk unreadable ({exc}); delete "
                    f"{self.state.storage.url}/{self.state.run_prefix(plan.scan_id)}/ to scan again"
                ) from exc
