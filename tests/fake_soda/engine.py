"""Run a SoQL query against a snapshot and render the resulting rows as JSON or CSV.

Planning, cheapest first:

1. The `$order` picks a sorted index: `:id` -> `by_id`; `:updated_at, :id` -> `by_upd`; the unique
   key -> `by_key`; no `$order` -> a fixed shuffled order. `$where` conjuncts that bound the index
   (`:id > 'X' AND :id <= 'Y'`, `:updated_at >= 'T'`, the incremental
   `:updated_at > 'T' OR (:updated_at = 'T' AND :id > 'K')`, `collision_id < 5`) become a range
   found by binary search, so a keyset page costs O(log n + page).
2. Other conjuncts on system fields and the key are evaluated with numpy on blocks of the range.
3. Anything else is evaluated per row on decoded JSON, and any other `$order` sorts in Python
   (ties in a random order, like the real server's unstable order on non-unique columns).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any, Literal

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from . import soql
from .schema import (
    FIXED,
    FLOATING,
    LOCATION,
    NUMBER,
    POINT,
    ROW_ID,
    ROW_VERSION,
    SYSTEM_COLUMNS,
    SYSTEM_FIELDS,
    TEXT,
    Column,
    Schema,
)
from .store import Snapshot, fixed_text

BLOCK = 65_536
ARROW_CSV_ROWS = 20_000  # rows the Arrow CSV renderer writes at once
DEFAULT_LIMIT = 1000
_UNSUPPORTED = ("$query", "$q", "$search")


@dataclass(frozen=True)
class Query:
    select: tuple[soql.SelectItem, ...]
    where: soql.Expr | None
    order: tuple[soql.OrderItem, ...]
    limit: int
    offset: int
    group: tuple[Column, ...] = ()
    having: soql.Having | None = None

    @property
    def aggregate(self) -> bool:
        return any(isinstance(i, soql.Aggregate) for i in self.select)


def parse_query(params: list[tuple[str, str]], schema: Schema) -> Query:
    """A Query from decoded URL parameters; `$$` parameters (app token, ...) are ignored."""
    select: list[soql.SelectItem] = [soql.AllData()]
    wheres: list[soql.Expr] = []
    order: list[soql.OrderItem] = []
    limit, offset = DEFAULT_LIMIT, 0
    named = dict(params)
    group = tuple(soql.parse_group(named["$group"], schema)) if "$group" in named else ()
    for name, value in params:
        if name.startswith("$$") or name in ("$group", "$having"):
            continue
        if name in _UNSUPPORTED:
            raise soql.Malformed(f"{name} is not supported by the fake SODA server")
        if name == "$select":
            select = soql.parse_select(value, schema, grouped=bool(group))
        elif name == "$where":
            wheres.append(soql.parse_where(value, schema))
        elif name == "$order":
            order = soql.parse_order(value, schema)
        elif name in ("$limit", "$offset"):
            if not value.isdigit():
                raise soql.Malformed(f"Invalid {name}: {value!r} is not a non-negative integer")
            limit, offset = (int(value), offset) if name == "$limit" else (limit, int(value))
        elif name.startswith("$"):
            raise soql.Malformed(f"Unrecognized arguments [{name}]")
        else:
            wheres.append(soql.simple_filter(name, value, schema))
    having = None
    if "$having" in named:
        if not group:
            raise soql.Malformed("$having needs $group")
        having = soql.parse_having(named["$having"], select)
    for item in select if group else ():
        if isinstance(item, soql.AllData | soql.AllSystem) or (
            isinstance(item, soql.SelectColumn) and item.column not in group
        ):
            raise soql.Malformed(
                "Invalid $select: with $group, columns must be grouped or aggregated"
            )
    query = Query(tuple(select), soql.and_all(wheres), tuple(order), limit, offset, group, having)
    return query


# ----------------------------------------------------------------------------------------------
# Output columns


@dataclass(frozen=True)
class OutColumn:
    key: str
    soda_type: str


def out_columns(query: Query, schema: Schema) -> list[OutColumn]:
    cols: list[OutColumn] = []
    for item in query.select:
        if isinstance(item, soql.AllData):
            cols += [OutColumn(c.field, c.soda_type) for c in schema.columns]
        elif isinstance(item, soql.AllSystem):
            cols += [OutColumn(c.field, c.soda_type) for c in SYSTEM_COLUMNS]
        elif isinstance(item, soql.SelectColumn):
            cols.append(OutColumn(item.key, item.column.soda_type))
        else:
            column = item.column
            if column is None or item.func in ("count", "sum"):
                cols.append(OutColumn(item.key, NUMBER))
            else:
                cols.append(OutColumn(item.key, column.soda_type))
    return cols


# ----------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class _Scan:
    order: np.ndarray  # slots in index order
    lo: int
    hi: int
    reverse: bool
    vector: soql.Expr | None  # numpy-evaluated filter
    rows: soql.Expr | None  # per-row filter

    @property
    def unfiltered(self) -> bool:
        return self.vector is None and self.rows is None


def _bounds(sorted_arr: np.ndarray, op: str, value: Any) -> tuple[int, int] | None:
    """Positions [lo, hi) of sorted_arr whose elements satisfy `x op value`."""
    n = len(sorted_arr)
    if isinstance(value, str):
        value = value.encode()
        width = sorted_arr.dtype.itemsize
        if len(value) > width:  # longer than every element: compare with its prefix
            value = value[:width]
            op = {">=": ">", "<": "<=", "=": "never"}.get(op, op)

    def left() -> int:
        return int(np.searchsorted(sorted_arr, value, "left"))

    def right() -> int:
        return int(np.searchsorted(sorted_arr, value, "right"))

    match op:
        case ">":
            return right(), n
        case ">=":
            return left(), n
        case "<":
            return 0, left()
        case "<=":
            return 0, right()
        case "=":
            return left(), right()
        case "never":
            return 0, 0
    return None


def _tuple_after(expr: soql.Expr) -> tuple[Any, str, Any] | None:
    """(T, op, K) when expr is `:updated_at > T OR (:updated_at = T AND :id > K)` (any order)."""
    if not isinstance(expr, soql.Or):
        return None
    for gt, eq in ((expr.left, expr.right), (expr.right, expr.left)):
        if not (
            isinstance(gt, soql.Compare)
            and gt.column.field == ":updated_at"
            and gt.op == ">"
            and isinstance(eq, soql.And)
        ):
            continue
        parts = soql.conjuncts(eq)
        ts = [
            p
            for p in parts
            if isinstance(p, soql.Compare)
            and p.column.field == ":updated_at"
            and p.op == "="
            and p.value == gt.value
        ]
        ids = [
            p
            for p in parts
            if isinstance(p, soql.Compare) and p.column.field == ":id" and p.op in (">", ">=")
        ]
        if len(parts) == 2 and ts and ids:
            return gt.value, ids[0].op, ids[0].value
    return None


def _narrow(
    snap: Snapshot, kind: str, conj: list[soql.Expr]
) -> tuple[np.ndarray, int, int, list[soql.Expr]]:
    """(index order, lo, hi, conjuncts not used) for one index kind."""
    if kind == "shuffle":
        order = snap.shuffled()
        return order, 0, len(order), conj
    if kind == "id":
        order, sorted_arr, field = snap.by_id, snap.ids_sorted, ":id"
    elif kind == "upd":
        order, sorted_arr, field = snap.by_upd, snap.upd_sorted, ":updated_at"
    else:
        (order, sorted_arr), field = snap.by_key(), snap.schema.key
    lo, hi = 0, len(order)
    rest = []
    for c in conj:
        bound = None
        if isinstance(c, soql.Compare) and c.column.field == field:
            bound = _bounds(sorted_arr, c.op, c.value)
        elif kind == "upd" and (after := _tuple_after(c)) is not None:
            t, op, k = after
            a, b = _bounds(snap.upd_sorted, "=", t) or (0, 0)
            side: Literal["left", "right"] = "right" if op == ">" else "left"
            key = k.encode()[: snap.upd_ids.dtype.itemsize]
            if op == ">=" and len(k.encode()) > len(key):
                side = "right"
            bound = (a + int(np.searchsorted(snap.upd_ids[a:b], key, side)), len(order))
        if bound is None:
            rest.append(c)
        else:
            lo, hi = max(lo, bound[0]), min(hi, bound[1])
    return order, lo, max(lo, hi), rest


def _index_kind(order: tuple[soql.OrderItem, ...], schema: Schema) -> tuple[str, bool]:
    """(index kind, reverse) serving this $order, or ("generic", False)."""
    if not order:
        return "shuffle", False
    first = order[0]
    if first.column.field == ":id":
        return "id", first.desc
    if first.column.field == schema.key:
        return "key", first.desc
    if (
        len(order) >= 2
        and first.column.field == ":updated_at"
        and order[1].column.field == ":id"
        and order[1].desc == first.desc
    ):
        return "upd", first.desc
    return "generic", False


def _scan(snap: Snapshot, kinds: tuple[str, ...], reverse: bool, where: soql.Expr | None) -> _Scan:
    """The narrowest of the given index kinds, with the leftover filters split."""
    conj = soql.conjuncts(where)
    best = min((_narrow(snap, k, conj) for k in kinds), key=lambda t: t[2] - t[1])
    order, lo, hi, rest = best
    vec_cols = snap.vector_columns()
    vector = [c for c in rest if soql.vectorizable(c, vec_cols)]
    rows = [c for c in rest if not soql.vectorizable(c, vec_cols)]
    return _Scan(order, lo, hi, reverse, soql.and_all(vector), soql.and_all(rows))


def _row_getter(snap: Snapshot, slot: int, inner: Any) -> Callable[[Column], Any]:
    """Typed column values of one row; its JSON (`inner`) is decoded on first need."""
    decoded: dict[str, Any] | None = None

    def get(column: Column) -> Any:
        nonlocal decoded
        if column.field in SYSTEM_FIELDS:
            return snap.typed_system(column.field, slot)
        if decoded is None:
            decoded = orjson.loads(b"{" + inner + b"}")
        return soql.typed(column, decoded.get(column.field))

    return get


def _blocks(snap: Snapshot, scan: _Scan) -> Iterator[np.ndarray]:
    """Slots of the scan range, in order, that pass the vector filter, a block at a time."""
    vec_cols = snap.vector_columns()
    starts = range(scan.lo, scan.hi, BLOCK)
    for a in reversed(starts) if scan.reverse else starts:
        b = min(a + BLOCK, scan.hi)
        slots = scan.order[a:b][::-1] if scan.reverse else scan.order[a:b]
        if scan.vector is not None:
            column = partial(_gather, vec_cols, slots)
            slots = slots[soql.vector_mask(scan.vector, column, len(slots))]
        yield slots


def _gather(columns: dict[str, np.ndarray], slots: np.ndarray, field: str) -> np.ndarray:
    values: np.ndarray = columns[field][slots]
    return values


def _row_filter(snap: Snapshot, scan: _Scan, slots: np.ndarray) -> Iterator[int]:
    if scan.rows is None:
        yield from slots.tolist()
        return
    for s, inner in zip(slots.tolist(), snap.inners(slots), strict=True):
        if soql.evaluate(scan.rows, _row_getter(snap, s, inner)) is True:
            yield s


def _page(snap: Snapshot, scan: _Scan, offset: int, limit: int) -> tuple[np.ndarray, int]:
    """(slots of the page, rows skipped by the offset)."""
    if scan.unfiltered:
        n = scan.hi - scan.lo
        skipped = min(offset, n)
        take = min(limit, n - skipped)
        if scan.reverse:
            end = scan.hi - skipped
            return scan.order[end - take : end][::-1], skipped
        start = scan.lo + skipped
        return scan.order[start : start + take], skipped
    out: list[np.ndarray] = []
    got = skipped = 0
    for block in _blocks(snap, scan):
        if got >= limit:
            break
        if scan.rows is None:
            k = min(offset - skipped, len(block))
            skipped += k
            part = block[k : k + limit - got]
        else:
            kept = []
            for s in _row_filter(snap, scan, block):
                if skipped < offset:
                    skipped += 1
                    continue
                kept.append(s)
                if got + len(kept) >= limit:
                    break
            part = np.array(kept, np.int64)
        out.append(part)
        got += len(part)
    return (np.concatenate(out) if out else np.zeros(0, np.int64)), skipped


def _all(snap: Snapshot, scan: _Scan) -> np.ndarray:
    if scan.unfiltered:
        part: np.ndarray = scan.order[scan.lo : scan.hi]
        if scan.reverse:
            part = part[::-1]
        return part
    out = [np.fromiter(_row_filter(snap, scan, b), np.int64) for b in _blocks(snap, scan)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------------------------
# Execution


@dataclass(frozen=True)
class Page:
    """A query's answer: rows to render (slots) or aggregate objects, and the offset skipped."""

    columns: list[OutColumn]
    slots: np.ndarray | None
    objects: list[dict[str, Any]] | None
    skipped: int

    def __len__(self) -> int:
        if self.objects is not None:
            return len(self.objects)
        return 0 if self.slots is None else len(self.slots)


