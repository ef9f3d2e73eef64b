"""The current state of a landed dataset, read back from what the manifest names.

Current state = the latest snapshot batch, then every later batch in commit order, keeping for
each key its latest version, minus keys whose latest entry is a tombstone. Memory is bounded by
the keys of the batches after the snapshot (a daily update is small; `compact` folds them into a
new snapshot), never by the rows: files are streamed in record batches.

It is read in the manifest's columns, the newest. A batch landed with other columns (before the
source's columns changed, see `drift.py`) is read in its own and conformed: a column it lacks is
null, one it has that the newest lack is left out, and one whose type changed is null too (as a
drop and an add: the refresh that follows a change lands the new values).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .datasets import SYSTEM_FIELDS, Dataset, landed_name, resolve
from .errors import NothingLanded, StateError
from .manifest import Batch, Manifest
from .schema import Column, Schema
from .sink.files import FileEntry
from .sink.formats import read_text_batches
from .sink.storage import Storage
from .state import DatasetState


@dataclass
class Landed:
    """A dataset's committed manifest, with the schema and dataset it was landed with."""

    storage: Storage
    state: DatasetState
    manifest: Manifest
    schema: Schema
    dataset: Dataset

    @property
    def key_column(self) -> str:
        return landed_name(self.manifest.key)


def open_landed(storage: Storage, dataset: Dataset, state: DatasetState | None = None) -> Landed:
    """The committed manifest of `dataset` (read through `state`, the run's, when given)."""
    state = state or DatasetState(storage, dataset.name)
    manifest = state.load()
    if manifest is None or not manifest.current_batches():
        raise NothingLanded(
            f"{dataset.name}: nothing is landed at {storage.url}/{dataset.name}/ yet; "
            f"run `nyc-collisions backfill {dataset.name}` first"
        )
    schema = schema_of(manifest)
    known = resolve(manifest.dataset_id, manifest.key)
    schema = Schema(schema.columns, known.integer_fields, known.text_fields)
    return Landed(storage, state, manifest, schema, known)


def schema_of(manifest: Manifest) -> Schema:
    return Schema(tuple(Column(c["field"], c["type"]) for c in manifest.columns))


def key_schema(landed: Landed) -> Schema:
    col = next(c for c in landed.schema.columns if c.name == landed.key_column)
    return Schema((col,), landed.schema.integer_fields, landed.schema.text_fields)


def batch_schema(landed: Landed, batch: Batch) -> Schema:
    """The columns `batch`'s files were written with."""
    if batch.kind == "tombstones":
        return key_schema(landed)
    if batch.columns is None:
        return landed.schema
    columns = tuple(Column(c["field"], c["type"]) for c in batch.columns)
    return Schema(columns, landed.schema.integer_fields, landed.schema.text_fields)


