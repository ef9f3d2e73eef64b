"""The manifest (`<dest>/<dataset>/manifest.json`, the commit point) as typed records: every
committed batch, its files and watermark, the columns, the files a prune retired and the schema
changes; read back checked (a field of the wrong kind is a `StateError` naming the file and the
way out). `state.py` reads and commits it.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from .drift import SchemaChange, spec_columns
from .errors import StateError
from .sink.files import FileEntry

MANIFEST_VERSION = 1


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_batch_id(kind: str) -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{kind}-{uuid.uuid4().hex[:6]}"


EPOCH = "1970-01-01T00:00:00.000Z"  # the watermark before any change: every row is past it


@dataclass(frozen=True)
class Watermark:
    """The position of the last change landed: rows past (`updated_at`, `row_id`) are new.

    `row_id=None` means every row at `updated_at` is landed (strictly later rows are new).
    """

    updated_at: str
    row_id: str | None = None


@dataclass
class Batch:
    batch_id: str
    kind: str  # "snapshot" | "update" | "tombstones"
    format: str
    committed_at: str
    files: list[FileEntry]
    rows: int
    source_count: int | None = None
    watermark: Watermark | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # the columns the batch was landed with, once they are no longer the manifest's (None: the
    # manifest's); see `Manifest.change_columns`
    columns: list[dict[str, str]] | None = None
    # rows in the current state once this batch is committed (a snapshot's are its `rows`);
    # None when a version that did not record it committed the batch (see `Manifest.current_rows`)
    current_rows: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Batch:
        wm = d.get("watermark")
        return cls(
            batch_id=_typed(d["batch_id"], str, "a batch's id"),
            kind=_typed(d["kind"], str, "a batch's kind"),
            format=_typed(d["format"], str, "a batch's format"),
            committed_at=_typed(d["committed_at"], str, "a batch's commit time"),
            files=[_file_entry(f) for f in _typed(d["files"], list, "a batch's files")],
            rows=_typed(d["rows"], int, "a batch's rows"),
            source_count=d.get("source_count"),
            watermark=Watermark(**wm) if wm else None,
            info=d.get("info", {}),
            columns=_column_specs(d.get("columns")),
            current_rows=None if d.get("current_rows") is None else int(d["current_rows"]),
        )


def _typed(value: Any, kind: type, what: str) -> Any:
    """`value`, or a TypeError saying `what` it should have been (a bool is not an int)."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{what} is not a {kind.__name__}: {str(value)[:80]}")
    return value


def _data_path(value: Any, what: str) -> str:
    """A data file's key as the tool writes them (`<dataset>/data/<batch>/<file>`); a
    ValueError for any other (one edited to name the manifest, or a file outside the
    destination, would be read, or deleted by a prune)."""
    path: str = _typed(value, str, what)
    parts = path.split("/")
    if (
        len(parts) < 4
        or parts[-3] != "data"
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in path
        or "\0" in path
    ):
        raise ValueError(f"{what} {path[:80]!r} is not a data file of the dataset")
    return path


def _retired(value: Any) -> Retired:
    doc = _typed(value, dict, "a retired file")
    return Retired(
        _data_path(doc["path"], "a retired file's path"),
        _typed(doc["delete_after"], str, "a retired file's delete_after"),
    )


def _file_entry(value: Any) -> FileEntry:
    doc = _typed(value, dict, "a file entry")
    return FileEntry(
        _data_path(doc["path"], "a file's path"),
        _typed(doc["rows"], int, "a file's rows"),
        _typed(doc["bytes"], int, "a file's bytes"),
    )