def execute(query: Query, snap: Snapshot, rnd: random.Random) -> Page:
    cols = out_columns(query, snap.schema)
    if query.group:
        scan = _scan(snap, ("id", "upd"), False, query.where)
        groups = _grouped(snap, query, _all(snap, scan))
        return Page(cols, None, groups[query.offset : query.offset + query.limit], 0)
    if query.aggregate:
        scan = _scan(snap, ("id", "upd"), False, query.where)
        objects = [_aggregate(snap, query, scan)] if query.offset == 0 and query.limit else []
        return Page(cols, None, objects, 0)
    kind, reverse = _index_kind(query.order, snap.schema)
    if kind != "generic":
        scan = _scan(snap, (kind,), reverse, query.where)
        slots, skipped = _page(snap, scan, query.offset, query.limit)
        return Page(cols, slots, None, skipped)
    scan = _scan(snap, ("id", "upd"), False, query.where)
    matching = np.random.default_rng(rnd.getrandbits(64)).permutation(_all(snap, scan))
    ordered = _sorted(snap, matching, query.order)
    skipped = min(query.offset, len(ordered))
    return Page(cols, ordered[skipped : skipped + query.limit], None, skipped)


def _sorted(snap: Snapshot, slots: np.ndarray, order: tuple[soql.OrderItem, ...]) -> np.ndarray:
    """Stable multi-key sort; nulls last ascending, first descending (PostgreSQL's rule)."""
    if not len(slots):
        return slots
    keys = []
    for item in reversed(order):  # np.lexsort sorts by its last key first
        rank = _rank(snap, item.column)[slots]
        keys.append(-rank if item.desc else rank)
    return slots[np.lexsort(keys)]


