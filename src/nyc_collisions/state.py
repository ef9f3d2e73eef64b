"""What is committed at a destination: the manifest (the commit point), runs in progress, the
watermark and the lock.

Layout below `<dest>/<dataset>/`::

    manifest.json                      the commit point: every committed batch and its files
    data/<batch_id>/part-PPPP-SSSSSS.<fmt>   data files (immutable once written)
    runs/<batch_id>/plan.json          a backfill in progress: its partitions
    runs/<batch_id>/parts/PPPP-SSSSSS.json   one record per finished data file of that run
    lock.json                          the lease of the run that writes this dataset

Readers trust only what `manifest.json` names. A batch's files are complete before the manifest
that names them is written; the watermark lives in the manifest, so both move in one atomic write.
A commit is optimistic: it replaces the very version of the manifest the run read (a conditional
write), and only while the run holds the dataset's lease (`lease.py`); otherwise it stops with
`LeaseLost` or `ManifestChanged` and commits nothing.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from .drift import SchemaChange, spec_columns
from .errors import LeaseLost, ManifestChanged, StateError
from .sink.files import FileEntry
from .sink.storage import Storage

if TYPE_CHECKING:
    from .lease import Lease

logger = logging.getLogger(__name__)

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


def _file_entry(value: Any) -> FileEntry:
    doc = _typed(value, dict, "a file entry")
    return FileEntry(
        _typed(doc["path"], str, "a file's path"),
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
        fetched = [
            str(b.info.get("started") or b.committed_at)
            for b in self.batches
            if b.kind == "snapshot" and "compacted" not in b.info
        ]
        return max([self.reconciled, *fetched])

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
                retired=[Retired(**r) for r in d.get("retired", [])],
                schema_changes=[SchemaChange.from_dict(c) for c in d.get("schema_changes", [])],
                reconciled=str(d.get("reconciled", "")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"{where}: manifest unreadable ({exc}); {way_out}") from exc


class DatasetState:
    """The committed state of one dataset at a destination, and the keys of its objects.

    `lease` is set while a run holds the dataset's lease; only then may it `commit`.
    """

    def __init__(self, storage: Storage, folder: str) -> None:
        self.storage = storage
        self.folder = folder
        self.lease: Lease | None = None
        self._run_writes = threading.Condition()  # guards `lease` against `put_run_json`
        self._writing = 0  # run records being written now
        # in every data file's name: a killed run's write still in flight (an S3 upload the
        # store completes after the process died) can never replace a later run's file
        self.attempt = uuid.uuid4().hex[:6]

    @property
    def manifest_key(self) -> str:
        return f"{self.folder}/manifest.json"

    def data_key(self, batch_id: str, partition: int, seq: int, fmt: str) -> str:
        return f"{self.folder}/data/{batch_id}/part-{partition:04d}-{seq:06d}-{self.attempt}.{fmt}"

    def run_prefix(self, batch_id: str) -> str:
        return f"{self.folder}/runs/{batch_id}"

    def load(self) -> Manifest | None:
        got = self.storage.get_versioned(self.manifest_key)
        if got is None:
            return None
        manifest = Manifest.from_bytes(got.data, f"{self.storage.url}/{self.manifest_key}")
        manifest.base = got.version
        return manifest

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest whole, only over the version it was read from (`manifest.base`;
        only if there is none when it is new) and only while this run holds the lease."""
        if self.lease is None:
            raise RuntimeError(f"{self.folder}: a commit without the dataset's lease")
        manifest.revision += 1
        manifest.updated = utc_now()
        version = None
        try:
            version = self.storage.put_if(
                self.manifest_key, manifest.to_bytes(), expect=manifest.base, check=self.lease.check
            )
        finally:
            if version is None:  # not written: another run committed, the lease lost, ...
                manifest.revision -= 1
        if version is None:
            raise ManifestChanged(
                f"{self.storage.url}/{self.manifest_key}: the manifest changed since this run "
                "read it (another run committed); this run stopped before committing more, "
                "run it again"
            )
        manifest.base = version

    # -- runs in progress ------------------------------------------------------------------
    def unfinished_runs(self, manifest: Manifest | None) -> list[str]:
        """Batch ids of runs with a plan that `manifest` (the dataset's, as the caller read it)
        does not name: killed or interrupted runs."""
        keys = self.storage.list_keys(f"{self.folder}/runs/")
        ids = sorted({k.split("/")[-2] for k in keys if k.endswith("/plan.json")})
        committed = {b.batch_id for b in manifest.batches} if manifest else set()
        return [i for i in ids if i not in committed]

    def put_run_json(self, key: str, doc: dict[str, Any]) -> None:
        """Write a run's record (its plan, a part record) only while it holds the lease: a
        worker still alive after Ctrl-C never writes over the records of a newer run."""
        with self._run_writes:
            lease = self.lease
            if lease is None:
                raise LeaseLost(f"{self.storage.url}/{key}: not written, the run has ended")
            self._writing += 1  # `end_run` waits for it from here on
        try:
            # the lease checked before every attempt (outside the lock: a renewal must not hold
            # up the other writers), and no attempt sent again after it (see `put_if`)
            self.put_json(key, doc, check=lease.check)
        finally:
            with self._run_writes:
                self._writing -= 1
                self._run_writes.notify_all()

    def put_part_record(self, run_id: str, record: PartRecord) -> None:
        """A part record of run `run_id` (a backfill's or a key scan's), under the lease."""
        key = f"{self.run_prefix(run_id)}/parts/{record.partition:04d}-{record.seq:06d}.json"
        self.put_run_json(key, record.to_dict())

    def end_run(self) -> None:
        """Before the lease is given back: no run record is written from now on, and those
        being written are done."""
        with self._run_writes:
            self.lease = None
            self._run_writes.wait_for(lambda: self._writing == 0)

    def put_json(
        self, key: str, doc: dict[str, Any], check: Callable[[], None] | None = None
    ) -> None:
        self.storage.put_bytes(key, orjson.dumps(doc, option=orjson.OPT_INDENT_2), check=check)

    def get_json(self, key: str) -> dict[str, Any] | None:
        data = self.storage.get_bytes(key)
        if data is None:
            return None
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise StateError(f"{self.storage.url}/{key}: unreadable: {exc}") from exc
        if not isinstance(doc, dict):
            raise StateError(f"{self.storage.url}/{key}: not a JSON object")
        return doc

    def drop_run(self, batch_id: str) -> None:
        """Delete a run's records: only while the lease is surely ours (a run that lost it must
        not drop the records the new holder resumes from)."""
        check = None if self.lease is None else self.lease.check
        if check is not None:
            check()
        self.storage.delete(self.storage.list_keys(self.run_prefix(batch_id) + "/"), check=check)

    def part_records(self, batch_id: str) -> list[PartRecord]:
        """The finished files of backfill run `batch_id`, in (partition, seq) order."""
        prefix = f"{self.run_prefix(batch_id)}/parts/"
        records = []
        for key in self.storage.list_keys(prefix):
            doc = self.get_json(key)
            if doc is not None:
                records.append(PartRecord.from_dict(doc, f"{self.storage.url}/{key}"))
        return sorted(records, key=lambda r: (r.partition, r.seq))


@dataclass(frozen=True)
class PartRecord:
    """One finished data file of a backfill run (`runs/<batch>/parts/PPPP-SSSSSS.json`), or the
    end of a partition that needed no more file (`path` None)."""

    partition: int
    seq: int
    done: bool
    path: str | None
    rows: int
    bytes: int
    last_id: str | None
    # the latest `:updated_at` of the rows its partition landed up to it ("" none; None unknown:
    # a record of an older version)
    latest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str) -> PartRecord:
        kinds: dict[str, Any] = {
            "partition": int,
            "seq": int,
            "done": bool,
            "path": str | None,
            "rows": int,
            "bytes": int,
            "last_id": str | None,
        }
        try:
            for name, kind in kinds.items():
                value = doc[name]
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise TypeError(f"{name} is {value!r}")
            latest = doc.get("latest")
            if latest is not None and not isinstance(latest, str):
                raise TypeError(f"latest is {latest!r}")
            return cls(**{name: doc[name] for name in kinds}, latest=latest)
        except (KeyError, TypeError) as exc:
            run = where.rsplit("/parts/", 1)[0]
            raise StateError(
                f"{where}: a corrupt part record ({type(exc).__name__}: {exc}); delete {run}/ "
                "to start that backfill over"
            ) from exc
