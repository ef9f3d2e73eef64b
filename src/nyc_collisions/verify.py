"""Compare what landed with the source: row counts and the full set of unique keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from .current import Landed, current_keys
from .drift import SchemaChange
from .schema import Schema
from .socrata.source import DatasetSource

KEYS_PAGE = 100_000
SAMPLE = 10


@dataclass
class KeyDiff:
    dataset: str
    source_rows: int
    landed_rows: int
    missing: int = 0
    extra: int = 0
    duplicated: int = 0
    missing_sample: list[str] = field(default_factory=list)
    extra_sample: list[str] = field(default_factory=list)
    duplicated_sample: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.source_rows == self.landed_rows
            and not self.missing
            and not self.extra
            and not self.duplicated
        )


def source_key_column(source: DatasetSource) -> pa.Array:
    """Every key on the source, fetched `(:id, key)` only, by keyset pages on `:id`."""
    return source.all_keys(page=KEYS_PAGE).column(source.dataset.key).combine_chunks()


def landed_key_column(landed: Landed) -> pa.Array:
    chunks = [t.column(landed.key_column).combine_chunks() for t in current_keys(landed)]
    chunks = [c for c in chunks if len(c)]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def compare_keys(dataset: str, source_keys: pa.Array, landed_keys: pa.Array) -> KeyDiff:
    diff = KeyDiff(dataset, len(source_keys), len(landed_keys))
    missing = pc.filter(source_keys, pc.invert(pc.is_in(source_keys, value_set=landed_keys)))
    extra = pc.filter(landed_keys, pc.invert(pc.is_in(landed_keys, value_set=source_keys)))
    counts = pa.table({"k": landed_keys}).group_by("k").aggregate([("k", "count")])
    dups = counts.filter(pc.greater(counts.column("k_count"), 1)).column("k")
    diff.missing, diff.extra, diff.duplicated = len(missing), len(extra), len(dups)
    diff.missing_sample = [str(v) for v in missing[:SAMPLE].to_pylist()]
    diff.extra_sample = [str(v) for v in extra[:SAMPLE].to_pylist()]
    diff.duplicated_sample = [str(v) for v in dups[:SAMPLE].to_pylist()]
    return diff


def columns_drift(source: DatasetSource, landed: Landed) -> SchemaChange | None:
    """How the source's columns now differ from the landed ones (None: they do not)."""
    schema = Schema.from_metadata(source.dataset, source.metadata())
    return SchemaChange.between(landed.schema.columns, schema.columns)


def columns_changed(source: DatasetSource, landed: Landed) -> str | None:
    """One line when the source's columns are no longer the landed ones (None otherwise)."""
    change = columns_drift(source, landed)
    if change is None:
        return None
    name = landed.dataset.name
    return (
        f"{name}: the source's columns changed since they were landed ({change.describe()}); "
        f"run `nyc-collisions update {name}` first, which lands them"
    )


def verify(source: DatasetSource, landed: Landed) -> KeyDiff:
    return compare_keys(source.dataset.name, source_key_column(source), landed_key_column(landed))