def _file_batches(
    landed: Landed, batch: Batch, entry: FileEntry, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """One landed file's rows in the newest columns (or just `columns`)."""
    schema = batch_schema(landed, batch)
    if schema is landed.schema or batch.kind == "tombstones":
        yield from _read_file(landed, batch, schema, entry, columns)
        return
    want = list(columns or landed.schema.names)
    newest = {c.name: c for c in landed.schema.columns}
    keep = {landed.key_column, *(landed_name(f) for f in SYSTEM_FIELDS)}
    have = [
        c.name
        for c in schema.columns
        if c.name in want and (newest.get(c.name) == c or c.name in keep)
    ]
    for table in _read_file(landed, batch, schema, entry, have):
        n = table.num_rows
        yield pa.table(
            {
                name: table.column(name) if name in have else pa.nulls(n, pa.string())
                for name in want
            }
        )


def _read_file(
    landed: Landed, batch: Batch, schema: Schema, entry: FileEntry, columns: list[str] | None
) -> Iterator[pa.Table]:
    """One landed file's rows as written; a file that is not as committed is a `StateError`
    naming it."""
    where = f"{landed.storage.url}/{entry.path}"
    way_out = (
        f"`nyc-collisions backfill {landed.dataset.name} --force` lands a fresh snapshot "
        "(and `compact --prune` then drops the damaged batch)"
    )
    with landed.storage.open_reader(entry.path) as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        if entry.bytes > 0 and size != entry.bytes:
            raise StateError(
                f"{where}: landed file is {size:,} bytes, but {entry.bytes:,} were committed; "
                + way_out
            )
        want = list(schema.names if columns is None else columns)
        try:
            for table in read_text_batches(batch.format, f, schema, want):
                if sorted(table.column_names) != sorted(want):
                    raise ValueError(f"its columns are not the committed ones: {want}")
                yield table.select(want)
        except (pa.ArrowException, ValueError) as exc:  # ValueError: bytes that are not UTF-8
            raise StateError(f"{where}: landed file unreadable ({exc}); {way_out}") from exc


def iter_current(landed: Landed, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Stream the current state as text tables with every landed column (or just `columns`)."""
    batches = landed.manifest.current_batches()
    snapshot, later = batches[0], batches[1:]
    key = landed.key_column
    if not later:
        for entry in snapshot.files:
            yield from _file_batches(landed, snapshot, entry, columns)
        return
    read = None if columns is None else list(dict.fromkeys([*columns, key]))
    later_keys, winners = _winners(landed, later)
    for entry in snapshot.files:
        for table in _file_batches(landed, snapshot, entry, read):
            keep = pc.invert(pc.is_in(table.column(key), value_set=later_keys))
            yield table.filter(keep).select(columns or table.column_names)
    seq = 0
    for batch in later:
        for entry in batch.files:
            if batch.kind == "tombstones":
                seq += entry.rows
                continue
            for table in _file_batches(landed, batch, entry, columns):
                seqs = pa.array(np.arange(seq, seq + table.num_rows, dtype=np.int64))
                seq += table.num_rows
                yield table.filter(pc.is_in(seqs, value_set=winners))


def _winners(landed: Landed, later: list[Batch]) -> tuple[pa.Array, pa.Array]:
    """Keys touched after the snapshot, and the row numbers that hold their latest live version.

    Rows of the later batches are numbered in commit order; a key's latest version is its highest
    number; it is live unless that row is a tombstone.
    """
    key = landed.key_column
    keys: list[pa.Array] = []
    seqs: list[pa.Array] = []
    tombs: list[pa.Array] = []
    seq = 0
    for batch in later:
        for entry in batch.files:
            for table in _file_batches(landed, batch, entry, [key]):
                n = table.num_rows
                keys.append(table.column(key).combine_chunks())
                seqs.append(pa.array(np.arange(seq, seq + n, dtype=np.int64)))
                tombs.append(pa.array(np.full(n, batch.kind == "tombstones")))
                seq += n
    if not keys:
        return pa.array([], pa.string()), pa.array([], pa.int64())
    table = pa.table(
        {
            "key": pa.concat_arrays(keys),
            "seq": pa.concat_arrays(seqs),
            "tomb": pa.concat_arrays(tombs),
        }
    )
    latest = table.group_by("key").aggregate([("seq", "max")])
    live = table.filter(pc.invert(table.column("tomb"))).column("seq")
    winners = pc.filter(
        latest.column("seq_max"), pc.is_in(latest.column("seq_max"), value_set=live)
    )
    return latest.column("key").combine_chunks(), winners.combine_chunks()


def current_keys(landed: Landed, *extra: str) -> Iterator[pa.Table]:
    """Stream just the key column (and `extra` columns) of the current state."""
    yield from iter_current(landed, list(dict.fromkeys([landed.key_column, *extra])))


def current_count(landed: Landed) -> int:
    """Rows in the current state (the snapshot's count when nothing came after it)."""
    batches = landed.manifest.current_batches()
    if len(batches) == 1:
        return batches[0].rows
    return sum(t.num_rows for t in current_keys(landed))


def read_batch_file(
    landed: Landed, batch: Batch, entry: FileEntry, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """One committed file of `batch` as text tables in the newest columns, or just `columns`
    (a tombstone file: its keys alone)."""
    yield from _file_batches(landed, batch, entry, columns)
