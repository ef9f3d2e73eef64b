"""Daily updates, reconciliation and compaction: keep the landed current state equal to the source.

- `Update` fetches every row whose (`:updated_at`, `:id`) is past the stored watermark, keyset-paged
  in that order up to the source's latest `:updated_at` at the start, into a new batch. The batch
  is committed through the manifest file by file, each commit moving the watermark to the last row
  of the files it names: a run killed at any point loses nothing (the next run starts from the
  watermark) and duplicates nothing in the current state (a key's latest version wins). When most
  rows changed (a publisher's full replace), or 100 batches were landed since the last snapshot,
  it lands a fresh snapshot instead, the way a backfill does: over partitions fetched at once
  rather than one stream ordered by `:updated_at`.
- `Reconcile` (in `reconcile.py`) finds deletions and gaps by comparing keys.
- `compact` (in `compact.py`) writes the current state as a fresh snapshot batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pyarrow as pa

from .counts import NewRows
from .current import Landed, open_landed
from .daemon import DaemonCalls
from .datasets import Dataset
from .errors import NothingLanded, SchemaError, SourceError
from .job import DatasetJob, RunOptions
from .manifest import EPOCH, Batch, Watermark, new_batch_id, utc_now
from .refresh import drift, drifted_meanwhile, land_fresh, land_new_columns
from .results import DatasetResult
from .schema import Schema
from .sink.files import FileEntry, FileRotation, OnFile
from .sink.storage import Storage
from .socrata import soql
from .socrata.client import SodaClient
from .state import DatasetState

logger = logging.getLogger(__name__)

# An update lands a fresh snapshot instead when the rows changed, with those landed since the
# last snapshot, pass this share of it (a publisher's full replace, or many updates' worth):
# every row fetched over partitions at once then takes less time than the changes in one
# ordered stream, and the current state's readers hold the later batches' keys in memory.
REFRESH_SHARE = 0.5
# ... or when this many batches were landed since it (about three months of daily updates and
# weekly reconciles): every reader of the current state reads each batch's files, so a dataset
# left running for years keeps a bounded number of them.
REFRESH_BATCHES = 100


def open_for_job(state: DatasetState, dataset: Dataset) -> Landed:
    """What landed, for a command that needs it (an unfinished backfill is said as such)."""
    storage = state.storage
    try:
        return open_landed(storage, dataset, state)
    except NothingLanded:
        if state.unfinished_runs(state.load()):
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


class BatchCommitter:
    """Commits a batch through the manifest file by file (`FileRotation.on_file`), with the
    current state's row count that `count` gives for each commit (see `counts.py`)."""

    def __init__(
        self,
        landed: Landed,
        batch: Batch,
        watermark: bool,
        count: Callable[[], int | None] | None = None,
    ) -> None:
        self.landed = landed
        self.batch = batch
        self.watermark = watermark
        self.count = count
        self.committed = False

    def __call__(self, entry: FileEntry | None, last: pa.Table | None, done: bool) -> None:
        if entry is None:
            if done and self.watermark and self.committed and not self.batch.info.get("done"):
                # its rows filled its last file exactly: the end's commit has no file, but the
                # batch got to its end
                self.batch.info["done"] = True
                self.landed.state.commit(self.landed.manifest)
            return
        self.batch.current_rows = None if self.count is None else self.count()
        self.batch.files.append(entry)
        self.batch.rows += entry.rows
        self.batch.committed_at = utc_now()
        if self.watermark and last is not None:
            self.batch.watermark = Watermark(
                last.column("socrata_updated_at")[0].as_py(), last.column("socrata_id")[0].as_py()
            )
        if self.watermark:
            self.batch.info["done"] = done  # got to its end: see `counts.recent_window`
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
        landed = open_for_job(self.state, self.dataset)
        watermark = landed.manifest.watermark or Watermark(EPOCH)
        fmt = self.fmt or landed.manifest.current_batches()[-1].format
        # the changes end at the latest `:updated_at`: asked beside the metadata
        latest = DaemonCalls().submit(self.source.max_updated_at)
        change = drift(landed, self.source)
        if change is not None:
            land_new_columns(self, change, stop, result, fmt)
            self._catch_up(latest.result, fmt, stop, result)
            return
        until = latest.result()
        if until is not None and self._refresh_instead(landed, watermark, until, result):
            land_fresh(self, stop, result, fmt)
            if result.status == "stopped":  # counted by the run that commits it
                result.changed = 0
            self._catch_up(lambda: until, fmt, stop, result)
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

    def _catch_up(
        self,
        until_of: Callable[[], str | None],
        fmt: str,
        stop: threading.Event,
        result: DatasetResult,
    ) -> None:
        """After a fresh snapshot that resumed a run begun earlier (it holds the source as of
        that run's start): land the rows changed since, up to the update's end (`until_of`),
        as a batch of changes, so that the update reaches what it set out to. Left to the next
        update when that end is unknown, or when those rows are so many that it would land a
        fresh snapshot for them (`_refresh_instead`)."""
        if result.resumed is None or result.status == "stopped":
            return
        landed = open_for_job(self.state, self.dataset)
        watermark = landed.manifest.watermark or Watermark(EPOCH)
        more = DatasetResult(self.dataset.name, self.status, location=result.location)
        try:  # a stop goes through: the update then says it stopped
            until = until_of()
            if until is None:
                return
            refresh = self._refresh_instead(landed, watermark, until, more)
        except SourceError as exc:
            logger.warning("%s: the snapshot is committed (%s)", self.dataset.name, exc)
            result.message += "; the rows changed since its run began wait for the next update"
            return
        if refresh:
            result.message += (
                "; so many rows changed since its run began that the next update lands a "
                "fresh snapshot for them"
            )
            return
        self._changes(landed, watermark, until, fmt, stop, more)
        result.rows, result.files = result.rows + more.rows, result.files + more.files
        result.bytes += more.bytes
        result.watermark = more.watermark
        if more.rows:
            result.message += f"; then {more.rows:,} rows changed since its run began"
        if more.status == "stopped":
            result.status, result.message = "stopped", more.message

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
        counter = NewRows(landed, watermark)
        committer = BatchCommitter(landed, batch, watermark=True, count=counter.current)
        files = batch_files(self.state, landed.schema, batch, self.opts.file_rows, committer)
        cursor = watermark

        def params() -> dict[str, str]:
            return self.source.changes_params(after=cursor, limit=self.opts.page_size, until=until)

        def emit(table: pa.Table) -> None:
            nonlocal cursor
            counter.add(table)
            files.write(table)
            cursor = Watermark(
                table.column("socrata_updated_at")[-1].as_py(),
                table.column("socrata_id")[-1].as_py(),
            )

        def stopped() -> bool:
            return stop.is_set() or self.opts.out_of_time()

        try:
            if until is not None:
                done = self.source.page_until_empty(
                    # dropped where it is on a stop: the rows emitted so far are whole, committed
                    lambda: self.source.page(landed.schema, params, emit, cancelled=stopped),
                    lambda: _changed_after(cursor, until),
                    asked=lambda: self.opts.page_size,
                    stopped=stopped,
                )
                files.commit(done=done)
                if not done:
                    result.status = "stopped"
                    result.message = "stopped before the end; the next run goes on"
        except BaseException:
            files.abort()
            raise
        result.rows, result.files, result.bytes = (
            batch.rows,
            len(batch.files),
            files.landed_bytes,
        )
        result.batch_id = batch.batch_id if committer.committed else None
        result.watermark = landed.manifest.watermark

    def _refresh_instead(
        self, landed: Landed, watermark: Watermark, until: str, result: DatasetResult
    ) -> bool:
        """Whether the rows changed since the watermark, with those landed since the snapshot,
        pass `REFRESH_SHARE` of it (one count request to know): a fresh snapshot then replaces
        them, so that updates never make readers of the current state (export, verify,
        reconcile) hold more keys of later batches than that share of the snapshot's (see
        `current._winners`); or whether `REFRESH_BATCHES` were landed since it."""
        snapshot, *later = landed.manifest.current_batches()
        many = len(later) >= REFRESH_BATCHES
        if not many and self.opts.workers is not None and self.opts.workers < 2:
            return False  # one stream of changes is as fast as a snapshot with one worker
        since = sum(b.rows for b in later)
        changed = self.source.count(_changed_after(watermark, until))
        if many:
            result.message = (
                f"{len(later):,} batches landed since the last snapshot: landed a fresh snapshot "
                "over partitions, as a backfill does (the current state's readers read each "
                "batch)"
            )
        elif not snapshot.rows or changed + since <= REFRESH_SHARE * snapshot.rows:
            return False
        else:
            result.message = (
                f"{changed:,} rows changed since the watermark and {since:,} landed since the "
                f"last snapshot, against its {snapshot.rows:,}: landed a fresh snapshot over "
                "partitions, as a backfill does"
            )
        result.changed = changed  # of the snapshot's rows, those the source changed
        result.refreshed = True
        logger.info("%s: %s", self.dataset.name, result.message)
        return True
