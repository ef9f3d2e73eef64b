"""What a command did to one dataset: the typed result that the CLI prints and the Lambda handler
summarises and measures. Commands fill it as they go; readers take the fields they know."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .drift import SchemaChange
from .manifest import Watermark
from .socrata.concurrency import Usage


@dataclass(frozen=True)
class ReconcileCounts:
    """What a reconcile's comparison found."""

    vanished: int = 0  # landed rows whose key the source lacks (tombstoned)
    missing: int = 0  # source rows that had not landed (fetched again)
    stale: int = 0  # rows landed in another version (fetched again)

    @property
    def changed(self) -> int:
        return self.missing + self.stale + self.vanished


@dataclass
class DatasetResult:
    dataset: str
    status: str  # "landed" | "skipped" | "stopped" | "updated" | ...
    rows: int = 0
    files: int = 0
    bytes: int = 0
    requests: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0
    batch_id: str | None = None
    location: str = ""
    source_count: int | None = None
    message: str = ""
    resumed: str | None = None  # the unfinished run (or key scan) this one went on with
    total_rows: int | None = None  # rows of a committed snapshot, a resumed run's included
    schema_change: SchemaChange | None = None  # the columns a committed snapshot changed
    concurrency: Usage | None = None  # what a snapshot's fetch settled on
    splits: int = 0  # ranges a snapshot's fetch split
    watermark: Watermark | None = None  # after an update, or a fresh snapshot under one
    refreshed: bool = False  # an update or reconcile landed a fresh snapshot instead
    changed: int | None = None  # rows changed past the watermark, when an update refreshed
    reconciled: ReconcileCounts | None = None
    pruned_batches: int | None = None  # batches `compact --prune` or a fresh snapshot retired
    table_error: str | None = None  # the table's sync failed (the landed data is committed)

    def watermark_dict(self) -> dict[str, Any] | None:
        wm = self.watermark
        return None if wm is None else {"updated_at": wm.updated_at, "row_id": wm.row_id}
