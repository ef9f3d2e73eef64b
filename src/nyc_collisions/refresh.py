"""Land a fresh snapshot under the lease of an `update` or a `reconcile`: when most rows changed
(a publisher's full replace), or when the source's columns changed (schema drift).

The snapshot is landed by the backfill's own code (`Backfill._run` with `force`): over the
partitions at once, resumable from its committed files if the run stops, committed in one
manifest write that also makes its columns the manifest's and records a `SchemaChange`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from .current import Landed
from .drift import SchemaChange
from .extract import Backfill, DatasetJob, DatasetResult
from .source import DatasetSource

logger = logging.getLogger(__name__)


def land_snapshot(job: DatasetJob, stop: threading.Event, result: DatasetResult, fmt: str) -> None:
    """Land a fresh snapshot of `job`'s dataset in `fmt`, under `job`'s lease, into `result`."""
    refresh = Backfill(job.client, job.storage, job.dataset, replace(job.opts, fmt=fmt, force=True))
    refresh.source = job.source
    refresh.state = job.state  # under the job's lease
    refresh._run(stop, result)
    job.snapshot_committed = refresh.snapshot_committed
    after = job.state.load()
    wm = None if after is None else after.watermark
    result.extra["watermark"] = None if wm is None else wm.__dict__


def drift(landed: Landed, source: DatasetSource) -> SchemaChange | None:
    """How the source's columns differ from the landed ones (None: they do not)."""
    return SchemaChange.between(landed.schema.columns, source.schema().columns)


def drifted_meanwhile(job: DatasetJob, landed: Landed) -> SchemaChange | None:
    """After a page carried other columns than the metadata named: whether the metadata has
    changed since the run read it (read afresh, on `job.source` from now on)."""
    job.source = DatasetSource(job.client, job.dataset)
    return drift(landed, job.source)


def land_new_columns(
    job: DatasetJob,
    change: SchemaChange,
    stop: threading.Event,
    result: DatasetResult,
    fmt: str,
) -> None:
    """Land the source's new columns as a fresh snapshot (see the module docstring)."""
    logger.warning(
        "%s: the source's columns changed since they were landed (%s); landing a fresh "
        "snapshot with the new columns",
        job.dataset.name,
        change.describe(),
    )
    land_snapshot(job, stop, result, fmt)
    result.extra["refreshed"] = True
    if result.status == "stopped":
        result.message = f"the source's columns changed ({change.describe()}): {result.message}"
    else:
        result.message = "landed a fresh snapshot with the new columns over partitions"
