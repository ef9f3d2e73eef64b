"""Land a fresh snapshot under the lease of an `update` or a `reconcile`: when most rows changed
(a publisher's full replace), when 100 batches were landed since the last snapshot, or when the
source's columns changed (schema drift).

The snapshot is landed as a backfill lands one (`snapshot.land_snapshot`): over the partitions
at once, resumable from its committed files if the run stops, committed in one manifest write
that also makes its columns the manifest's and records a `SchemaChange`.
"""

from __future__ import annotations

import logging
import threading

from .current import Landed
from .drift import SchemaChange
from .job import DatasetJob
from .results import DatasetResult
from .snapshot import land_snapshot
from .source import DatasetSource

logger = logging.getLogger(__name__)


def land_fresh(job: DatasetJob, stop: threading.Event, result: DatasetResult, fmt: str) -> None:
    """Land a fresh snapshot of `job`'s dataset in `fmt`, under `job`'s lease, into `result`,
    with the watermark it leaves."""
    after = land_snapshot(job, stop, result, fmt, retire=True)
    result.watermark = None if after is None else after.watermark


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
    land_fresh(job, stop, result, fmt)
    result.refreshed = True
    if result.status == "stopped":
        result.message = f"the source's columns changed ({change.describe()}): {result.message}"
    else:
        result.message = "landed a fresh snapshot with the new columns"
