"""One command on one dataset: its options, its lease, what it measured, cleanup after it.

`DatasetJob.run` holds the dataset's lease while the command's `_run` works, counts the requests
and bytes it cost into the `DatasetResult`, and removes what killed runs left (`tidy`) before it
gives the lease back. Backfill, update and reconcile are jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from .datasets import Dataset
from .errors import RetriesStopped, UsageError, WaitStopped
from .lease import Lease
from .manifest import Manifest
from .results import DatasetResult
from .settings import MAX_IN_FLIGHT
from .sink.formats import check_format
from .sink.storage import Storage
from .socrata.client import SodaClient
from .source import DatasetSource
from .state import DatasetState
from .tidy import tidy

logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50_000
DEFAULT_FILE_ROWS = 500_000

MAX_PAGE_ROWS = 10_000_000  # SODA 2.1 has no cap, but pages this large time out
MAX_FILE_ROWS = 1_000_000_000


@dataclass(frozen=True)
class RunOptions:
    fmt: str = "csv"
    workers: int | None = None  # a fixed number of requests in flight; None: found at run time
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
        if self.workers is not None and not 1 <= self.workers <= MAX_IN_FLIGHT:
            raise UsageError(f"--workers must be from 1 to {MAX_IN_FLIGHT}, not {self.workers}")
        if not 1 <= self.page_size <= MAX_PAGE_ROWS:
            raise UsageError(
                f"--page-size must be from 1 to {MAX_PAGE_ROWS:,} rows, not {self.page_size}"
            )
        if not 1 <= self.file_rows <= MAX_FILE_ROWS:
            raise UsageError(
                f"--file-rows must be from 1 to {MAX_FILE_ROWS:,}, not {self.file_rows}"
            )


class DatasetJob:
    """One command on one dataset: holds its lease, measures what it did, and cleans up after
    killed runs before it gives the lease back (`tidy`)."""

    command = ""
    status = ""
    snapshot_committed = False  # a new snapshot supersedes unfinished backfills too
    table_error: str | None = None  # why the table's sync failed (the landed data committed)
    manifest: Manifest | None = None  # as read under the lease when the run began

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
        lease = Lease(self.storage, self.dataset.name, self.command, stop, self.opts.deadline)
        try:
            with lease:
                self.state.lease = lease
                try:
                    self.manifest = manifest = self.state.load()
                    if manifest is not None:
                        self.keyed_as_landed(manifest.key)
                    self._run_until_stopped(stop, result)
                    lease.check()  # a lease lost during the run fails it; during cleanup, not
                    self.sync_table()
                    result.table_error = self.table_error
                    lease.check()  # (a lease lost during the table's sync too)
                    lease.finished()
                    tidy(self.state, lease, drop_unfinished=self.snapshot_committed)
                finally:
                    self.state.end_run()  # no late worker writes once the lease is given back
        except WaitStopped as exc:  # nothing done: a rerun watches the stale lease again
            logger.warning("%s", exc)
            result.status = "stopped"
            result.message = str(exc)
        finally:
            result.requests = self.client.stats.requests - requests0
            result.wire_bytes = self.client.stats.bytes - bytes0
            result.seconds = time.monotonic() - started
        return result

    def _run_until_stopped(self, stop: threading.Event, result: DatasetResult) -> None:
        """`_run`, with the source's retries given up once the run has to stop: a stop or its
        time budget then ends it within a moment even while the source keeps failing."""

        def stopping() -> bool:
            return stop.is_set() or self.opts.out_of_time()

        with self.client.stopping_when(stopping, self.opts.deadline):
            try:
                self.source.check_key()
                self._run(stop, result)
            except RetriesStopped as exc:
                logger.info("%s: %s", self.dataset.name, exc)
                result.status = "stopped"
                why = "stop" if stop.is_set() else "time budget"
                result.message = (
                    f"stopped before the end ({why}) while the source was failing; "
                    "a rerun goes on from what is committed"
                )

    def sync_table(self) -> None:
        """With a table format: bring the dataset's table up to its manifest (table.py), under
        the lease and within the run's time. The table's own failure is recorded in
        `table_error` (the run goes on to the next dataset, and ends with it as an error)."""
        if not self.opts.table:
            return
        from .table import TableError, sync_table

        lease = self.state.lease
        try:
            sync_table(
                self.storage,
                self.dataset,
                self.state,
                check=None if lease is None else lease.check,
                deadline=self.opts.deadline,
            )
        except TableError as exc:
            logger.info("%s: %s", self.dataset.name, exc)
            self.table_error = str(exc)

    def keyed_as_landed(self, key: str) -> None:
        """Work with the key the dataset was landed with (see `Dataset.keyed_as_landed`)."""
        dataset = self.dataset.keyed_as_landed(key, f"{self.storage.url}/{self.dataset.name}/")
        if dataset is not self.dataset:
            self.dataset = dataset
            self.source = DatasetSource(self.client, dataset)

    def _run(self, stop: threading.Event, result: DatasetResult) -> None:
        raise NotImplementedError
