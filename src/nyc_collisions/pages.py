"""Parse a SODA JSON page into a text table (see `schema`), checking it is whole and fits.

A page is a JSON array of objects; null fields are omitted, numbers are strings, objects (such
as `location`) become compact JSON text and booleans `true`/`false`. A body that is not a
complete JSON array is a `BadResponse`, so the client fetches it again: a page cut short is never
taken for the last one. A field the metadata does not name is a `SchemaError`, never dropped.
"""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa

from .errors import BadResponse, SchemaError
from .schema import Schema

# System fields `:*` selects that we do not land.
_IGNORED_SYSTEM = frozenset({":version"})


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def parse_page(body: bytes, schema: Schema) -> pa.Table:
    """A JSON page body -> a text table with the schema's columns, in the source's row order."""
    try:
        rows = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadResponse(f"page is not complete JSON ({exc}; {len(body)} bytes)") from None
    if not isinstance(rows, list):
        raise BadResponse(f"page is not a JSON array but {type(rows).__name__}")
    fields = schema.field_names
    arrays = []
    seen = 0
    for column, field in zip(schema.columns, fields, strict=True):
        values = [row.get(field) for row in rows] if rows else []
        if column.is_object or not all(v is None or isinstance(v, str) for v in values):
            values = [_text(v) for v in values]
        seen += len(values) - values.count(None)
        arrays.append(pa.array(values, pa.string()))
    total = sum(len(row) for row in rows) if rows and isinstance(rows[0], dict) else 0
    if rows and not all(isinstance(row, dict) for row in rows):
        raise BadResponse("page rows are not JSON objects")
    if total != seen:
        extra = _unknown_fields(rows, fields)
        if extra:
            raise SchemaError(
                f"rows carry fields the metadata does not name: {', '.join(sorted(extra)[:10])}"
            )
    table = pa.Table.from_arrays(arrays, schema=schema.text_schema())
    if rows and table.column("socrata_id").null_count:
        raise BadResponse("page rows lack :id (was $select=:*,* sent?)")
    return table


def _unknown_fields(rows: list[dict[str, Any]], fields: list[str]) -> set[str]:
    known = set(fields)
    extra: set[str] = set()
    for row in rows:
        extra.update(k for k in row if k not in known)
    extra -= _IGNORED_SYSTEM
    # JSON nulls sent explicitly also make the counts differ; they are not unknown fields.
    return {k for k in extra if not k.startswith(":@")} if extra else set()
