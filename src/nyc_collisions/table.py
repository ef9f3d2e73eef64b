"""The query zone: a dataset's current state as a Delta Lake table at `<dest>/<dataset>/table/`.

The manifest stays the truth; the table follows it. `sync_table` (run by every command that
changes landed data, after its commits, under the dataset's lease) reads which manifest state
the table reflects from the table's last commit (`Mark`, in the commit's metadata) and brings
it up to the manifest:

- the same snapshot, later batches appended: their new files' rows are merged by key (the latest
  version of each key wins; a key whose latest entry is a tombstone is deleted), one commit;
- another snapshot (a backfill --force, a full replace, new columns, compact), columns that
  differ, or too much to merge: the table is rewritten from the current state, one commit.

A run killed between a manifest commit and the table's leaves the table behind; the next run
of any command with the table on brings it up. See docs/design-table.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from .current import Landed, iter_current, open_landed, read_batch_file
from .datasets import Dataset
from .errors import DestinationError, NothingLanded, NycCollisionsError
from .manifest import Batch
from .sink.storage import Storage
from .state import DatasetState
from .table_write import (
    DELETE_FLAG,
    MERGE_MAX_FILE_SHARE,
    MERGE_MAX_KEYS,
    Guard,
    Target,
    Written,
    merge_changes,
    optimize,
    overwrite,
    rewrite_with_changes,
    touched_share,
    vacuum_superseded,
)
from .tidy import DEFAULT_GRACE_HOURS

logger = logging.getLogger(__name__)

MARK_KEY = "nyc_collisions.mark"
# the table is rewritten rather than merged when more rows than this are pending (a reconcile
# that refetched many rows, a table left far behind): a merge holds them all in memory
MERGE_MAX_ROWS = 200_000
# how many of the table's last commits to look through for the mark (each sync commit has it)
MARK_LOOKBACK = 20


class TableError(DestinationError):
    """The table could not be read or written."""


class _OutOfTime(NycCollisionsError):
    """The run's time ran out before the table's commit: the next run brings it up."""


@dataclass(frozen=True)
class Mark:
    """The manifest state a table commit reflects: its snapshot, and how many files of each
    later batch were merged (an update commits its batch file by file)."""

    snapshot: str
    applied: tuple[tuple[str, int], ...]
    revision: int

    def to_json(self) -> str:
        doc = {"snapshot": self.snapshot, "applied": self.applied, "revision": self.revision}
        return orjson.dumps(doc).decode()

    @classmethod
    def from_json(cls, text: str) -> Mark | None:
        try:
            doc = orjson.loads(text)
            applied = tuple((str(b), int(n)) for b, n in doc["applied"])
            return cls(str(doc["snapshot"]), applied, int(doc["revision"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    @classmethod
    def of(cls, landed: Landed) -> Mark:
        batches = landed.manifest.current_batches()
        applied = tuple((b.batch_id, len(b.files)) for b in batches[1:])
        return cls(batches[0].batch_id, applied, landed.manifest.revision)


@dataclass(frozen=True)
class TableSync:
    """What `sync_table` did: `action` is "current" (nothing to do), "merged" or "rewritten"."""

    dataset: str
    uri: str
    action: str
    rows: int
    deleted: int
    version: int
    seconds: float


@dataclass(frozen=True)
class TableLocation:
    uri: str
    storage_options: dict[str, str]


def table_location(storage: Storage, folder: str) -> TableLocation:
    """Where the dataset's table lives, and how delta-rs reaches it (credentials are left to
    its own AWS chain: environment, profile, instance role)."""
    if not storage.url.startswith("s3://"):
        return TableLocation(os.path.join(storage.url, folder, "table"), {})
    options = {"conditional_put": "etag"}  # commits by S3's If-None-Match: no lock table
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["AWS_REGION"] = region
    return TableLocation(f"{storage.url}/{folder}/table", options)


def _open_table(where: TableLocation) -> Any:
    """The table, or None when there is none yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(where.uri, storage_options=where.storage_options)
    except TableNotFoundError:
        return None


