"""Daily updates, reconciliation and compaction: keep the landed current state equal to the source.

- `Update` fetches every row whose (`:updated_at`, `:id`) is past the stored watermark, keyset-paged
  in that order up to the source's latest `:updated_at` at the start, into a new batch. The batch
  is committed through the manifest file by file, each commit moving the watermark to the last row
  of the files it names: a run killed at any point loses nothing (the next run starts from the
  watermark) and duplicates nothing in the current state (a key's latest version wins). When most
  rows changed (a publisher's full replace), it lands a fresh snapshot instead, the way a backfill
  does: over `workers` partitions at once rather than one stream ordered by `:updated_at`.
- `Reconcile` compares the source's full key set (keys only, keyset-paged) with the landed current
  state: keys that vanished get tombstones, keys that are missing or whose `:updated_at` differs
  are fetched again by `:id`. Socrata reports no deletions; this is how they are seen.
- `compact` writes the current state as a fresh snapshot batch (and, with `prune`, forgets the
  batches it supersedes; their files are deleted once `grace_hours` have passed, so that readers
  still holding the previous manifest can finish).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .current import Landed, current_keys, iter_current, open_landed
from .datasets import Dataset, landed_name
from .errors import NothingLanded, SchemaError
from .extract import DatasetJob, DatasetResult, RunOptions
from .lease import Lease
from .refresh import drift, drifted_meanwhile, land_new_columns, land_snapshot
from .schema import Column, Schema
from .sink.files import FileEntry, FileRotation, OnFile
from .sink.storage import Storage
from .socrata import soql
from .socrata.client import SodaClient
from .state import Batch, DatasetState, Retired, Watermark, new_batch_id, utc_now
from .tidy import retire_after, tidy

logger = logging.getLogger(__name__)

KEYS_PAGE = 100_000
IDS_PER_QUERY = 100
# An update lands a fresh snapshot instead when more rows changed than this share of the last
# snapshot: fetching every row over the partitions in parallel is then faster than the changes
# in one stream (3 server slots against 1: break-even near a third).
REFRESH_SHARE = 0.5
# `compact --prune` keeps the files it supersedes this long for readers of the previous manifest
DEFAULT_GRACE_HOURS = 24.0


def _open(state: DatasetState, dataset: Dataset) -> Landed:
    storage = state.storage
    try:
        return open_landed(storage, dataset, state)
    except NothingLanded:
        if state.unfinished_runs():
            raise NothingLanded(
                f"{dataset.name}: the backfill at {storage.url}/{dataset.name}/ has not finished; "
                f"run `nyc-collisions backfill {dataset.name}` again to complete it"
            ) from None
        raise


def batch_files(
    state: DatasetState, schema: Schema, batch: Batch, file_rows: int, on_file: OnFile
) -> FileRotation:
    """The files of a single-stream batch: `data/<batch>/part-0000-SSSSSS.<fmt>`."""
    return FileRotation(
        state.storage,
        schema,
        batch.format,
        file_rows,
        lambda seq: state.data_key(batch.batch_id, 0, seq, batch.format),
        0,
        on_file,
    )


def _changed_after(mark: Watermark, until: str) -> str:
    """The `$where` of the rows past `mark` up to `until` (what an update fetches)."""
    return soql.incremental_params(
        updated_at=mark.updated_at, row_id=mark.row_id, limit=1, until=until
    )["$where"]


class _BatchCommitter:
    """Commits a batch through the manifest file by file (`FileRotation.on_file`)."""

    def __init__(self, landed: Landed, batch: Batch, watermark: bool) -> None:
        self.landed = landed
        self.batch = batch
        self.watermark = watermark
        self.committed = False

    def __call__(self, entry: FileEntry | None, last: pa.Table | None, done: bool) -> None:
        if entry is None:
            return
        self.batch.files.append(entry)
        self.batch.rows += entry.rows
        self.batch.committed_at = utc_now()
        if self.watermark and last is not None:
            self.batch.watermark = Watermark(
                last.column("socrata_updated_at")[0].as_py(), last.column("socrata_id")[0].as_py()
            )
        if not self.committed:
            self.landed.manifest.batches.append(self.batch)
            self.committed = True
        self.landed.state.commit(self.landed.manifest)


class Update(DatasetJob):
    command = "update"
    status = "updated"

    def __init__(
        self,
        client: SodaClient,
        storage: Storage,
        dataset: Dataset,
        opts: RunOptions,
        fmt: str | None = None,
    ) -> None:
        super().__init__(client, storage, dataset, opts)
        self.fmt = fmt

    def _run(self, stop: threading.Event, result: DatasetResult) -> None:
        landed = _open(self.state, self.dataset)
        watermark = landed.manifest.watermark or Watermark("1970-01-01T00:00:00.000Z")
        result.extra["watermark_before"] = watermark.__dict__
        fmt = self.fmt or landed.manifest.current_batches()[-1].format
        change = drift(landed, self.source)
        if change is not None:
            land_new_columns(self, change, stop, result, fmt)
            return
        until = self.source.max_updated_at()
        if until is not None and self._refresh_instead(landed, watermark, until, result):
            land_snapshot(self, stop, result, fmt)
            return
        try:
            self._changes(landed, watermark, until, fmt, stop, result)
        except SchemaError:
            # a page carried other columns than the metadata named: if they changed since the
            # run read it, land them as above (else the source is inconsistent: fail)
            change = drifted_meanwhile(self, landed)
            if change is None:
                raise
            land_new_columns(self, change, stop, result, fmt)

    def _changes(
        self,
        landed: Landed,
        watermark: Watermark,
        until: str | None,
        fmt: str,
        stop: threading.Event,
        result: DatasetResult,
    ) -> None:
        """Land the rows changed past `watermark` up to `until` as one batch of changes."""
        batch = Batch(
            new_batch_id("update"),
            "update",
            fmt,
            utc_now(),
            [],
            0,
            watermark=watermark,
            info={"until": until},
        )
        committer = _BatchCommitter(landed, batch, watermark=True)
        files = batch_files(self.state, landed.schema, batch, self.opts.file_rows, committer)
        cursor = watermark

        def params() -> dict[str, str]:
            return self.source.changes_params(after=cursor, limit=self.opts.page_size, until=until)

        def emit(table: pa.Table) -> None:
            nonlocal cursor
            files.write(table)
            cursor = Watermark(
                table.column("socrata_updated_at")[-1].as_py(),
                table.column("socrata_id")[-1].as_py(),
            )

        empty = 0
        try:
            while until is not None:
                if stop.is_set() or self.opts.out_of_time():
                    files.commit(done=False)
                    result.status = "stopped"
                    result.message = "stopped before the end; the next run goes on"
                    break
                if self.source.stream_rows(landed.schema, params, emit) > 0:
                    empty = 0
                    continue
                empty += 1
                if self.source.confirm_empty(_changed_after(cursor, until), empty):
                    files.commit(done=True)
                    break
        except BaseException:
            files.abort()
            raise
        result.rows, result.files, result.bytes = (
            batch.rows,
            len(batch.files),
            files.landed_bytes,
        )
        result.batch_id = batch.batch_id if committer.committed else None
        wm = landed.manifest.watermark
        result.extra["watermark"] = None if wm is None else wm.__dict__

    def _refresh_instead(
        self, landed: Landed, watermark: Watermark, until: str, result: DatasetResult
    ) -> bool:
        """Whether most rows changed since the watermark (one count request to know)."""
        if self.opts.workers < 2:
            return False
        snapshot_rows = landed.manifest.current_batches()[0].rows
        changed = self.source.count(_changed_after(watermark, until))
        if not snapshot_rows or changed <= REFRESH_SHARE * snapshot_rows:
            return False
        result.message = (
            f"{changed:,} rows changed since the watermark, against {snapshot_rows:,} in the "
            f"last snapshot: landed a fresh snapshot over {self.opts.workers} partitions"
        )
        result.extra["refreshed"] = True
        logger.info("%s: %s", self.dataset.name, result.message)
        return True


class Reconcile(DatasetJob):
    command = "reconcile"
    status = "reconciled"

    def _source_keys(self) -> pa.Table:
        keys = self.source.all_keys(extra=(":updated_at",), page=KEYS_PAGE)
        return pa.table(
            {
                "key": keys.column(self.dataset.key),
                "id": keys.column(":id"),
                "updated_at": keys.column(":updated_at"),
            }
        )

    def _landed_keys(self, landed: Landed) -> pa.Table:
        tables = list(current_keys(landed, "socrata_updated_at"))
        if not tables:
            return pa.table(
                {"key": pa.array([], pa.string()), "updated_at": pa.array([], pa.string())}
            )
        t = pa.concat_tables(tables)
        return pa.table(
            {"key": t.column(landed.key_column), "updated_at": t.column("socrata_updated_at")}
        )

    def _run(self, stop: threading.Event, result: DatasetResult) -> None:
        landed = _open(self.state, self.dataset)
        change = drift(landed, self.source)
        if change is not None:
            # the fresh snapshot is the source's whole state: nothing is left to reconcile
            fmt = landed.manifest.current_batches()[-1].format
            land_new_columns(self, change, stop, result, fmt)
            return
        src = self._source_keys()
        mine = self._landed_keys(landed)
        vanished = pc.filter(
            mine.column("key"),
            pc.invert(pc.is_in(mine.column("key"), value_set=src.column("key"))),
        )
        joined = src.join(mine, "key", join_type="left outer", right_suffix="_landed")
        refetch = (
            joined.filter(
                pc.or_kleene(
                    pc.is_null(joined.column("updated_at_landed")),
                    pc.not_equal(joined.column("updated_at"), joined.column("updated_at_landed")),
                )
            )
            .column("id")
            .to_pylist()
        )
        missing = int(pc.sum(pc.is_null(joined.column("updated_at_landed"))).as_py() or 0)
        result.extra.update(vanished=len(vanished), missing=missing, stale=len(refetch) - missing)
        fmt = landed.manifest.current_batches()[-1].format
        if refetch:
            batch = Batch(
                new_batch_id("repair"),
                "update",
                fmt,
                utc_now(),
                [],
                0,
                info={"reason": "reconcile"},
            )
            committer = _BatchCommitter(landed, batch, watermark=False)
            files = batch_files(self.state, landed.schema, batch, self.opts.file_rows, committer)
            try:
                for start in range(0, len(refetch), IDS_PER_QUERY):
                    ids = refetch[start : start + IDS_PER_QUERY]
                    files.write(self.source.rows_by_id(landed.schema, ids))
                files.commit(done=True)
            except BaseException:
                files.abort()
                raise
            result.rows += batch.rows
            result.files += len(batch.files)
        if len(vanished):
            self._tombstones(landed, vanished, fmt)
            result.files += 1
        result.extra["tombstones"] = len(vanished)

    def _tombstones(self, landed: Landed, keys: pa.Array, fmt: str) -> None:
        key_col = next(c for c in landed.schema.columns if c.name == landed.key_column)
        schema = Schema(
            (Column(key_col.field_name, key_col.data_type),), landed.schema.integer_fields
        )
        batch = Batch(new_batch_id("tombstones"), "tombstones", fmt, utc_now(), [], 0)
        committer = _BatchCommitter(landed, batch, watermark=False)
        files = batch_files(self.state, schema, batch, max(len(keys), 1), committer)
        files.write(pa.table({landed_name(key_col.field_name): keys}))
        files.commit(done=True)


def compact(
    storage: Storage,
    dataset: Dataset,
    *,
    prune: bool,
    file_rows: int,
    fmt: str | None = None,
    grace_hours: float = DEFAULT_GRACE_HOURS,
) -> DatasetResult:
    """Write the current state as a new snapshot batch; with `prune`, forget what it supersedes
    and delete its files after `grace_hours` (at once with 0)."""
    started = time.monotonic()
    state = DatasetState(storage, dataset.name)
    result = DatasetResult(dataset.name, "compacted", location=f"{storage.url}/{dataset.name}/")
    try:
        with Lease(storage, dataset.name, "compact") as lease:
            state.lease = lease
            _compact(state, dataset, prune, file_rows, fmt, grace_hours, result)
            lease.check()
            lease.finished()
            tidy(state, lease, drop_unfinished=False)
    finally:
        result.seconds = time.monotonic() - started
    return result


def _compact(
    state: DatasetState,
    dataset: Dataset,
    prune: bool,
    file_rows: int,
    fmt: str | None,
    grace_hours: float,
    result: DatasetResult,
) -> None:
    landed = _open(state, dataset)
    manifest = landed.manifest
    fmt = fmt or manifest.current_batches()[-1].format
    batch = Batch(
        new_batch_id("compact"),
        "snapshot",
        fmt,
        utc_now(),
        [],
        0,
        watermark=manifest.watermark,
        info={"compacted": [b.batch_id for b in manifest.current_batches()]},
    )
    entries: list[FileEntry] = []

    def collect(entry: FileEntry | None, _last: Any, _done: bool) -> None:
        if entry is not None:
            entries.append(entry)

    files = batch_files(state, landed.schema, batch, file_rows, collect)
    try:
        for table in iter_current(landed):
            files.write(table)
        files.commit(done=True)
    except BaseException:
        files.abort()
        raise
    batch.files = entries
    batch.rows = sum(e.rows for e in entries)
    batch.source_count = None
    old = list(manifest.batches)
    if prune:
        # one commit: the new snapshot alone; the old files retired, deleted after the grace
        for b in old:
            state.drop_run(b.batch_id)  # a run record left by a kill must not look resumable
        manifest.batches = [batch]
        if grace_hours > 0:
            until = retire_after(grace_hours)
            manifest.retired += [Retired(f.path, until) for b in old for f in b.files]
        result.extra["pruned_batches"] = len(old)
    else:
        manifest.batches.append(batch)
    state.commit(manifest)
    result.rows, result.files = batch.rows, len(entries)
    result.bytes = sum(e.bytes for e in entries)
    result.batch_id = batch.batch_id
    # with no grace, the old files are no longer named by the manifest: `tidy` deletes them
