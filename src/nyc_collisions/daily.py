"""The daily run: update each dataset, then reconcile those updated. One orchestration, used by
`nyc-collisions update [--reconcile]` and by the Lambda handler (`aws.py`), each saying what it
wants in a `DailyRun`.

The updates go in turn and end at the first one that stops (Ctrl-C, the time budget): the next
run goes on from the committed files. The reconciles go in turn after them, each of a dataset
not reconciled since `reconcile_since` (its manifest records when it last matched the source's
keys: `Manifest.last_reconciled`), so that a run invoked again after one stopped does not
reconcile from the start the datasets it has reconciled already. One stopped by the budget has
recorded its key scan, and a run with `resume_scans` goes on with it even when none is asked,
so that a reconcile ends within the next runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .datasets import Dataset
from .errors import NothingLanded
from .extract import backfill_one
from .incremental import Update
from .job import RunOptions
from .reconcile import Reconcile
from .results import DatasetResult
from .scanrecord import scan_pending
from .sink.storage import Storage
from .socrata.client import SodaClient
from .state import DatasetState

logger = logging.getLogger(__name__)

Record = Callable[[str, DatasetResult], None]  # the command ("update", ...) and its result


@dataclass(frozen=True)
class DailyRun:
    """What a daily run does beyond updating each dataset."""

    # then reconcile each dataset updated that was not reconciled since then (UTC, as
    # `utc_now`; a snapshot counts as reconciled); None: none
    reconcile_since: str | None = None
    fmt: str | None = None  # the format of new batches (None: as landed)
    backfill_first: bool = False  # backfill a dataset with nothing landed (else: the error)
    resume_scans: bool = False  # reconcile a dataset whose key scan stopped, even unasked


def update_then_reconcile(
    client: SodaClient,
    storage: Storage,
    datasets: list[Dataset],
    opts: RunOptions,
    run: DailyRun,
    record: Record,
) -> None:
    """Update each dataset in turn, then reconcile as `run` says; each result goes to `record`
    as it comes."""
    stop = threading.Event()  # a lease lost sets it: the run ends there
    storage.check_writable()
    try:
        updated = _update_each(client, storage, datasets, opts, run, record, stop)
        for ds in updated:
            if _reconcile_due(storage, ds, run):
                record("reconcile", Reconcile(client, storage, ds, opts).run(stop))
    except BaseException:
        storage.discard_if_empty()
        raise


def _reconcile_due(storage: Storage, ds: Dataset, run: DailyRun) -> bool:
    if run.resume_scans and scan_pending(storage, ds):
        return True
    if run.reconcile_since is None:
        return False
    manifest = DatasetState(storage, ds.name).load()
    return manifest is not None and manifest.last_reconciled() <= run.reconcile_since


def _update_each(
    client: SodaClient,
    storage: Storage,
    datasets: list[Dataset],
    opts: RunOptions,
    run: DailyRun,
    record: Record,
    stop: threading.Event,
) -> list[Dataset]:
    """The datasets updated, when every update ended; none when one stopped."""
    updated = []
    for ds in datasets:
        try:
            result = Update(client, storage, ds, opts, run.fmt).run(stop)
        except NothingLanded:
            if not run.backfill_first:
                raise
            logger.warning(
                "%s: nothing landed at %s/%s/ yet: backfilling it first",
                ds.name,
                storage.url,
                ds.name,
            )
            result = backfill_one(client, storage, ds, opts, stop)
            record("backfill", result)
        else:
            record("update", result)
            updated.append(ds)
        if result.status == "stopped":
            return []
    return updated
