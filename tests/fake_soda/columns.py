"""Columns changed at run time, as a publisher changes them: added, dropped, retyped, moved.

A dataset's schema is replaced by a new one (`Registry.add_column` ...). Stored rows are not
touched, except that a dropped field is removed from them; an added column is null in every
existing row. Rows inserted or edited afterwards get a value in each column added or retyped since
the data was generated (`fill`), made here by type, since the generators know only their own
columns. No `:updated_at` changes: a column change is not a row change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
import orjson

from .api import AdminError
from .schema import CHECKBOX, FLOATING, NUMBER, TEXT, Column, Schema

TYPES = (TEXT, NUMBER, CHECKBOX, FLOATING)
_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
_FLOATING = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}$")
_WORDS = ("north", "south", "east", "west", "clear", "rain", "snow", "fog", "dry", "wet")


def _check_type(soda_type: str) -> None:
    if soda_type not in TYPES:
        raise AdminError(f"column type {soda_type!r}: use one of {', '.join(TYPES)}")


def _find(schema: Schema, field: str) -> int:
    for i, c in enumerate(schema.columns):
        if c.field == field:
            return i
    raise AdminError(f"{schema.dataset_id} has no column {field!r}")


def _position(schema: Schema, position: int | None) -> int:
    """A 1-based metadata position (None: after the last column) as an index."""
    n = len(schema.columns)
    if position is None:
        return n
    if not isinstance(position, int) or not 1 <= position <= n + 1:
        raise AdminError(f"position must be 1..{n + 1}, not {position!r}")
    return position - 1


def added(schema: Schema, field: str, soda_type: str, position: int | None = None) -> Schema:
    _check_type(soda_type)
    if not isinstance(field, str) or not _FIELD.match(field):
        raise AdminError(f"field {field!r} is not a field name")
    if field in schema.fields:
        raise AdminError(f"{schema.dataset_id} already has a column {field!r}")
    cols = list(schema.columns)
    cols.insert(_position(schema, position), Column(field, field.upper(), soda_type))
    return replace(schema, columns=tuple(cols))


def dropped(schema: Schema, field: str) -> Schema:
    i = _find(schema, field)
    if field == schema.key:
        raise AdminError(f"{field!r} is the key of {schema.dataset_id}: it cannot be dropped")
    return replace(schema, columns=schema.columns[:i] + schema.columns[i + 1 :])


def retyped(schema: Schema, field: str, soda_type: str) -> Schema:
    _check_type(soda_type)
    i = _find(schema, field)
    if field == schema.key:
        raise AdminError(f"{field!r} is the key of {schema.dataset_id}: it cannot be retyped")
    cols = list(schema.columns)
    cols[i] = replace(cols[i], soda_type=soda_type)
    return replace(schema, columns=tuple(cols))


def moved(schema: Schema, field: str, position: int) -> Schema:
    cols = list(schema.columns)
    column = cols.pop(_find(schema, field))
    cols.insert(_position(replace(schema, columns=tuple(cols)), position), column)
    return replace(schema, columns=tuple(cols))


def fits(soda_type: str, value: Any) -> bool:
    """Whether a stored JSON value is one the type can hold."""
    if value is None:
        return True
    if soda_type == CHECKBOX:
        return isinstance(value, bool)
    if not isinstance(value, str):
        return False
    if soda_type == NUMBER:
        try:
            return Decimal(value).is_finite()
        except InvalidOperation:
            return False
    if soda_type == FLOATING:
        return bool(_FLOATING.match(value))
    return True


def check_fits(schema: Schema, field: str, soda_type: str, rows: Iterable[dict[str, Any]]) -> None:
    """Refuse a retype that the stored values do not fit (a publisher would convert them)."""
    for row in rows:
        if not fits(soda_type, row.get(field)):
            raise AdminError(
                f"{schema.dataset_id}.{field} holds {row.get(field)!r}, which is not {soda_type}"
            )


def value(soda_type: str, rng: np.random.Generator) -> Any:
    """A JSON value of the type as SODA sends it (numbers and timestamps as strings), or None
    for about one row in six."""
    if rng.random() < 1 / 6:
        return None
    if soda_type == NUMBER:
        return str(int(rng.integers(0, 5000)) / 4).removesuffix(".0")
    if soda_type == CHECKBOX:
        return bool(rng.integers(2))
    if soda_type == FLOATING:
        day, minute = int(rng.integers(19_000, 20_400)), int(rng.integers(0, 1440))
        stamp = np.datetime64(day, "D") + np.timedelta64(minute, "m")
        return f"{stamp.astype('datetime64[s]')!s}.000"
    return f"{_WORDS[int(rng.integers(len(_WORDS)))]} {int(rng.integers(1, 100))}"


def conform(
    schema: Schema, row: dict[str, Any], fill: Mapping[str, str], rng: np.random.Generator
) -> bytes:
    """The inner JSON of `row` with only the schema's columns, in its order, each column of
    `fill` (field -> type) given a new value; null fields omitted."""
    out = {**row, **{f: value(t, rng) for f, t in fill.items()}}
    doc = {f: out[f] for f in schema.fields if out.get(f) is not None}
    return orjson.dumps(doc)[1:-1]


def without(inners: Iterable[bytes | memoryview], field: str) -> list[bytes]:
    """Stored rows (inner JSON) with `field` removed."""
    out = []
    for inner in inners:
        row = orjson.loads(b"{" + bytes(inner) + b"}")
        row.pop(field, None)
        out.append(orjson.dumps(row)[1:-1])
    return out