def _rank(snap: Snapshot, column: Column) -> np.ndarray:
    """Every slot's dense rank by `column` (nulls last), computed once per snapshot: ordering a
    page by a data field then costs a vector sort, not a decode of every row."""

    def compute() -> np.ndarray:
        vec = snap.vector_columns().get(column.field)
        if vec is not None:
            return np.unique(vec, return_inverse=True)[1].astype(np.int64)
        decoded = snap.decoded(np.arange(len(snap.key)))
        keys = [(v is None, v) for v in (soql.typed(column, d.get(column.field)) for d in decoded)]
        index = {k: i for i, k in enumerate(sorted(set(keys)))}
        return np.fromiter((index[k] for k in keys), np.int64, len(keys))

    return snap.cached(f"rank:{column.field}", compute)


def _aggregate(snap: Snapshot, query: Query, scan: _Scan) -> dict[str, Any]:
    simple_count = all(
        isinstance(i, soql.Aggregate) and i.func == "count" and i.column is None
        for i in query.select
    )
    slots = None if simple_count and scan.unfiltered else _all(snap, scan)
    n = scan.hi - scan.lo if slots is None else len(slots)
    out: dict[str, Any] = {}
    for item in query.select:
        assert isinstance(item, soql.Aggregate)
        if item.column is None:
            out[item.key] = str(n)
            continue
        assert slots is not None
        col = item.column
        vec_cols = snap.vector_columns()
        if col.field in vec_cols:
            value = _vector_aggregate(snap, item.func, col.field, vec_cols[col.field][slots])
            if value is not None:
                out[item.key] = value
            continue
        raw = [
            row.get(col.field)
            for a in range(0, len(slots), BLOCK)
            for row in snap.decoded(slots[a : a + BLOCK])
        ]
        present = [v for v in raw if v is not None]
        if item.func == "count":
            out[item.key] = str(len(present))
        elif item.func == "sum":
            if present:
                out[item.key] = str(sum((Decimal(v) for v in present), Decimal(0)))
        elif present:
            pick = max if item.func == "max" else min
            out[item.key] = pick(present, key=partial(soql.typed, col))
    return out