def read_mark(storage: Storage, folder: str, version: int) -> Mark | None:
    """The mark of the table's latest commit that has one, read from its log through the
    project's storage (delta-rs's `history()` holds the GIL while it waits for the store)."""
    for v in range(version, max(-1, version - MARK_LOOKBACK), -1):
        data = storage.get_bytes(f"{folder}/table/_delta_log/{v:020d}.json")
        if data is None:
            return None
        for line in data.splitlines():
            try:
                info = orjson.loads(line).get("commitInfo")
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(info, dict) and isinstance(info.get(MARK_KEY), str):
                return Mark.from_json(info[MARK_KEY])
    return None


def table_schema(landed: Landed) -> pa.Schema:
    """The table's columns: the landed Parquet types, timestamps in microseconds (Delta's)."""
    fields = []
    for f in landed.schema.typed_schema():
        t = pa.timestamp("us", tz=f.type.tz) if pa.types.is_timestamp(f.type) else f.type
        fields.append(pa.field(f.name, t))
    return pa.schema(fields)


def _typed(landed: Landed, text: pa.Table, schema: pa.Schema) -> pa.Table:
    return landed.schema.to_typed(text).cast(schema)


def sync_table(
    storage: Storage,
    dataset: Dataset,
    state: DatasetState | None = None,
    *,
    check: Callable[[], None] | None = None,
    deadline: float | None = None,
) -> TableSync | None:
    """Bring the table of `dataset` up to its committed manifest (idempotent); None when
    nothing is landed yet, or the time ran out (the monotonic `deadline`) before it could.
    `check` (the lease's) is called just before the table's commit: what it raises stops the
    sync, the table untouched."""
    started = time.monotonic()
    guard = Guard(check or (lambda: None), lambda: _in_time(deadline))
    try:
        guard.in_time()
        landed = open_landed(storage, dataset, state)
    except NothingLanded:
        return None
    except _OutOfTime:
        _skipped(dataset)
        return None
    where = table_location(storage, dataset.name)
    try:
        synced = _sync(landed, where, started, guard)
    except _OutOfTime:
        _skipped(dataset)
        return None
    except NycCollisionsError:
        raise
    except Exception as exc:  # delta-rs's errors, the store's: one line, the data committed
        raise _table_error(where, exc) from exc
    # what this commit or one before superseded a day ago goes, time left
    if synced.action != "current" and (deadline is None or time.monotonic() < deadline):
        meta = {MARK_KEY: Mark.of(landed).to_json()}
        table, folder = (lambda: _open_table(where)), f"{landed.dataset.name}/table"
        vacuum_superseded(
            where.uri, table, landed.storage, folder, meta, DEFAULT_GRACE_HOURS, guard
        )
    return synced


