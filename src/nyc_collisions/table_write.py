"""The writes of a dataset's Delta table (`table.py` decides which): each is one commit that
carries `meta` (the manifest state it brings the table to) in its commit info.

- `merge_changes`: delta-rs's MERGE by key; it rewrites only the files that hold a changed key,
  so it is the way when the changes touch few files (new rows, recent edits: the table is laid
  out in the order of `:id`, about the order rows were created).
- `rewrite_with_changes`: when the changes touch most files, MERGE would rewrite them all anyway
  and holds much more memory doing it; this streams the table's own files instead, leaves out
  the changed keys, appends their new versions and overwrites the table.
- `overwrite`: the table from any stream of rows (a new snapshot, new columns).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .sink.storage import Storage

logger = logging.getLogger(__name__)

DELETE_FLAG = "_nyc_collisions_delete"
# delta-rs holds a data file in memory until it reaches this size: it bounds a write's memory,
# and the smaller the files, the fewer rows a merge of a few keys rewrites
TARGET_FILE_BYTES = 32 << 20
# rows per batch handed to delta-rs: it queues batches by count, not size, while it encodes
# (65,536-row batches read from Parquet faster than it writes held ~450 MB more than these)
BATCH_ROWS = 8_192
# ... and when the rows are the table's own Parquet files, read faster than delta-rs writes, so
# that its queue stays full: half as many rows a batch hold about a fifth less, steadily
REWRITE_BATCH_ROWS = 4_096
# rows per Parquet row group: the writer holds one in memory, readers skip by their statistics
ROW_GROUP_ROWS = 65_536
# above this share of the table's files holding a changed key, or more changed keys than this,
# the table is rewritten instead (MERGE names the keys in its predicate, see `merge_changes`)
MERGE_MAX_FILE_SHARE = 0.5
MERGE_MAX_KEYS = 10_000


def writer_properties() -> Any:
    from deltalake import ColumnProperties, WriterProperties

    return WriterProperties(
        compression="ZSTD",
        max_row_group_size=ROW_GROUP_ROWS,
        default_column_properties=ColumnProperties(dictionary_enabled=False),
    )


def commit_properties(meta: dict[str, str] | None) -> Any:
    """A commit that fails when any other commit landed since the table was opened: delta-rs
    would otherwise replay it on top (a stale overwrite then keeps the other's files too)."""
    from deltalake import CommitProperties

    return CommitProperties(custom_metadata=meta, max_commit_retries=0)


@dataclass(frozen=True)
class Guard:
    """Called by a write before it commits: `check` raises when the run may not commit (its
    lease lost), `in_time` when the run is out of time."""

    check: Callable[[], None] = lambda: None
    in_time: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Written:
    """What one write committed: rows written, rows deleted, and the table's version after it."""

    rows: int
    deleted: int
    version: int


@dataclass(frozen=True)
class Target:
    """The table to write: the DeltaTable opened once by the sync (None: no table yet), and
    where it lives."""

    table: Any
    uri: str
    options: dict[str, str]


def overwrite(
    target: Target,
    schema: pa.Schema,
    tables: Iterable[pa.Table],
    meta: dict[str, str],
    guard: Guard,
    batch_rows: int = BATCH_ROWS,
) -> Written:
    """Overwrite the table (and its columns) with `tables`, streamed, in one commit. An error of
    `tables` or of `guard` is raised as itself, not as delta-rs's."""
    from deltalake import write_deltalake

    written = 0
    failed: list[BaseException] = []

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal written
        try:
            for table in tables:
                guard.in_time()
                written += table.num_rows
                yield from table.cast(schema).to_batches(max_chunksize=batch_rows)
            guard.in_time()
            guard.check()  # raised here, delta-rs ends the write without its commit
        except BaseException as exc:
            failed.append(exc)
            raise

    try:
        write_deltalake(
            target.uri if target.table is None else target.table,
            pa.RecordBatchReader.from_batches(schema, batches()),
            mode="overwrite",
            schema_mode="overwrite",
            storage_options=target.options if target.table is None else None,
            target_file_size=TARGET_FILE_BYTES,
            writer_properties=writer_properties(),
            commit_properties=commit_properties(meta),
        )
    except Exception:
        if failed:
            raise failed[0] from None
        raise
    # a checkpoint: readers load one file instead of every commit since, and
    # `_last_checkpoint` exists (a GET of a missing key is a 403 to a role that may list
    # only with a prefix, which readers would take for an error)
    from deltalake import DeltaTable

    # (the write brought an opened table up to its commit; a new one is opened once)
    table = target.table or DeltaTable(target.uri, storage_options=target.options)
    table.create_checkpoint()
    return Written(written, 0, table.version())


def touched_share(table: Any, key: str, keys: pa.Array) -> float:
    """The share of the table's files whose key range (their statistics) holds one of `keys`."""
    actions = pa.table(table.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return 0.0
    lows, highs = f"min.{key}", f"max.{key}"
    if lows not in actions.column_names or highs not in actions.column_names:
        return 1.0
    wanted = np.sort(np.asarray(keys.to_pylist(), dtype=object))
    touched = 0
    for low, high in zip(
        actions.column(lows).to_pylist(), actions.column(highs).to_pylist(), strict=True
    ):
        if low is None or high is None:
            touched += 1
            continue
        i = np.searchsorted(wanted, low, side="left")
        touched += int(i < len(wanted) and wanted[i] <= high)
    return float(touched / actions.num_rows)


def _literal(value: Any) -> str:
    if isinstance(value, int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def merge_changes(
    table: Any, key: str, changes: pa.Table, meta: dict[str, str], guard: Guard
) -> Written:
    """MERGE `changes` (rows with `DELETE_FLAG`) by `key`.

    The predicate also names the changed keys on the table's side: delta-rs then reads only
    the files whose statistics may hold one (without it, it reads the whole table into memory:
    2 GiB for crashes to add 1,000 new rows)."""
    keys = ", ".join(_literal(k) for k in changes.column(key).to_pylist())
    merge = (
        table.merge(
            changes,
            predicate=f's."{key}" = t."{key}" AND t."{key}" IN ({keys})',
            source_alias="s",
            target_alias="t",
            writer_properties=writer_properties(),
            commit_properties=commit_properties(meta),
        )
        .when_matched_delete(predicate=f's."{DELETE_FLAG}"')
        .when_matched_update_all(predicate=f'NOT s."{DELETE_FLAG}"', except_cols=[DELETE_FLAG])
        .when_not_matched_insert_all(predicate=f'NOT s."{DELETE_FLAG}"', except_cols=[DELETE_FLAG])
    )
    guard.in_time()
    guard.check()
    metrics = merge.execute()
    written = int(metrics.get("num_target_rows_inserted", 0)) + int(
        metrics.get("num_target_rows_updated", 0)
    )
    # (the merge brought `table` up to its commit)
    return Written(written, int(metrics.get("num_target_rows_deleted", 0)), table.version())


def rewrite_with_changes(
    storage: Storage,
    folder: str,
    target: Target,
    schema: pa.Schema,
    key: str,
    changes: pa.Table,
    meta: dict[str, str],
    guard: Guard,
) -> Written:
    """The table's rows but the changed keys, then the changes' live rows, as one overwrite
    (in `schema`, the table's); its files are read through the project's storage, a row group
    at a time. The rows counted written are the changes' live rows, as a MERGE's would be."""
    changed = changes.column(key).combine_chunks()
    live = changes.filter(pc.invert(changes.column(DELETE_FLAG))).drop_columns([DELETE_FLAG])
    paths = pa.table(target.table.get_add_actions(flatten=True)).column("path").to_pylist()

    def tables() -> Iterator[pa.Table]:
        for path in paths:
            with storage.open_reader(f"{folder}/table/{path}") as f:
                batches = pq.ParquetFile(f).iter_batches(
                    batch_size=REWRITE_BATCH_ROWS, use_threads=False
                )
                for batch in batches:
                    # (files delta-rs wrote hold string_view columns, which filter cannot take)
                    rows = pa.Table.from_batches([batch]).cast(schema)
                    yield rows.filter(pc.invert(pc.is_in(rows.column(key), value_set=changed)))
        yield live

    done = overwrite(target, schema, tables(), meta, guard, REWRITE_BATCH_ROWS)
    return Written(live.num_rows, changes.num_rows - live.num_rows, done.version)


def optimize(
    table: Any, meta: dict[str, str] | None, prune: bool, grace_hours: float, guard: Guard
) -> None:
    """Fold small files together; with `prune`, delete every file of the table's folder that
    no version of the last `grace_hours` needs (a full vacuum: also files whose remove entries
    checkpoints have dropped, and files of a killed write that no commit names; only this tool
    writes the table, under the lease)."""
    guard.check()
    table.optimize.compact(
        target_size=TARGET_FILE_BYTES,
        writer_properties=writer_properties(),
        commit_properties=commit_properties(meta),
    )
    if prune:
        guard.check()
        deleted = table.vacuum(
            retention_hours=math.ceil(grace_hours),
            dry_run=False,
            enforce_retention_duration=False,
            full=True,
            commit_properties=commit_properties(meta),
        )
        logger.info("table vacuum deleted %d files", len(deleted))


def vacuum_superseded(
    uri: str,
    table: Callable[[], Any],
    storage: Storage,
    folder: str,
    meta: dict[str, str] | None,
    hours: float,
    guard: Guard,
) -> None:
    """Delete the files that commits more than `hours` old removed from the table (a daily
    merge rewrites the files it touches, a rewrite all of them), so that unattended the folder
    holds about one copy of the table; files no commit names are left to `compact --prune`.
    The log goes on naming removed files for a week, deleted or not: it vacuums (a commit,
    with `meta`, so the mark stays the latest's) only when one is still in `folder`. A
    failure is a warning: the sync has committed, and the next one tries again."""
    guard.check()
    try:
        opened = table()
        expired = opened.vacuum(
            retention_hours=math.ceil(hours), dry_run=True, enforce_retention_duration=False
        )
        stored = {key[len(folder) + 1 :] for key in storage.list_keys(f"{folder}/")}
        if not stored.intersection(expired):
            return
        guard.check()
        deleted = opened.vacuum(
            retention_hours=math.ceil(hours),
            dry_run=False,
            enforce_retention_duration=False,
            commit_properties=commit_properties(meta),
        )
    except Exception as exc:
        logger.warning("%s: superseded files not deleted: %s", uri, exc)
        return
    if deleted:
        logger.info("%s: deleted %d files superseded %gh ago", uri, len(deleted), hours)
