"""What `status` and `verify` report: landed counts, runs, watermark, lag, cross-dataset orphans."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .current import Landed, current_count, current_keys, open_landed
from .datasets import Dataset
from .errors import NothingLanded, NycCollisionsError
from .keyspill import KeySpill, bucket_count
from .manifest import Manifest, Watermark
from .sink.storage import Storage
from .socrata.client import SodaClient
from .source import DatasetSource
from .state import DatasetState
from .verify import SAMPLE, columns_drift

logger = logging.getLogger(__name__)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def lag_seconds(manifest: Manifest, rows_updated_at: object, source: DatasetSource) -> float | None:
    """Seconds the landed state is behind the source's last change (`rowsUpdatedAt`, which a
    deletion moves too), counted from the watermark; or, when the source has no row past it
    (every changed row landed: what is left can only be a deletion; asked only then), from
    when the state last matched the source's keys if later (a reconcile's or a snapshot's
    start, by this host's clock). A reconcile leaves rows past the watermark to the next
    update. None when unknown."""
    wm = manifest.watermark
    if wm is None or isinstance(rows_updated_at, bool):
        return None
    if not isinstance(rows_updated_at, int | float):
        return None
    since = _epoch(wm.updated_at)
    matched = manifest.last_reconciled()
    later = since < rows_updated_at and matched and since < _epoch(matched)
    if later and not _rows_past(source, wm):
        since = _epoch(matched)
    return max(0.0, float(rows_updated_at) - since)


def _rows_past(source: DatasetSource, mark: Watermark) -> bool:
    """Whether the source has rows past `mark` (True when it cannot say: lag from the mark)."""
    try:
        return source.has_rows_past(mark)
    except NycCollisionsError as exc:
        logger.info("%s: rows past the watermark unknown: %s", source.dataset.name, exc)
        return True


def dataset_status(storage: Storage, client: SodaClient | None, ds: Dataset) -> dict[str, Any]:
    """One dataset's status as a JSON-able dict (the source part is skipped without a client)."""
    entry: dict[str, Any] = {
        "dataset": ds.name,
        "dataset_id": ds.dataset_id,
        "location": f"{storage.url}/{ds.name}/",
    }
    landed: Landed | None = None
    try:
        landed = open_landed(storage, ds)
    except NothingLanded:
        state = DatasetState(storage, ds.name)
        unfinished = state.unfinished_runs(state.load())
        entry.update(landed=False, rows=0, files=0, unfinished_backfill=unfinished[-1:] or None)
    else:
        manifest = landed.manifest
        batches = manifest.current_batches()
        updates = [b for b in manifest.batches if b.kind == "update"]
        wm = manifest.watermark
        entry.update(
            landed=True,
            rows=_rows(landed),
            files=sum(len(b.files) for b in batches),
            batches=len(batches),
            format=", ".join(sorted({b.format for b in batches})),  # both after a --format
            snapshot={
                "batch": batches[0].batch_id,
                "committed_at": batches[0].committed_at,
                "rows": batches[0].rows,
            },
            last_run={
                "batch": manifest.batches[-1].batch_id,
                "kind": manifest.batches[-1].kind,
                "committed_at": manifest.batches[-1].committed_at,
                "rows": manifest.batches[-1].rows,
            },
            last_update=None
            if not updates
            else {
                "batch": updates[-1].batch_id,
                "committed_at": updates[-1].committed_at,
                "rows": updates[-1].rows,
            },
            tombstones=sum(b.rows for b in batches if b.kind == "tombstones"),
            # since then deletions at the source may not be in it yet (a reconcile finds them)
            last_reconciled=manifest.last_reconciled() or None,
            watermark=None if wm is None else {"updated_at": wm.updated_at, "row_id": wm.row_id},
            schema_changes=[
                {k: v for k, v in c.to_dict().items() if k not in ("before", "after")}
                for c in manifest.schema_changes
            ],
        )
    if client is not None:
        _add_source(entry, DatasetSource(client, ds), landed)
    count = entry.get("source_count")
    entry["agree"] = False
    if entry["landed"]:  # None: the source's count could not be had, so nothing was compared
        entry["agree"] = None if count is None else count == entry["rows"]
    return entry


def _add_source(entry: dict[str, Any], source: DatasetSource, landed: Landed | None) -> None:
    """The source's count, lag and column changes into `entry`. When the count fails nothing
    more is asked (a source not reached would only make each request wait again)."""
    try:
        entry["source_count"] = source.count()
    except NycCollisionsError as exc:
        entry["source_count"] = None
        entry["source_error"] = str(exc)
        return
    try:
        rows_updated = source.metadata().get("rowsUpdatedAt")
        entry["source_rows_updated_at"] = rows_updated
        lag = None if landed is None else lag_seconds(landed.manifest, rows_updated, source)
        if lag is not None:
            entry["lag_seconds"] = lag
        change = None if landed is None else columns_drift(source, landed)
    except NycCollisionsError as exc:  # the metadata, or a key that is no longer a column
        entry["source_error"] = str(exc)
        return
    if change is not None and landed is not None and landed.manifest.key in change.removed:
        entry["source_error"] = (
            f"the source dropped {landed.manifest.key}, the key this dataset was landed with: "
            "what landed stays readable; land it again with another --key in another --dest"
        )
    elif change is not None:
        entry["source_columns_changed"] = change.summary()


def _rows(landed: Landed) -> int:
    """The current state's rows as the manifest records them (a manifest written by a version
    that did not record them is counted from the data, once per status)."""
    recorded = landed.manifest.current_rows()
    return current_count(landed) if recorded is None else recorded


@dataclass(frozen=True)
class Orphans:
    """Rows of a child dataset whose collision_id no landed crash has."""

    dataset: str
    rows: int
    collision_ids: int  # distinct ones
    sample: tuple[str, ...]


def orphans(crashes: Landed, child: Landed) -> Orphans:
    """Rows of persons/vehicles whose collision_id is not among the landed crashes.

    Both sides' collision_ids are spilled by hash and compared a bucket at a time (`keyspill`).
    """
    column = "collision_id"
    side = pa.schema([pa.field(column, pa.string())])
    rows = distinct = 0
    sample: list[str] = []
    expected = max(crashes.manifest.current_rows() or 0, child.manifest.current_rows() or 0)
    with KeySpill({"parent": side, "child": side}, column, bucket_count(expected)) as spill:
        for name, landed in (("parent", crashes), ("child", child)):
            for table in current_keys(landed, column):
                spill.add(name, table.select([column]))
        for bucket in spill.pairs():
            ids, parents = bucket["child"].column(column), bucket["parent"].column(column)
            lost = pc.filter(ids, pc.invert(pc.is_in(ids, value_set=parents)))
            unique = pc.unique(lost)
            rows += len(lost)
            distinct += len(unique)
            sample += [str(v) for v in unique[: SAMPLE - len(sample)].to_pylist()]
    return Orphans(child.dataset.name, rows, distinct, tuple(sample))
