"""`compact`: write the current state as a fresh snapshot batch (and, with `prune`, forget the
batches it supersedes; their files are deleted once `grace_hours` have passed, so that readers
still holding the previous manifest can finish)."""

from __future__ import annotations

import time
from typing import Any

import pyarrow.compute as pc

from .counts import recent_window
from .current import iter_current
from .datasets import Dataset
from .incremental import batch_files, open_for_job
from .lease import Lease
from .manifest import Batch, Retired, new_batch_id, utc_now
from .results import DatasetResult
from .sink.files import FileEntry
from .sink.storage import Storage
from .state import DatasetState
from .tidy import DEFAULT_GRACE_HOURS, retire_after, tidy


def compact(
    storage: Storage,
    dataset: Dataset,
    *,
    prune: bool,
    file_rows: int,
    fmt: str | None = None,
    grace_hours: float = DEFAULT_GRACE_HOURS,
    table: str | None = None,
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
            if table:
                from .table import TableError, compact_table

                try:
                    compact_table(
                        storage,
                        dataset,
                        state,
                        prune=prune,
                        grace_hours=grace_hours,
                        check=lease.check,
                    )
                except TableError as exc:
                    result.table_error = str(exc)
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
    landed = open_for_job(state, dataset)
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
    since, _ = recent_window(manifest)  # rows the last updates may have skipped: counts.py
    if since is not None:
        batch.info["recent_since"] = since
    entries: list[FileEntry] = []
    latest = ""  # the latest `:updated_at` it holds: no row of it was created after that

    def collect(entry: FileEntry | None, _last: Any, _done: bool) -> None:
        if entry is not None:
            entries.append(entry)

    files = batch_files(state, landed.schema, batch, file_rows, collect)
    try:
        for table in iter_current(landed):
            files.write(table)
            latest = max(latest, pc.max(table.column("socrata_updated_at")).as_py() or "")
        files.commit(done=True)
    except BaseException:
        files.abort()
        raise
    batch.files = entries
    batch.rows = sum(e.rows for e in entries)
    batch.source_count = None
    if latest:
        batch.info["ahead_until"] = latest
    old = list(manifest.batches)
    # the snapshot from the source it may prune counted as a reconcile: kept as one
    manifest.reconciled = manifest.last_reconciled()
    if prune:
        # one commit: the new snapshot alone; the old files retired, deleted after the grace
        for b in old:
            state.drop_run(b.batch_id)  # a run record left by a kill must not look resumable
        manifest.batches = [batch]
        if grace_hours > 0:
            until = retire_after(grace_hours)
            manifest.retired += [Retired(f.path, until) for b in old for f in b.files]
        result.pruned_batches = len(old)
    else:
        manifest.batches.append(batch)
    state.commit(manifest)
    result.rows, result.files = batch.rows, len(entries)
    result.bytes = sum(e.bytes for e in entries)
    result.batch_id = batch.batch_id
    # with no grace, the old files are no longer named by the manifest: `tidy` deletes them
