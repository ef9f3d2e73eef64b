"""Compare what landed with the source: row counts and the full set of unique keys.

The source's keys are scanned over `:id` partitions at once (`keyscan.py`) while a thread reads
the landed current keys; both are spilled to local files hash-partitioned by key
(`keyspill.py`) and compared one bucket at a time, so memory holds a bucket, never the key sets.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from .current import Landed, current_keys
from .drift import SchemaChange
from .errors import Interrupted
from .keyscan import KeyScan, PartitionSink, ScanPlan, key_schema, keys_page, scan_threads
from .keyspill import KeySpill, bucket_count
from .plan import Partition
from .schema import Schema
from .source import DatasetSource

SAMPLE = 10  # keys shown of each kind of difference


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

    def add(self, source_keys: pa.Array, landed_keys: pa.Array) -> None:
        """Count one bucket of each side's keys (every copy of a key is in the same bucket)."""
        self.source_rows += len(source_keys)
        self.landed_rows += len(landed_keys)
        missing = pc.filter(source_keys, pc.invert(pc.is_in(source_keys, value_set=landed_keys)))
        extra = pc.filter(landed_keys, pc.invert(pc.is_in(landed_keys, value_set=source_keys)))
        # nulls counted too: rows without a key are as many rows under one key
        every = pc.CountOptions(mode="all")
        counts = pa.table({"k": landed_keys}).group_by("k").aggregate([("k", "count", every)])
        dups = counts.filter(pc.greater(counts.column("k_count"), 1)).column("k")
        self.missing += len(missing)
        self.extra += len(extra)
        self.duplicated += len(dups)
        for sample, found in (
            (self.missing_sample, missing),
            (self.extra_sample, extra),
            (self.duplicated_sample, dups),
        ):
            sample += [str(v) for v in found[: SAMPLE - len(sample)].to_pylist()]


def compare_keys(dataset: str, source_keys: pa.Array, landed_keys: pa.Array) -> KeyDiff:
    diff = KeyDiff(dataset, 0, 0)
    diff.add(source_keys, landed_keys)
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


class _ToSpill:
    def __init__(self, spill: KeySpill, column: str) -> None:
        self.spill = spill
        self.column = column

    def write(self, table: pa.Table) -> None:
        self.spill.add("source", table.select([self.column]))

    def end(self, done: bool, after: str | None) -> None:
        pass

    def abort(self) -> None:
        pass


def verify(
    source: DatasetSource,
    landed: Landed,
    workers: int | None = None,
    stop: threading.Event | None = None,
) -> KeyDiff:
    key = landed.key_column
    stop = stop or threading.Event()
    schema = key_schema(source)
    workers = scan_threads(source, workers)
    plan = ScanPlan.start("verify", source, tuple(schema.field_names), workers, keys_page())
    expected = max(plan.source_count, landed.manifest.current_rows() or 0)
    side = pa.schema([pa.field(key, pa.string())])
    with KeySpill({"source": side, "landed": side}, key, bucket_count(expected)) as spill:

        def read_landed(stop: threading.Event) -> None:
            for table in current_keys(landed):
                if stop.is_set():
                    return
                spill.add("landed", table.select([key]))

        sink = _ToSpill(spill, key)

        def open_sink(_partition: Partition) -> PartitionSink:
            return sink

        scan = KeyScan(
            source, schema, plan, workers=workers, stop=stop, out_of_time=lambda: False,
            open_sink=open_sink,
        )  # fmt: skip
        if not scan.run(beside=read_landed):
            raise Interrupted(f"{source.dataset.name}: verify stopped before the end")
        diff = KeyDiff(source.dataset.name, 0, 0)
        for bucket in spill.pairs():
            diff.add(bucket["source"].column(key), bucket["landed"].column(key))
    return diff
