"""Reconcile: find rows deleted at the source, and rows missing or stale in what landed.

Socrata reports no deletions, so the source's keys are compared with the landed current state:

1. **Scan** every `(key, :id, :updated_at)` of the source over `:id` partitions at once
   (`keyscan.py`), while a thread reads the landed current keys. Both go to a local spill,
   hash-partitioned by key (`keyspill.py`); the source's also go to chunk files under
   `runs/<scan>/keys/`, each recorded in `runs/<scan>/parts/` as a backfill records its files,
   with the plan in `runs/<scan>/scan.json` (`scanrecord.py`). A run stopped by `--max-seconds`
   or the Lambda deadline, interrupted or killed goes on from them the next time: its chunks
   are read back into the spill and only the rest of the source is scanned.
2. **Compare** bucket by bucket: a landed key the source lacks gets a tombstone; a source row
   that is missing from what landed, or whose `:updated_at` differs, is fetched again by `:id`.
   Rows the scan cannot judge are left alone: a landed row changed after the scan started
   (`scan_from`: an update may have landed it since, in a range already scanned), and a source
   row past the watermark (the next update brings it, and counts it).
3. **Commit** the tombstones, then the rows fetched again (file by file, stopping cleanly at the
   deadline; the next run compares again and goes on), each commit with the current state's
   row count, known exactly here since every landed key was read; with nothing to repair, that
   count alone where the manifest's differs (see `counts.py`). The manifest then records that
   the data matched the source as of the scan's start (`Manifest.reconciled`), and the scan's
   records go last.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .current import Landed, current_keys
from .datasets import landed_name
from .errors import RetriesStopped
from .incremental import BatchCommitter, batch_files, open_for_job
from .job import DatasetJob
from .keyscan import KeyScan, ScanPlan, key_schema, scan_threads
from .keyspill import KeySpill, bucket_count
from .manifest import Batch, new_batch_id, utc_now
from .plan import ResumePoint, resume_points
from .refresh import drift, land_new_columns
from .results import DatasetResult, ReconcileCounts
from .scanrecord import Chunks, ScanRecords
from .schema import Column, Schema
from .sink.files import FileRotation

logger = logging.getLogger(__name__)

IDS_PER_QUERY = 100


def _strings(*names: str) -> pa.Schema:
    return pa.schema([pa.field(n, pa.string()) for n in dict.fromkeys(names)])


@dataclass
class _Repairs:
    """What the comparison found, bucket by bucket."""

    vanished: int = 0  # landed rows whose key the source lacks
    missing: list[pa.Array] = field(default_factory=list)  # :ids of rows to land
    stale: list[pa.Array] = field(default_factory=list)  # :ids of rows landed in another version

    @property
    def missing_rows(self) -> int:
        return sum(len(a) for a in self.missing)

    @property
    def stale_rows(self) -> int:
        return sum(len(a) for a in self.stale)


class Reconcile(DatasetJob):
    command = "reconcile"
    status = "reconciled"

    def _run(self, stop: threading.Event, result: DatasetResult) -> None:
        landed = open_for_job(self.state, self.dataset)
        change = drift(landed, self.source)
        if change is not None:
            # the fresh snapshot is the source's whole state, nothing left to reconcile, unless
            # it resumed a run begun earlier: rows deleted since are in it, so keys are compared
            fmt = landed.manifest.current_batches()[-1].format
            land_new_columns(self, change, stop, result, fmt)
            if result.resumed is None or result.status == "stopped":
                return
            landed = open_for_job(self.state, self.dataset)
        keys = key_schema(self.source, (":updated_at",))
        records = ScanRecords(self.state, self.dataset)
        plan, parts = records.resume_or_start(self.source, keys, self.opts.workers)
        resume = resume_points(parts)
        if plan.partitions:
            result.resumed = plan.scan_id
        key = landed.key_column
        source_side = _strings(key, "socrata_id", "socrata_updated_at")
        sides = {"source": source_side, "landed": _strings(key, "socrata_updated_at")}
        expected = max(plan.source_count, landed.manifest.current_rows() or 0)
        with KeySpill(sides, key, bucket_count(expected)) as spill:
            records.reload(plan, parts, spill)

            def read_landed(stop: threading.Event) -> None:
                for table in current_keys(landed, "socrata_updated_at"):
                    if stop.is_set():
                        return
                    spill.add("landed", table)

            scan = KeyScan(
                self.source,
                keys,
                plan,
                workers=scan_threads(self.source, self.opts.workers),
                stop=stop,
                out_of_time=self.opts.out_of_time,
                open_sink=lambda p: Chunks(
                    self.state, scan.plan, p, resume.get(p.index, ResumePoint()), spill, source_side
                ),
                record=records.record_plan,
            )
            complete = scan.run(resume, beside=read_landed)
            if not complete:
                self._stopped(result, stop, "during the key scan")
                return
            landed_rows = spill.rows["landed"]
            logger.info(
                "%s: %d source keys, %d landed; comparing in %d buckets (%.1f MiB spilled)",
                self.dataset.name,
                spill.rows["source"],
                landed_rows,
                spill.buckets,
                spill.bytes_on_disk / (1 << 20),
            )
            repairs = _Repairs()
            fmt = landed.manifest.current_batches()[-1].format
            tombs = self._tombstones(landed, fmt, landed_rows)
            try:
                for bucket in spill.pairs():
                    gone = self._compare(landed, scan.plan, bucket, repairs)
                    tombs.removed = repairs.vanished  # counted before the write may commit
                    tombs.write(gone)
                tombs.files.commit(done=True)
            except BaseException:
                tombs.files.abort()
                raise
        counts = ReconcileCounts(
            vanished=repairs.vanished,
            missing=repairs.missing_rows,
            stale=repairs.stale_rows,
        )
        result.reconciled = counts
        result.files += tombs.files.files
        count = landed_rows - repairs.vanished
        if not self._refetch(landed, fmt, repairs, count, result, stop):
            self._stopped(result, stop, "while fetching rows again")
            return
        self._record_end(landed, landed_rows, counts.changed > 0, plan.started)
        self.state.drop_run(plan.scan_id)

    def _record_end(self, landed: Landed, rows: int, repaired: bool, started: str) -> None:
        """Record in the manifest that the current state matched the source's keys as of the
        scan's start, `started` (keys scanned earlier may have gone since; the daily run
        reconciles a dataset not reconciled since its weekday, `daily.py`); with nothing
        repaired, also the rows it counted where the last commit's count differs (an update
        counts a key deleted and inserted again at the source as new), so that `status` agrees
        again."""
        manifest = landed.manifest
        last = manifest.current_batches()[-1]
        if not repaired and last.kind != "snapshot" and last.current_rows != rows:
            logger.info(
                "%s: the current state holds %d rows; the manifest said %s: recorded",
                self.dataset.name,
                rows,
                last.current_rows,
            )
            last.current_rows = rows
        manifest.reconciled = max(manifest.reconciled, started)
        self.state.commit(manifest)

    def _stopped(self, result: DatasetResult, stop: threading.Event, when: str) -> None:
        result.status = "stopped"
        why = "stop" if stop.is_set() else "time budget"
        result.message = f"stopped {when} ({why}); the next run goes on from its recorded progress"

    # -- compare and commit ----------------------------------------------------------------------

    def _compare(
        self, landed: Landed, plan: ScanPlan, bucket: dict[str, pa.Table], repairs: _Repairs
    ) -> pa.Array:
        """One bucket: record what to fetch again; returns the keys to tombstone."""
        key = landed.key_column
        src, mine = bucket["source"], bucket["landed"]
        src_keys, mine_keys = src.column(key), mine.column(key)
        mine_at = mine.column("socrata_updated_at")
        # a landed row changed after the scan started may be newer than what the scan saw
        judged = (
            pc.fill_null(pc.less_equal(mine_at, plan.scan_from), True)
            if plan.scan_from is not None
            else pa.array(np.ones(len(mine), dtype=bool))
        )
        gone = pc.and_(pc.invert(pc.is_in(mine_keys, value_set=src_keys)), judged)
        repairs.vanished += int(pc.sum(gone).as_py() or 0)
        # each source row's landed version (of the first landed row of its key): `index_in`
        # hashes one side, far lighter than a join of both
        at = pc.index_in(src_keys, value_set=mine_keys)
        src_at = src.column("socrata_updated_at")
        due = self._due(landed, src_at)
        absent = pc.is_null(at)
        differs = pc.and_(
            pc.not_equal(src_at, mine_at.take(at)), pc.fill_null(judged.take(at), False)
        )
        ids = src.column("socrata_id")
        repairs.missing.append(ids.filter(pc.and_(absent, due)).combine_chunks())
        stale = pc.fill_null(pc.and_(differs, due), False)
        repairs.stale.append(ids.filter(stale).combine_chunks())
        return pc.unique(mine_keys.filter(gone))

    def _due(self, landed: Landed, src_at: pa.ChunkedArray) -> pa.Array:
        """Source rows at or before the watermark: those a reconcile repairs (later ones are the
        next update's, which counts them as it lands them)."""
        mark = landed.manifest.watermark
        if mark is None:
            return pc.is_valid(src_at)
        at = pa.scalar(mark.updated_at, pa.string())
        due = pc.less(src_at, at) if mark.row_id is not None else pc.less_equal(src_at, at)
        return pc.fill_null(due, True)

    def _tombstones(self, landed: Landed, fmt: str, before: int) -> _Tombstones:
        col = next(c for c in landed.schema.columns if c.name == landed.key_column)
        key = (Column(col.field_name, col.data_type),)
        schema = Schema(key, landed.schema.integer_fields, landed.schema.text_fields)
        batch = Batch(new_batch_id("tombstones"), "tombstones", fmt, utc_now(), [], 0)
        tombs = _Tombstones(landed_name(col.field_name), before)
        committer = BatchCommitter(landed, batch, watermark=False, count=tombs.current)
        tombs.files = batch_files(self.state, schema, batch, self.opts.file_rows, committer)
        return tombs

    def _refetch(
        self,
        landed: Landed,
        fmt: str,
        repairs: _Repairs,
        count: int,
        result: DatasetResult,
        stop: threading.Event,
    ) -> bool:
        """Land the rows to fetch again, by `:id`; False when stopped before the end."""
        lists = [(a, True) for a in repairs.missing] + [(a, False) for a in repairs.stale]
        chunks = [
            (ids.slice(i, IDS_PER_QUERY).to_pylist(), new)
            for ids, new in lists
            for i in range(0, len(ids), IDS_PER_QUERY)
        ]
        if not chunks:
            return True
        batch = Batch(
            new_batch_id("repair"), "update", fmt, utc_now(), [], 0, info={"reason": "reconcile"}
        )
        added = 0
        committer = BatchCommitter(landed, batch, watermark=False, count=lambda: count + added)
        files = batch_files(self.state, landed.schema, batch, self.opts.file_rows, committer)
        workers = scan_threads(self.source, self.opts.workers)
        finished = True
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="refetch") as pool:
                for start in range(0, len(chunks), workers):
                    if stop.is_set() or self.opts.out_of_time():
                        finished = False
                        break
                    group = chunks[start : start + workers]
                    try:
                        tables = list(
                            pool.map(lambda c: self.source.rows_by_id(landed.schema, c[0]), group)
                        )
                    except RetriesStopped:  # a stop: the rows fetched so far are committed
                        finished = False
                        break
                    for (_, new), table in zip(group, tables, strict=True):
                        if new:
                            added += pc.count_distinct(table.column(landed.key_column)).as_py()
                        files.write(table)
            files.commit(done=finished)
        except BaseException:
            files.abort()
            raise
        result.rows += batch.rows
        result.files += len(batch.files)
        return finished


class _Tombstones:
    """The tombstone batch as it is written bucket by bucket, with the count each commit gives."""

    def __init__(self, column: str, before: int) -> None:
        self.column = column
        self.before = before
        self.removed = 0  # landed rows the keys written so far remove
        self.files: FileRotation

    def write(self, keys: pa.Array) -> None:
        if len(keys):
            self.files.write(pa.table({self.column: keys}))

    def current(self) -> int:
        return self.before - self.removed
