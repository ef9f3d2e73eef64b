"""Current rows of each dataset as immutable snapshots, plus the mutations that replace them.

A `Snapshot` is what one request reads: the generated table (byte buffer + offsets), rows changed
since (`patched`: slot -> inner JSON), per-slot numpy arrays of the key and the system fields, and
sorted indexes of the live slots: `by_id` (by `:id`), `by_upd` (by `:updated_at`, then `:id`),
and, computed on first use, a fixed shuffled order (answers without `$order`) and `by_key`.

Mutations (`Registry.insert/edit/delete/replace`) build a new snapshot and swap it in under a lock,
so a request in flight keeps a consistent view. Each mutation batch gets one `:updated_at` strictly
greater than any existing one (ms precision), so the `by_upd` index is maintained by appending.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from . import columns, data, hostile
from .schema import CRASHES, PERSONS, SCHEMAS, VEHICLES, Schema


@lru_cache(maxsize=65536)
def fixed_text(us: int) -> str:
    """`:created_at`/`:updated_at` text of a µs instant (cached: many rows share one)."""
    return data.format_fixed(us)


@lru_cache(maxsize=65536)
def _fixed_bytes(us: int) -> bytes:
    return fixed_text(us).encode()


@dataclass(frozen=True)
class Snapshot:
    """One consistent state of a dataset's rows; never modified once published."""

    schema: Schema
    generation: int
    changed_at: int  # µs of the last change (deletes included): metadata's rowsUpdatedAt
    base: memoryview
    base_offsets: np.ndarray
    patched: dict[int, bytes]
    key: np.ndarray
    sid: np.ndarray
    created: np.ndarray
    updated: np.ndarray
    version: np.ndarray
    by_id: np.ndarray
    ids_sorted: np.ndarray
    by_upd: np.ndarray
    upd_sorted: np.ndarray
    upd_ids: np.ndarray
    _lazy: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    _lazy_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.by_id)

    @property
    def base_n(self) -> int:
        return len(self.base_offsets) - 1

    @property
    def max_updated(self) -> int:
        return int(self.upd_sorted[-1]) if len(self.upd_sorted) else 0

    def vector_columns(self) -> dict[str, np.ndarray]:
        """Never-null per-slot columns usable by soql.vector_mask."""
        return {
            ":id": self.sid,
            ":created_at": self.created,
            ":updated_at": self.updated,
            ":version": self.version,
            self.schema.key: self.key,
        }

    def inners(self, slots: np.ndarray) -> list[Any]:
        """Inner JSON (object without braces, bytes-like) of each slot."""
        clipped = np.minimum(slots, self.base_n - 1)
        starts = self.base_offsets[clipped].tolist()
        ends = self.base_offsets[clipped + 1].tolist()
        mv = self.base
        out: list[Any] = [mv[a:b] for a, b in zip(starts, ends, strict=True)]
        if self.patched:
            get = self.patched.get
            for i, s in enumerate(slots.tolist()):
                p = get(s)
                if p is not None:
                    out[i] = p
        return out

    def decoded(self, slots: np.ndarray) -> list[dict[str, Any]]:
        """The data fields of each slot's row (null fields absent)."""
        return [orjson.loads(b"{" + inner + b"}") for inner in self.inners(slots)]

    def system_value(self, fieldname: str, slot: int) -> str:
        if fieldname == ":id":
            return bytes(self.sid[slot]).decode()
        if fieldname == ":version":
            return bytes(self.version[slot]).decode()
        arr = self.created if fieldname == ":created_at" else self.updated
        return fixed_text(int(arr[slot]))

    def system_values(self, fieldname: str, slots: np.ndarray) -> list[bytes]:
        """A system field's text (UTF-8) for each slot: `system_value` for many slots."""
        if fieldname in (":id", ":version"):
            values: list[bytes] = (self.sid if fieldname == ":id" else self.version)[slots].tolist()
            return values
        arr = self.created if fieldname == ":created_at" else self.updated
        return [_fixed_bytes(us) for us in arr[slots].tolist()]

    def typed_system(self, fieldname: str, slot: int) -> Any:
        """A system field as soql compares it: µs for timestamps, text otherwise."""
        if fieldname == ":created_at":
            return int(self.created[slot])
        if fieldname == ":updated_at":
            return int(self.updated[slot])
        return self.system_value(fieldname, slot)

    def rows(self, slots: np.ndarray) -> list[dict[str, Any]]:
        """JSON-style rows: system fields, then the data fields."""
        system = zip(
            self.sid[slots].tolist(),
            self.created[slots].tolist(),
            self.updated[slots].tolist(),
            self.version[slots].tolist(),
            strict=True,
        )
        return [
            {
                ":id": sid.decode(),
                ":created_at": fixed_text(created),
                ":updated_at": fixed_text(updated),
                ":version": version.decode(),
                **row,
            }
            for (sid, created, updated, version), row in zip(
                system, self.decoded(slots), strict=True
            )
        ]

    def shuffled(self) -> np.ndarray:
        """The live slots in a fixed arbitrary order (neither key nor :id order)."""
        with self._lazy_lock:
            if "shuffle" not in self._lazy:
                rank = data.scramble(self.by_id + (1 << 50))  # unrelated to :id and key order
                self._lazy["shuffle"] = self.by_id[np.argsort(rank, kind="stable")]
            return self._lazy["shuffle"]

    def cached(self, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """A value derived from this (immutable) snapshot, computed once."""
        with self._lazy_lock:
            if name not in self._lazy:
                self._lazy[name] = compute()
            return self._lazy[name]

    def by_key(self) -> tuple[np.ndarray, np.ndarray]:
        """(live slots sorted by the unique key, the sorted keys)."""
        with self._lazy_lock:
            if "by_key" not in self._lazy:
                order = self.by_id[np.argsort(self.key[self.by_id], kind="stable")]
                self._lazy["by_key"] = order
                self._lazy["key_sorted"] = self.key[order]
            return self._lazy["by_key"], self._lazy["key_sorted"]


def _initial(schema: Schema, table: data.Table) -> Snapshot:
    n = len(table)
    by_id = np.argsort(table.sid, kind="stable").astype(np.int64) if n else np.zeros(0, np.int64)
    ids_sorted = table.sid[by_id]
    by_upd = by_id[np.argsort(table.updated[by_id], kind="stable")]
    return Snapshot(
        schema=schema,
        generation=0,
        changed_at=int(table.updated.max()) if n else data.GENERATED_UNTIL_US,
        base=table.data.data,
        base_offsets=table.offsets,
        patched={},
        key=table.key,
        sid=table.sid,
        created=table.created,
        updated=table.updated,
        version=table.version,
        by_id=by_id,
        ids_sorted=ids_sorted,
        by_upd=by_upd,
        upd_sorted=table.updated[by_upd],
        upd_ids=table.sid[by_upd],
    )


@dataclass
class _Dataset:
    schema: Schema
    index: int
    snap: Snapshot
    next_version: int
    # columns added or retyped at run time: inserted and edited rows get values for them
    fill: dict[str, str] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        return self.schema is not SCHEMAS[self.schema.dataset_id]


class Registry:
    """All datasets of one server, their clock and their mutations."""

    def __init__(
        self,
        sizes: dict[str, int],
        seed: int,
        cache_dir: str | Path | None = None,
        hostile_text: bool = False,
    ) -> None:
        self.seed = seed
        self.hostile_text = hostile_text
        self._lock = threading.Lock()
        self._rng = np.random.default_rng([seed, 99])
        self._datasets: dict[str, _Dataset] = {}
        for index, (dataset_id, schema) in enumerate(SCHEMAS.items()):
            table = data.generate_table(
                schema, sizes[dataset_id], seed, sizes[CRASHES], cache_dir, hostile_text
            )
            self._datasets[dataset_id] = _Dataset(
                schema, index, _initial(schema, table), len(table)
            )
        self._clock = max(
            [data.GENERATED_UNTIL_US] + [d.snap.max_updated for d in self._datasets.values()]
        )

    def __contains__(self, dataset_id: object) -> bool:
        return dataset_id in self._datasets

    def snapshot(self, dataset_id: str) -> Snapshot:
        return self._datasets[dataset_id].snap

    def rows(self, dataset_id: str) -> Iterator[dict[str, Any]]:
        """Current rows in :id order, JSON-style (system fields as ':id' etc.)."""
        snap = self.snapshot(dataset_id)
        for a in range(0, len(snap), 4096):
            yield from snap.rows(snap.by_id[a : a + 4096])

    def _stamp(self) -> int:
        """A new mutation instant: now, and strictly after every existing one (ms)."""
        now = time.time_ns() // 1_000_000 * 1000
        self._clock = max(now, self._clock + 1000)
        return self._clock

    def _pick(self, snap: Snapshot, n: int) -> np.ndarray:
        if n < 0:
            raise ValueError("n must be >= 0")
        n = min(n, len(snap))
        return np.sort(self._rng.choice(snap.by_id, size=n, replace=False))

    def _result(
        self, dataset_id: str, stamp: int, snap: Snapshot, slots: np.ndarray
    ) -> dict[str, Any]:
        return {
            "dataset": dataset_id,
            "n": len(slots),
            "updated_at": fixed_text(stamp),
            "ids": [s.decode() for s in snap.sid[slots].tolist()],
            "keys": snap.key[slots].tolist(),
        }

    def insert(self, dataset_id: str, n: int) -> dict[str, Any]:
        """Append n new rows (new keys, new :id) at a new :updated_at."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            ds = self._datasets[dataset_id]
            old = ds.snap
            stamp = self._stamp()
            first = int(old.key.max()) if len(old.key) else 0
            keys = first + np.cumsum(self._rng.integers(1, 3, n, dtype=np.int64))
            parents = None
            if dataset_id in (PERSONS, VEHICLES):
                parents = self._parents(n)
            rows = data.new_rows(
                ds.schema, self._rng, keys, stamp // 86_400_000_000, parents, self.hostile_text
            )
            if ds.drifted:
                rows = [
                    columns.conform(ds.schema, orjson.loads(b"{" + r + b"}"), ds.fill, self._rng)
                    for r in rows
                ]
            start = len(old.key)
            slots = np.arange(start, start + n, dtype=np.int64)
            sids = data.row_ids(ds.index, self.seed, slots)
            stamps = np.full(n, stamp, np.int64)
            vers = data.versions(
                ds.index, self.seed, np.arange(ds.next_version, ds.next_version + n)
            )
            ds.next_version += n
            order = np.argsort(sids, kind="stable")
            pos = np.searchsorted(old.ids_sorted, sids[order])
            patched = dict(old.patched)
            patched.update(zip(slots.tolist(), rows, strict=True))
            snap = replace(
                old,
                generation=old.generation + 1,
                changed_at=stamp,
                patched=patched,
                key=np.concatenate([old.key, keys]),
                sid=np.concatenate([old.sid, sids]),
                created=np.concatenate([old.created, stamps]),
                updated=np.concatenate([old.updated, stamps]),
                version=np.concatenate([old.version, vers]),
                by_id=np.insert(old.by_id, pos, slots[order]),
                ids_sorted=np.insert(old.ids_sorted, pos, sids[order]),
                by_upd=np.concatenate([old.by_upd, slots[order]]),
                upd_sorted=np.concatenate([old.upd_sorted, stamps]),
                upd_ids=np.concatenate([old.upd_ids, sids[order]]),
                _lazy={},
                _lazy_lock=threading.Lock(),
            )
            ds.snap = snap
            return self._result(dataset_id, stamp, snap, slots)

    def _parents(self, n: int) -> data.Parents:
        """Crash references for n inserted child rows: among the newest crashes."""
        crashes = self._datasets[CRASHES].snap
        if not len(crashes):
            return data.parents_from_rows([{"collision_id": 1} for _ in range(n)])
        live = crashes.by_id
        newest = live[live >= max(0, len(crashes.key) - 5000)]
        pool = newest if len(newest) else live
        picked = np.sort(self._rng.choice(pool, size=n))
        return data.parents_from_rows(crashes.decoded(picked))

    def edit(self, dataset_id: str, n: int) -> dict[str, Any]:
        """Change some field values of n existing rows; they get a new :updated_at."""
        with self._lock:
            ds = self._datasets[dataset_id]
            old = ds.snap
            stamp = self._stamp()
            slots = self._pick(old, n)
            patched = dict(old.patched)
            fields = hostile.text_fields(ds.schema)
            for slot, row in zip(slots.tolist(), old.decoded(slots), strict=True):
                edited = data.edit_row(ds.schema, row, self._rng)
                if ds.fill:
                    edited = orjson.loads(
                        b"{" + columns.conform(ds.schema, edited, ds.fill, self._rng) + b"}"
                    )
                if self.hostile_text and self._rng.random() < 0.5:
                    patched[slot] = hostile.put(ds.schema, edited, fields, self._rng).encode()
                else:
                    patched[slot] = orjson.dumps(edited)[1:-1]
            updated = old.updated.copy()
            updated[slots] = stamp
            version = old.version.copy()
            version[slots] = data.versions(
                ds.index, self.seed, np.arange(ds.next_version, ds.next_version + len(slots))
            )
            ds.next_version += len(slots)
            keep = ~np.isin(old.by_upd, slots)
            moved = slots[np.argsort(old.sid[slots], kind="stable")]
            snap = replace(
                old,
                generation=old.generation + 1,
                changed_at=stamp,
                patched=patched,
                updated=updated,
                version=version,
                by_upd=np.concatenate([old.by_upd[keep], moved]),
                upd_sorted=np.concatenate([old.upd_sorted[keep], np.full(len(moved), stamp)]),
                upd_ids=np.concatenate([old.upd_ids[keep], old.sid[moved]]),
                _lazy={},
                _lazy_lock=threading.Lock(),
            )
            ds.snap = snap
            return self._result(dataset_id, stamp, snap, slots)

    def delete(self, dataset_id: str, n: int) -> dict[str, Any]:
        """Remove n random rows (they simply disappear, as on the real server)."""
        with self._lock:
            ds = self._datasets[dataset_id]
            old = ds.snap
            slots = self._pick(old, n)
            stamp = self._stamp()
            keep_id = ~np.isin(old.by_id, slots)
            keep_upd = ~np.isin(old.by_upd, slots)
            gone = set(slots.tolist())
            patched = {s: b for s, b in old.patched.items() if s not in gone}
            snap = replace(
                old,
                generation=old.generation + 1,
                changed_at=stamp,
                patched=patched,
                by_id=old.by_id[keep_id],
                ids_sorted=old.ids_sorted[keep_id],
                by_upd=old.by_upd[keep_upd],
                upd_sorted=old.upd_sorted[keep_upd],
                upd_ids=old.upd_ids[keep_upd],
                _lazy={},
                _lazy_lock=threading.Lock(),
            )
            ds.snap = snap
            result = self._result(dataset_id, stamp, old, slots)
            del result["updated_at"]
            return result

    def replace(self, dataset_id: str) -> dict[str, Any]:
        """Full replace: every row gets one new :updated_at; values and :id unchanged."""
        with self._lock:
            ds = self._datasets[dataset_id]
            old = ds.snap
            stamp = self._stamp()
            updated = old.updated.copy()
            updated[old.by_id] = stamp
            snap = replace(
                old,
                generation=old.generation + 1,
                changed_at=stamp,
                updated=updated,
                by_upd=old.by_id,
                upd_sorted=np.full(len(old.by_id), stamp, np.int64),
                upd_ids=old.ids_sorted,
                _lazy={},
                _lazy_lock=threading.Lock(),
            )
            ds.snap = snap
            return {"dataset": dataset_id, "n": len(snap), "updated_at": fixed_text(stamp)}

    # -- columns changed at run time (see `columns`) --------------------------------------
    def add_column(
        self, dataset_id: str, field: str, soda_type: str, position: int | None = None
    ) -> dict[str, Any]:
        """A new column (null in every existing row) at `position` (1-based; default last)."""
        with self._lock:
            ds = self._datasets[dataset_id]
            self._new_schema(ds, columns.added(ds.schema, field, soda_type, position))
            ds.fill[field] = soda_type
            return self._columns_result(ds)

    def drop_column(self, dataset_id: str, field: str) -> dict[str, Any]:
        """The column is gone from the metadata and from every row."""
        with self._lock:
            ds = self._datasets[dataset_id]
            schema = columns.dropped(ds.schema, field)
            old = ds.snap
            ends = old.base_offsets.tolist()
            base = columns.without((old.base[a:b] for a, b in pairwise(ends)), field)
            offsets = np.zeros(len(base) + 1, np.int64)
            np.cumsum([len(b) for b in base], out=offsets[1:])
            patched = dict(
                zip(old.patched, columns.without(old.patched.values(), field), strict=True)
            )
            ds.snap = replace(
                old, base=memoryview(b"".join(base)), base_offsets=offsets, patched=patched
            )
            self._new_schema(ds, schema)
            ds.fill.pop(field, None)
            return self._columns_result(ds)

    def retype_column(self, dataset_id: str, field: str, soda_type: str) -> dict[str, Any]:
        """The column's type changes; stored values stay (refused if they do not fit)."""
        with self._lock:
            ds = self._datasets[dataset_id]
            schema = columns.retyped(ds.schema, field, soda_type)
            snap = ds.snap
            columns.check_fits(schema, field, soda_type, snap.decoded(snap.by_id))
            self._new_schema(ds, schema)
            ds.fill[field] = soda_type
            return self._columns_result(ds)

    def move_column(self, dataset_id: str, field: str, position: int) -> dict[str, Any]:
        """The column moves to `position` (1-based) in the metadata; rows are unchanged."""
        with self._lock:
            ds = self._datasets[dataset_id]
            self._new_schema(ds, columns.moved(ds.schema, field, position))
            return self._columns_result(ds)

    def _new_schema(self, ds: _Dataset, schema: Schema) -> None:
        ds.schema = schema
        ds.snap = replace(
            ds.snap,
            schema=schema,
            generation=ds.snap.generation + 1,
            _lazy={},
            _lazy_lock=threading.Lock(),
        )

    def _columns_result(self, ds: _Dataset) -> dict[str, Any]:
        return {
            "dataset": ds.schema.dataset_id,
            "columns": [[c.field, c.soda_type] for c in ds.schema.columns],
        }