def _grouped(snap: Snapshot, query: Query, slots: np.ndarray) -> list[dict[str, Any]]:
    """One object a group of `query.group`'s values (nulls one group, as in SQL), with its
    `count` aggregates, kept by `query.having`; the other aggregates are not grouped here."""
    vec_cols = snap.vector_columns()

    def values(col: Column) -> list[Any]:
        if col.field in vec_cols:
            return [_vector_text(col.field, v) for v in vec_cols[col.field][slots]]
        rows = (r for a in range(0, len(slots), BLOCK) for r in snap.decoded(slots[a : a + BLOCK]))
        return [r.get(col.field) for r in rows]

    keys = list(zip(*(values(c) for c in query.group), strict=True)) if len(slots) else []
    counted: dict[tuple[Any, ...], int] = {}
    for key in keys:
        counted[key] = counted.get(key, 0) + 1
    out = []
    for key, n in counted.items():
        if query.having is not None and not query.having.holds(n):
            continue
        obj = {c.field: v for c, v in zip(query.group, key, strict=True) if v is not None}
        for item in query.select:
            if isinstance(item, soql.Aggregate):
                if item.func != "count" or item.column is not None:
                    raise soql.Malformed("the fake groups count(*) only")
                obj[item.key] = str(n)
        out.append(obj)
    return out