def _in_time(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise _OutOfTime()


def _skipped(dataset: Dataset) -> None:
    logger.warning(
        "%s: out of time before the table's commit: the table is left as it was, and the next "
        "run with the table on brings it up",
        dataset.name,
    )


def _table_error(where: TableLocation, exc: BaseException) -> TableError:
    text = f"{type(exc).__name__}: " + " ".join(str(exc).split())[:300]
    return TableError(
        f"{where.uri}: the table could not be brought up to the manifest ({text}); the landed "
        "data is committed, and the next run with the table on tries again"
    )


def _sync(landed: Landed, where: TableLocation, started: float, guard: Guard) -> TableSync:
    table = _open_table(where)  # opened once: a commit landed since fails this sync's
    target = Target(table, where.uri, where.storage_options)
    mark = Mark.of(landed)
    meta = {MARK_KEY: mark.to_json()}
    typed = table_schema(landed)
    folder = landed.dataset.name
    found = None if table is None else read_mark(landed.storage, folder, table.version())
    pending = None if found is None else _pending(landed, found)
    if table is not None and pending is not None and _same_columns(table, typed):
        rows = sum(entry.rows for _, entries in pending for entry in entries)
        if not rows:  # nothing landed since (a commit of no rows, or of nothing at all)
            return _done(landed, where, "current", Written(0, 0, table.version()), started)
        if rows <= MERGE_MAX_ROWS:
            key = landed.key_column
            changes = _changes(landed, pending, typed)
            if (
                changes.num_rows <= MERGE_MAX_KEYS
                and touched_share(table, key, changes.column(key)) <= MERGE_MAX_FILE_SHARE
            ):
                done = merge_changes(table, key, changes, meta, guard)
                return _done(landed, where, "merged", done, started)
            done = rewrite_with_changes(
                landed.storage, folder, target, typed, key, changes, meta, guard
            )
            return _done(landed, where, "merged by a rewrite", done, started)
    tables = (_typed(landed, text, typed) for text in iter_current(landed))
    done = overwrite(target, typed, tables, meta, guard)
    return _done(landed, where, "rewritten", done, started)


def _done(
    landed: Landed, where: TableLocation, action: str, done: Written, started: float
) -> TableSync:
    sync = TableSync(
        landed.dataset.name,
        where.uri,
        action,
        done.rows,
        done.deleted,
        done.version,
        time.monotonic() - started,
    )
    logger.info(
        "%s: table %s (%s rows, %s deleted, version %s) in %.1fs",
        sync.dataset,
        action,
        sync.rows,
        sync.deleted,
        sync.version,
        sync.seconds,
    )
    return sync


def _same_columns(table: Any, typed: pa.Schema) -> bool:
    """Whether the table has the columns and types of `typed`, as Delta stores them."""
    from deltalake import Schema

    return bool(table.schema().to_json() == Schema.from_arrow(typed).to_json())


def _pending(landed: Landed, mark: Mark) -> list[tuple[Batch, list[Any]]] | None:
    """The files committed since `mark`, batch by batch in commit order; None when the table
    reflects another snapshot, or a state the manifest no longer holds."""
    batches = landed.manifest.current_batches()
    if batches[0].batch_id != mark.snapshot:
        return None
    later = batches[1:]
    applied = dict(mark.applied)
    ids = [b.batch_id for b in later]
    if list(applied) != ids[: len(applied)]:
        return None
    pending = []
    for batch in later:
        done = applied.get(batch.batch_id, 0)
        if done > len(batch.files):
            return None
        if batch.files[done:]:
            pending.append((batch, batch.files[done:]))
    return pending


def _changes(landed: Landed, pending: list[tuple[Batch, list[Any]]], typed: pa.Schema) -> pa.Table:
    """The pending rows reduced to each key's latest entry, in the table's columns `typed`: its
    typed row, or (a tombstone) the key alone with the delete flag set."""
    key = landed.key_column
    parts: list[pa.Table] = []
    seq = 0
    for batch, entries in pending:
        for entry in entries:
            for text in read_batch_file(landed, batch, entry):
                n = text.num_rows
                tomb = batch.kind == "tombstones"
                if tomb:
                    keys = _typed(landed, _key_only(landed, text), typed).column(key)
                    rows = pa.table(
                        {f.name: keys if f.name == key else pa.nulls(n, f.type) for f in typed},
                        schema=typed,
                    )
                else:
                    rows = _typed(landed, text, typed)
                rows = rows.append_column(
                    DELETE_FLAG, pa.array(np.full(n, tomb), pa.bool_())
                ).append_column("_seq", pa.array(np.arange(seq, seq + n, dtype=np.int64)))
                parts.append(rows)
                seq += n
    if not parts:
        return pa.table({**{f.name: pa.array([], f.type) for f in typed}, DELETE_FLAG: []})
    rows = pa.concat_tables(parts)
    latest = rows.group_by(key).aggregate([("_seq", "max")]).column("_seq_max")
    rows = rows.filter(pc.is_in(rows.column("_seq"), value_set=latest))
    return rows.drop_columns(["_seq"])


def _key_only(landed: Landed, text: pa.Table) -> pa.Table:
    """A tombstone file's keys as a text table of every column (the others null), to type."""
    n = text.num_rows
    return pa.table(
        {
            name: text.column(name) if name == landed.key_column else pa.nulls(n, pa.string())
            for name in landed.schema.names
        }
    )


def compact_table(
    storage: Storage,
    dataset: Dataset,
    state: DatasetState,
    *,
    prune: bool,
    grace_hours: float,
    check: Callable[[], None] | None = None,
) -> None:
    """After `compact`: bring the table up to the manifest, fold its small files together and,
    with `prune`, delete the files of versions older than `grace_hours` (as `compact --prune`
    does with landed files). `check` (the lease's) is called before each commit."""
    if sync_table(storage, dataset, state, check=check) is None:
        return
    where = table_location(storage, dataset.name)
    try:
        table = _open_table(where)
        mark = read_mark(storage, dataset.name, table.version())
        meta = None if mark is None else {MARK_KEY: mark.to_json()}
        optimize(table, meta, prune, grace_hours, Guard(check or (lambda: None)))
    except NycCollisionsError:
        raise
    except Exception as exc:
        raise _table_error(where, exc) from exc