def _column_specs(value: Any) -> list[dict[str, str]] | None:
    """Columns as written (None when absent); a TypeError if they are not."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(c, dict) and isinstance(c.get("field"), str) and isinstance(c.get("type"), str)
        for c in value
    ):
        raise TypeError(f"columns are not a list of columns: {str(value)[:80]}")
    return value


@dataclass(frozen=True)
class Retired:
    """A file a pruned batch named, kept until `delete_after` (UTC) for readers of the manifest
    that named it."""

    path: str
    delete_after: str


@dataclass
class Manifest:
    dataset: str
    dataset_id: str
    key: str
    columns: list[dict[str, str]]  # the newest: the current state is read in these
    batches: list[Batch] = field(default_factory=list)
    version: int = MANIFEST_VERSION
    updated: str = ""
    revision: int = 0  # one more at every commit: no two commits write the same bytes
    retired: list[Retired] = field(default_factory=list)
    schema_changes: list[SchemaChange] = field(default_factory=list)
    # when the current state last matched the source's keys: the start of the last reconcile's
    # key scan that ended, or a pruned snapshot's start kept by a compaction (see
    # `last_reconciled`); "" for none
    reconciled: str = ""
    # the store's version of the manifest this was read from (None: none yet); not written
    base: str | None = field(default=None, compare=False, repr=False)

    @property
    def watermark(self) -> Watermark | None:
        for batch in reversed(self.batches):
            if batch.watermark is not None:
                return batch.watermark
        return None

    def last_reconciled(self) -> str:
        """When the current state last matched the source in full (UTC, as `utc_now`): its last
        finished reconcile, or the start of its last snapshot from the source if later (rows
        deleted while it ran may be in it; a compaction rewrites what landed, so it does not
        count); "" for never."""
        return max(self.reconciled, self.last_fetched())

    def last_fetched(self) -> str:
        """When its newest snapshot from the source began (UTC, as `utc_now`); "" for none."""
        fetched = [
            str(b.info.get("started") or b.committed_at)
            for b in self.batches
            if b.kind == "snapshot" and "compacted" not in b.info
        ]
        return max(["", *fetched])

    def last_removal(self) -> str:
        """When rows were last removed from the current state (UTC, as `utc_now`): its latest
        tombstones batch, or compaction (which may have pruned one); "" for never."""
        removals = [
            b.committed_at for b in self.batches if b.kind == "tombstones" or "compacted" in b.info
        ]
        return max(["", *removals])

    def current_batches(self) -> list[Batch]:
        """The latest snapshot and every batch after it: what the current state is made of."""
        for i in range(len(self.batches) - 1, -1, -1):
            if self.batches[i].kind == "snapshot":
                return self.batches[i:]
        return []

    def columns_of(self, batch: Batch) -> list[dict[str, str]]:
        """The columns `batch` was landed with."""
        return self.columns if batch.columns is None else batch.columns

    def change_columns(self, columns: list[dict[str, str]], batch_id: str) -> SchemaChange | None:
        """Make `columns` the manifest's, as snapshot `batch_id` lands them; if they differ,
        every batch landed before keeps its own and the change is recorded (and returned)."""
        change = SchemaChange.between(spec_columns(self.columns), spec_columns(columns))
        if change is not None:
            for batch in self.batches:
                if batch.columns is None:
                    batch.columns = self.columns
            change = change.landed(utc_now(), batch_id)
            self.schema_changes.append(change)
        self.columns = columns
        return change

    def current_rows(self) -> int | None:
        """Rows in the current state, as its last commit recorded them (see counts.py);
        None when that batch was committed by a version that did not record it."""
        batches = self.current_batches()
        if not batches:
            return None
        last = batches[-1]
        return last.rows if last.kind == "snapshot" else last.current_rows

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        del doc["base"]
        doc["schema_changes"] = [c.to_dict() for c in self.schema_changes]
        for batch in doc["batches"]:
            if batch["columns"] is None:  # the manifest's: not repeated in every batch
                del batch["columns"]
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        folder = where.rsplit("/", 1)[0]
        way_out = (
            f"restore it from a copy (S3 versioning keeps earlier ones), or move {folder} "
            "aside and backfill again"
        )
        try:
            d = orjson.loads(data)
            if not isinstance(d, dict):
                raise TypeError(f"a JSON {type(d).__name__}, not an object")
            if d.get("version") != MANIFEST_VERSION:
                raise StateError(f"{where}: manifest version {d.get('version')} is not supported")
            return cls(
                dataset=_typed(d["dataset"], str, "dataset"),
                dataset_id=_typed(d["dataset_id"], str, "dataset_id"),
                key=_typed(d["key"], str, "key"),
                columns=_column_specs(_typed(d["columns"], list, "columns")) or [],
                batches=[Batch.from_dict(b) for b in _typed(d["batches"], list, "batches")],
                version=d["version"],
                updated=d.get("updated", ""),
                revision=int(d.get("revision", 0)),
                retired=[_retired(r) for r in _typed(d.get("retired", []), list, "retired")],
                schema_changes=[SchemaChange.from_dict(c) for c in d.get("schema_changes", [])],
                reconciled=str(d.get("reconciled", "")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"{where}: manifest unreadable ({exc}); {way_out}") from exc
