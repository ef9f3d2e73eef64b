"""Backfill: land every row of each dataset as a snapshot (`snapshot.py` lands it).

A backfill of one dataset takes the dataset's lease (`job.py`) and reads its manifest: a
committed snapshot is not landed twice unless `force`; an unfinished run of an earlier
invocation is resumed from its committed files (unless rows were removed since it began:
`snapshot.py`). Leftovers of killed runs are removed after it
(`tidy`, as after every command that writes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .datasets import Dataset
from .errors import AlreadyLanded, NycCollisionsError
from .job import DEFAULT_FILE_ROWS, DEFAULT_PAGE_SIZE, DatasetJob, RunOptions
from .results import DatasetResult
from .sink.storage import Storage
from .snapshot import land_snapshot
from .socrata.client import SodaClient


class Backfill(DatasetJob):
    """Backfill one dataset into `storage` (see the module docstring)."""

    command = "backfill"
    status = "landed"

    def _run(self, stop: threading.Event, result: DatasetResult) -> None:
        manifest = self.manifest
        if manifest and manifest.current_batches() and not self.opts.force:
            self.sync_table()  # the table of a landed dataset, written (or healed) anyway
            snap = manifest.current_batches()[0]
            rows = manifest.current_rows()
            now = "" if rows is None or rows == snap.rows else f"; {rows:,} rows now"
            raise AlreadyLanded(
                f"{self.dataset.name}: a backfill is already committed at "
                f"{result.location} ({snap.rows:,} rows, {snap.committed_at}{now}); "
                "`nyc-collisions update` keeps it fresh, --force lands a new snapshot"
            )
        land_snapshot(self, stop, result, self.opts.fmt)


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
        result = backfill_one(client, storage, ds, opts, stop)
        results.append(result)
        if on_result:
            on_result(result)
        if result.status == "stopped":
            break
    return results


def backfill_one(
    client: SodaClient, storage: Storage, ds: Dataset, opts: RunOptions, stop: threading.Event
) -> DatasetResult:
    """Backfill one dataset into `storage`, known to be writable; "skipped" when landed."""
    job = Backfill(client, storage, ds, opts)
    try:
        return job.run(stop)
    except AlreadyLanded as exc:
        result = DatasetResult(
            ds.name, "skipped", message=str(exc), location=f"{storage.url}/{ds.name}/"
        )
        result.table_error = job.table_error  # the landed dataset's table, synced anyway
        return result


__all__ = [
    "DEFAULT_FILE_ROWS",
    "DEFAULT_PAGE_SIZE",
    "Backfill",
    "DatasetJob",
    "DatasetResult",
    "NycCollisionsError",
    "RunOptions",
    "backfill",
    "backfill_one",
]