def _vector_text(field: str, v: Any) -> str:
    if field in (":created_at", ":updated_at"):
        return fixed_text(int(v))
    return bytes(v).decode() if field in (":id", ":version") else str(int(v))


def _vector_aggregate(snap: Snapshot, func: str, field: str, values: np.ndarray) -> str | None:
    """count/max/min/sum of a never-null system or key column, as the server writes it."""
    if func == "count":
        return str(len(values))
    if not len(values):
        return None
    if func == "sum":
        return str(int(values.sum()))
    return _vector_text(field, values.max() if func == "max" else values.min())


# ----------------------------------------------------------------------------------------------
# Rendering


class Renderer:
    """Turns page slots into JSON objects (bytes, one per row) or CSV lines."""

    def __init__(self, snap: Snapshot, query: Query, columns: list[OutColumn]) -> None:
        self.snap = snap
        self.items = query.select
        self.columns = columns
        key = snap.schema.key
        self.fast = all(
            isinstance(i, soql.AllData | soql.AllSystem)
            or (
                isinstance(i, soql.SelectColumn)
                and i.key == i.column.field
                and (i.column.field in SYSTEM_FIELDS or i.column.field == key)
            )
            for i in self.items
        )
        # CSV rendered by Arrow when every cell is a JSON string as stored (see `_csv_arrow`)
        self.csv_fast = self.fast and all(c.soda_type in _ARROW_CSV_TYPES for c in columns)
        self._data_schema = pa.schema([pa.field(c.field, pa.string()) for c in snap.schema.columns])
        self._csv_block: tuple[int, list[bytes]] = (0, [])

    def json_rows(self, page: Page, a: int, b: int) -> list[bytes]:
        if page.objects is not None:
            return [orjson.dumps(o) for o in page.objects[a:b]]
        assert page.slots is not None
        slots = page.slots[a:b]
        if not self.fast:
            return [orjson.dumps(o) for o in self._objects(slots)]
        parts: list[list[Any]] = []
        for item in self.items:
            if isinstance(item, soql.AllData):
                parts.append(self.snap.inners(slots))
            elif isinstance(item, soql.AllSystem):
                parts += [self._system_frags(f, slots) for f in SYSTEM_FIELDS]
            else:
                assert isinstance(item, soql.SelectColumn)
                parts.append(self._system_frags(item.column.field, slots))
        return [b"{" + b",".join(p) + b"}" for p in zip(*parts, strict=True)]

    def _system_frags(self, field: str, slots: np.ndarray) -> list[bytes]:
        head = f'"{field}":"'.encode()
        if field in SYSTEM_FIELDS:
            return [head + v + b'"' for v in self.snap.system_values(field, slots)]
        return [head + str(k).encode() + b'"' for k in self.snap.key[slots].tolist()]

    def _objects(self, slots: np.ndarray) -> list[dict[str, Any]]:
        """The selected items of each row as a dict (null fields absent)."""
        if self.items == (soql.AllData(),):
            return self.snap.decoded(slots)
        out = []
        for row in self.snap.rows(slots):
            obj: dict[str, Any] = {}
            for item in self.items:
                if isinstance(item, soql.AllSystem):
                    obj.update({f: row[f] for f in SYSTEM_FIELDS})
                elif isinstance(item, soql.AllData):
                    obj.update({k: v for k, v in row.items() if not k.startswith(":")})
                else:
                    assert isinstance(item, soql.SelectColumn)
                    if row.get(item.column.field) is not None:
                        obj[item.key] = row[item.column.field]
            out.append(obj)
        return out

    def csv_header(self) -> bytes:
        return (",".join(_csv_cell(c.key, TEXT) for c in self.columns) + "\n").encode()

    def csv_rows(self, page: Page, a: int, b: int) -> list[bytes]:
        if page.objects is None and self.csv_fast:
            assert page.slots is not None
            lo, cached = self._csv_block
            if not lo <= a < b <= lo + len(cached):
                # Arrow renders a block of rows at once; its lines are then sent in writes
                lines = self._csv_arrow(page.slots[a : a + ARROW_CSV_ROWS])
                lo, cached = a, lines or []
                self._csv_block = lo, cached
                self.csv_fast = lines is not None  # else the rest of the page cell by cell
            if lo <= a < b <= lo + len(cached):
                return cached[a - lo : b - lo]
        if page.objects is not None:
            objects = page.objects[a:b]
        else:
            assert page.slots is not None
            objects = self._objects(page.slots[a:b])
        columns = [(c.key, c.soda_type, c.soda_type == NUMBER) for c in self.columns]
        lines = []
        for o in objects:
            cells = []
            for key, soda_type, number in columns:
                v = o.get(key)
                if type(v) is str and not (number and _tiny(v)):  # the common case, inlined
                    cells.append('"' + v.replace('"', '""') + '"')
                else:
                    cells.append(_csv_cell(v, soda_type))
            lines.append((",".join(cells) + "\n").encode())
        return lines

    def _csv_arrow(self, slots: np.ndarray) -> list[bytes] | None:
        """The rows' CSV lines written by Arrow, byte for byte what `_csv_cell` writes (every
        value quoted, `"` doubled, null empty), several times cheaper than in Python: the stored
        JSON is read by Arrow's JSON reader, system fields come from their arrays. None (the
        Python renderer is used) when a stored value is not a JSON string or a field unknown."""
        if not len(slots):
            return []
        body = b"{" + b"}\n{".join(self.snap.inners(slots)) + b"}\n"
        try:
            stored = pajson.read_json(
                pa.BufferReader(body),
                read_options=pajson.ReadOptions(use_threads=False, block_size=len(body) + 1),
                parse_options=pajson.ParseOptions(
                    explicit_schema=self._data_schema, unexpected_field_behavior="error"
                ),
            )
        except pa.ArrowInvalid:
            return None
        arrays = []
        for c in self.columns:
            if c.key in SYSTEM_FIELDS:
                values = pa.array(self.snap.system_values(c.key, slots), pa.binary())
                values = values.cast(pa.string())
            else:
                values = stored.column(c.key).combine_chunks()
            if c.soda_type == NUMBER:
                values = _big_decimal_texts(values)
            arrays.append(values)
        table = pa.Table.from_arrays(arrays, names=[f"c{i}" for i in range(len(arrays))])
        sink = pa.BufferOutputStream()
        pacsv.write_csv(
            table,
            sink,
            write_options=pacsv.WriteOptions(include_header=False, quoting_style="all_valid"),
        )
        out = sink.getvalue().to_pybytes()
        # each line's length: a quoted value is its bytes, its doubled quotes and two more
        lengths = np.full(len(slots), len(arrays), np.int64)  # the commas and the newline
        for values in arrays:
            cell = pc.add(pc.binary_length(values), pc.count_substring(values, '"'))
            lengths += pc.fill_null(pc.add(cell, 2), 0).to_numpy().astype(np.int64)
        ends = np.cumsum(lengths)
        if ends[-1] != len(out):
            return None
        return [out[a:b] for a, b in zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True)]


