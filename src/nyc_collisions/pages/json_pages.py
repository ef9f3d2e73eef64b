"""Parse a SODA JSON page into a text table (see `schema`), checking it is whole and fits.

A page is a JSON array of objects; null fields are omitted, numbers are strings, objects (such
as `location`) become compact JSON text with sorted keys and booleans `true`/`false`.

Two parsers give the same table. The fast one hands the body to Arrow's multi-threaded JSON
reader (SODA writes one row per line, `[{..}\n,{..}\n]`, which is line-delimited JSON once the
leading commas are blanked) and builds `location` text with vectorised string kernels; it covers
pages in that layout (Arrow's reader is given nothing else: other input can crash it) whose
values are all strings and whose objects are legacy locations. Anything else (another layout,
a row that is not an object, booleans, other object types, unknown fields, a broken body) goes
to the plain parser (orjson), which is the reference and the one that raises the errors. A body
that is not a complete JSON array is a `BadResponse`, so the client fetches it again: a page cut
short is never taken for the last one. A field the metadata does not name is a `SchemaError`,
never dropped.

Rows bound for a CSV file skip the table: a native converter (`JsonRowsToCsv`, `_jsoncsv.c`)
writes the landed CSV rows straight from the JSON, the same bytes as the fast parser and Arrow's
CSV writer, and declines to the parsers above whatever it does not cover.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from ..errors import BadResponse, SchemaError
from ..rows import CsvRows
from ..schema import Schema
from . import stream
from .native import JsonRowsToCsv
from .stream import IGNORED_SYSTEM, Stream, is_utf8, split

logger = logging.getLogger(__name__)


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return str(value)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict) and None in value.values():
        return {k: v for k, v in value.items() if v is not None}
    return value


LOCATION_MEMBERS = ("human_address", "latitude", "longitude")  # sorted
_LOCATION = pa.struct([(m, pa.string()) for m in LOCATION_MEMBERS])


def parse_page(body: bytes, schema: Schema) -> pa.Table:
    """A JSON page body -> a text table with the schema's columns, in the source's row order."""
    fast = parse_page_fast(body, schema)
    return fast if fast is not None else parse_page_plain(body, schema)


def _fast_schema(schema: Schema) -> pa.Schema | None:
    fields = []
    for column in schema.columns:
        if column.data_type == "location":
            fields.append(pa.field(column.field_name, _LOCATION))
        elif column.is_object:
            return None
        else:
            fields.append(pa.field(column.field_name, pa.string()))
    fields += [pa.field(f, pa.string()) for f in sorted(IGNORED_SYSTEM)]
    return pa.schema(fields)


def parse_page_fast(body: bytes, schema: Schema) -> pa.Table | None:
    """Arrow's JSON reader on a one-row-per-line page; None when the page needs the plain parser."""
    start = body.find(b"[")
    end = body.rfind(b"]")
    if start < 0 or end < start or body[:start].strip() or body[end + 1 :].strip():
        return None
    inner = np.frombuffer(body, np.uint8, count=end - start - 1, offset=start + 1).copy()
    return parse_rows_fast(inner, schema)


_JSON_SPACE = np.frombuffer(b" \t\r\n", np.uint8)


def _blank(piece: np.ndarray) -> bool:
    """Nothing but JSON's whitespace (not any byte up to 0x20: `[\x00]` is no empty page).
    At the cost of a byte for a piece of rows (its first is `{`): it runs on every piece."""
    if not piece.size:
        return True
    if piece[0] > 32 or piece.max() > 32:
        return False
    return bool(np.isin(piece, _JSON_SPACE).all())


def parse_rows_fast(rows: np.ndarray, schema: Schema) -> pa.Table | None:
    """Rows separated by `\n,` (a page without its brackets), in a writable byte array.

    The separators' commas are blanked in place, which makes line-delimited JSON that Arrow reads
    without another copy; on None (the plain parser is needed) they are put back.
    """
    read_schema = _fast_schema(schema)
    if read_schema is None:
        return None
    if _blank(rows):
        return schema.text_schema().empty_table()
    if not is_utf8(rows):
        return None  # Arrow's JSON reader would take it: the plain parser refuses it
    commas = _row_separators(rows)
    if commas is None:
        return None
    # `}\n,{` -> `}\n {`: a raw newline never occurs inside a JSON string, so this only touches
    # the separators between rows.
    rows[commas] = ord(" ")
    table = _read_ndjson(rows, read_schema)
    # One object a line, as the JSON array had: Arrow also reads `{..}{..}` as two rows, and
    # an object that went on past a blanked separator (`"a":{..}\n,{..}`) as one.
    if table is not None and table.num_rows != commas.size + 1:
        table = None
    out = None if table is None else _text_table(table, schema)
    if out is None:
        rows[commas] = ord(",")
    return out


def _row_separators(rows: np.ndarray) -> np.ndarray | None:
    """The commas of the `}\n,{` between rows in SODA's layout (`{..}\n,{..}`), or None unless
    every line of `rows` is an object: the first starting with `{`, each line break `}\n,{`.

    Arrow's JSON reader cuts its input into blocks at line breaks (`\n` and `\r`) and crashes
    the process on a block that starts with a top-level `null` (apache/arrow#47409): it is only
    given rows whose every line starts with `{`. Searched from the line breaks (one a row)
    rather than the commas (one a field): 3x cheaper.
    """
    if rows[:64].tobytes().lstrip()[:1] != b"{":
        return None
    # `\n`, `\r`, and the other control bytes below them (a tab is JSON's whitespace; the rest
    # are not JSON outside strings, nor allowed raw inside them)
    breaks = np.flatnonzero(rows[:-1] <= ord("\r"))
    found = rows[breaks]
    if not np.all(found == ord("\n")):
        breaks = breaks[found != ord("\t")]
        if not np.all(rows[breaks] == ord("\n")):
            return None
    commas = breaks + 1
    if commas.size and commas[-1] + 1 >= rows.size:
        return None
    if not (
        np.all(rows[breaks - 1] == ord("}"))
        and np.all(rows[commas] == ord(","))
        and np.all(rows[commas + 1] == ord("{"))
    ):
        return None
    return commas