def _tiny(number: str) -> bool:
    """Whether Java's BigDecimal.toString writes this plain number with an exponent."""
    return number.lstrip("-").startswith("0.000000")


_ARROW_CSV_TYPES = frozenset({TEXT, NUMBER, FLOATING, FIXED, ROW_ID, ROW_VERSION})


def _big_decimal_texts(values: pa.Array) -> pa.Array:
    """Numbers as `BigDecimal.toString` writes them (`1E-7`): only tiny ones differ (rare)."""
    tiny = pc.match_substring_regex(values, r"^-?0\.000000")
    if not pc.any(tiny).as_py():
        return values
    texts = values.to_pylist()
    for i in np.flatnonzero(pc.fill_null(tiny, False).to_numpy(zero_copy_only=False)):
        texts[i] = str(Decimal(texts[i]))
    return pa.array(texts, pa.string())


def _csv_cell(value: Any, soda_type: str) -> str:
    """RFC 4180 cell, every non-null value quoted (as Socrata does); null is empty.

    Values are written as soda-fountain's `CsvColumnRep` does: numbers by `BigDecimal.toString`
    (`1E-7`), points as WKT, legacy locations as `address\ncity, state zip\n(lat, lon)` (their
    `human_address` JSON is lost), objects as compact JSON.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif soda_type == NUMBER and isinstance(value, str):
        text = str(Decimal(value))
    elif soda_type == POINT and isinstance(value, dict):
        lon, lat = value["coordinates"]
        text = f"POINT ({lon} {lat})"
    elif soda_type == LOCATION and isinstance(value, dict):
        located = _csv_location(value)
        if located is None:
            return ""
        text = located
    elif isinstance(value, dict | list):
        text = orjson.dumps(value).decode()
    else:
        text = str(value)
    return '"' + text.replace('"', '""') + '"'


def _csv_location(value: dict[str, Any]) -> str | None:
    text = ""
    try:
        address = orjson.loads(value.get("human_address") or "null")
    except orjson.JSONDecodeError:
        address = None
    if isinstance(address, dict):
        for part, sep in (("address", "\n"), ("city", ", "), ("state", " "), ("zip", "")):
            if isinstance(address.get(part), str):
                text += address[part] + sep
    lat, lon = value.get("latitude"), value.get("longitude")
    if lat is not None and lon is not None:
        text += ("\n" if text else "") + f"({lat}, {lon})"
    return text or None