def _read_ndjson(rows: np.ndarray, read_schema: pa.Schema) -> pa.Table | None:
    """Arrow's JSON reader on rows one object a line (checked by `_row_separators` first)."""
    try:
        return pajson.read_json(
            pa.BufferReader(pa.py_buffer(rows)),
            read_options=pajson.ReadOptions(block_size=4 << 20),
            parse_options=pajson.ParseOptions(
                explicit_schema=read_schema, unexpected_field_behavior="error"
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _text_table(table: pa.Table, schema: Schema) -> pa.Table | None:
    arrays = []
    for column in schema.columns:
        array = table.column(column.field_name)
        if column.data_type == "location":
            array = _location_text(array)
            if array is None:
                return None
        arrays.append(array)
    out = pa.Table.from_arrays(arrays, schema=schema.text_schema())
    if out.num_rows and out.column("socrata_id").null_count:
        return None
    return out


def _json_string(array: pa.ChunkedArray) -> pa.ChunkedArray:
    escaped = pc.replace_substring(array, "\\", "\\\\")
    escaped = pc.replace_substring(escaped, '"', '\\"')
    return pc.binary_join_element_wise('"', escaped, '"', "")


def _quoted(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """JSON string literals of text values that hold quotes or backslashes (null stays null).

    Values that repeat (`human_address` is mostly the same empty address) are escaped once each.
    """
    encoded = pc.dictionary_encode(values).combine_chunks()
    if len(encoded.dictionary) * 4 < len(encoded):
        return pc.take(_json_string(encoded.dictionary), encoded.indices)
    return _json_string(values)


def _location_text(array: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """Struct locations -> compact JSON text with sorted keys, members that are null omitted."""
    members = []  # (values, the quote to put around them: none when already JSON literals)
    for member in LOCATION_MEMBERS:
        values = pc.struct_field(array, member)  # null where the location is null, too
        if pc.any(pc.match_substring_regex(values, '["\\\\\\x00-\\x1f]')).as_py():
            if pc.any(pc.match_substring_regex(values, "[\\x00-\\x1f]")).as_py():
                return None  # control characters: leave the escaping to orjson
            members.append((_quoted(values), ""))
        else:
            members.append((values, '"'))
    if all(values.null_count == array.null_count for values, _ in members):
        # The usual page: a location has all of its members (or is null), so one join writes
        # the text, a null location staying null: `{"human_address":"..","latitude":"..",..}`.
        pieces: list[Any] = []
        close = ""  # the quote that ends the previous member's value
        for i, (member, (values, quote)) in enumerate(zip(LOCATION_MEMBERS, members, strict=True)):
            sep = "," if i else "{"
            pieces += [f'{close}{sep}"{member}":{quote}', values]
            close = quote
        return pc.binary_join_element_wise(*pieces, close + "}", "")
    # `"member":"value",` or "" when the member is null; the last comma is trimmed below
    parts = [
        pc.binary_join_element_wise(f'"{member}":{quote}', values, f"{quote},", "")
        for member, (values, quote) in zip(LOCATION_MEMBERS, members, strict=True)
    ]
    joined = pc.binary_join_element_wise(*parts, "", null_handling="replace")
    text = pc.binary_join_element_wise("{", pc.utf8_rtrim(joined, characters=","), "}", "")
    return pc.if_else(pc.is_valid(array), text, pa.scalar(None, pa.string()))


def parse_page_plain(body: bytes, schema: Schema) -> pa.Table:
    """The reference parser (orjson): every layout, every value type, and the errors."""
    try:
        rows = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadResponse(f"page is not complete JSON ({exc}; {len(body)} bytes)") from None
    if not isinstance(rows, list):
        raise BadResponse(f"page is not a JSON array but {type(rows).__name__}")
    for row in rows:
        if not isinstance(row, dict):
            raise BadResponse(f"page rows are not JSON objects (one is {_json_kind(row)})")
    fields = schema.field_names
    arrays = []
    seen = 0
    for column, field in zip(schema.columns, fields, strict=True):
        values = [row.get(field) for row in rows] if rows else []
        # a location member sent as null is left out, as Arrow's path does
        if column.data_type == "location":
            values = [_text(_without_nulls(v)) for v in values]
        elif column.is_object or not all(v is None or isinstance(v, str) for v in values):
            values = [_text(v) for v in values]
        seen += len(values) - values.count(None)
        arrays.append(pa.array(values, pa.string()))
    total = sum(len(row) for row in rows)
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


def _json_kind(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return orjson.dumps(value).decode()
    kinds = {int: "a number", float: "a number", str: "a string", list: "an array"}
    return kinds.get(type(value), type(value).__name__)


def _unknown_fields(rows: list[dict[str, Any]], fields: list[str]) -> set[str]:
    known = set(fields)
    extra: set[str] = set()
    for row in rows:
        extra.update(k for k in row if k not in known)
    extra -= IGNORED_SYSTEM
    # JSON nulls sent explicitly also make the counts differ; they are not unknown fields.
    return {k for k in extra if not k.startswith(":@")} if extra else set()


class PageStream(Stream):
    """Parses a page while it streams in, a few MiB of whole rows at a time.

    SODA writes one row per line with the separators at line starts (`[{..}\\n,{..}\\n]`), so the
    rows received so far end at the last `\\n,`: each such piece is parsed and handed to `emit` at
    once, and memory stays at a piece, not a page. A body in another layout is parsed whole at the
    end, unless it has a `\\n,` inside an object (valid JSON that SODA never writes): the piece
    cut there is refused, and so the page; so is one with no `}` in `MAX_UNCUT_BYTES` (no row
    ends in it: a hostile value, not rows). `finish` raises `BadResponse` if the body did not end
    with the array's `]`: the rows emitted before the cut are kept, and the caller goes on after
    the last of them.

    Given `emit_rows` (the rows go to a CSV file) and a schema the native converter covers,
    pieces go straight to landed CSV rows (`JsonRowsToCsv`) and are handed on as `CsvRows`; a
    piece it declines is parsed into a table and handed to `emit`, in its place among the others.
    """

    def __init__(
        self,
        schema: Schema,
        emit: Callable[[pa.Table], None],
        emit_rows: Callable[[CsvRows], None] | None = None,
    ) -> None:
        super().__init__(schema, emit, emit_rows)
        self._started = False
        self._separated = False  # a piece was cut at a `\n,`: a row must follow it
        self._to_csv = JsonRowsToCsv.for_schema(schema) if emit_rows is not None else None

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        if not self._started:
            stripped = self._buf.lstrip()
            if not stripped:
                return
            if stripped[:1] == b"<":
                raise BadResponse("the source answered with an HTML page, not JSON")
            if stripped[:1] != b"[":
                raise BadResponse(f"page is not a JSON array: {bytes(stripped[:60])!r}")
            del self._buf[: len(self._buf) - len(stripped) + 1]
            self._started = True
        limit = stream.NATIVE_PIECE_BYTES if self._to_csv is not None else stream.PIECE_BYTES
        if len(self._buf) >= limit:
            cut = self._buf.rfind(b"\n,")
            if cut > 0:
                piece, self._buf = split(self._buf, cut, 2)
                if _blank(piece):  # `[ \n,` or `\n, \n,`: an empty element, not JSON
                    raise BadResponse(
                        f"page is not complete JSON: no row before a `,` after {self.rows} rows"
                    )
                self._separated = True
                self._parse(piece)
            self._bounded(b"}")  # another layout is kept whole to its end while rows end in it

    def finish(self) -> int:
        """The end of the body: parse what is left; returns the rows of the whole page."""
        if not self._started:
            raise BadResponse("page body is empty")
        end = self._buf.rfind(b"]")
        if end < 0 or self._buf[end + 1 :].strip():
            raise BadResponse(f"page cut short after {self.rows} rows")
        while end and self._buf[end - 1] in b" \t\r\n":
            end -= 1
        tail, self._buf = split(self._buf, end, len(self._buf))
        if tail.size:
            self._parse(tail)
        elif self._separated:
            raise BadResponse(f"page is not complete JSON: a `,` and no row after {self.rows} rows")
        return self.rows

    def _parse(self, piece: np.ndarray) -> None:
        rows = self._to_csv(piece.data) if self._to_csv is not None else None
        if rows is None:
            rows = parse_rows_fast(piece, self.schema)
        if rows is None:
            rows = parse_page_plain(b"[" + piece.tobytes() + b"]", self.schema)
        self._hand_on(rows)
