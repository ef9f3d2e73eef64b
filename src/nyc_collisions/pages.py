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

import csv
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from .errors import BadResponse, SchemaError
from .schema import Schema, csv_text_options

try:
    from . import _jsoncsv
except ImportError:  # installed without a C compiler: Arrow converts every JSON page
    _jsoncsv = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# System fields `:*` selects that we do not land.
_IGNORED_SYSTEM = frozenset({":version"})


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    return str(value)


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
    fields += [pa.field(f, pa.string()) for f in sorted(_IGNORED_SYSTEM)]
    return pa.schema(fields)


def parse_page_fast(body: bytes, schema: Schema) -> pa.Table | None:
    """Arrow's JSON reader on a one-row-per-line page; None when the page needs the plain parser."""
    start = body.find(b"[")
    end = body.rfind(b"]")
    if start < 0 or end < start or body[:start].strip() or body[end + 1 :].strip():
        return None
    inner = np.frombuffer(body, np.uint8, count=end - start - 1, offset=start + 1).copy()
    return parse_rows_fast(inner, schema)


def parse_rows_fast(rows: np.ndarray, schema: Schema) -> pa.Table | None:
    """Rows separated by `\n,` (a page without its brackets), in a writable byte array.

    The separators' commas are blanked in place, which makes line-delimited JSON that Arrow reads
    without another copy; on None (the plain parser is needed) they are put back.
    """
    read_schema = _fast_schema(schema)
    if read_schema is None:
        return None
    if not rows.size or rows.max() <= 32:
        return schema.text_schema().empty_table()
    if not _utf8(rows):
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
        if column.is_object or not all(v is None or isinstance(v, str) for v in values):
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
    extra -= _IGNORED_SYSTEM
    # JSON nulls sent explicitly also make the counts differ; they are not unknown fields.
    return {k for k in extra if not k.startswith(":@")} if extra else set()


PIECE_BYTES = 4 << 20
# Pieces for the native converter (`JsonRowsToCsv`), whose cost per call is small: a crashes
# backfill of 460,000 rows peaked at 162 MB instead of 207 with 4 MiB pieces, and used 3% less
# CPU (median of 5 alternating runs; 256 KiB pieces were no cheaper).
NATIVE_PIECE_BYTES = 1 << 20


def _split(buf: bytearray, cut: int, skip: int) -> tuple[np.ndarray, bytearray]:
    """`buf[:cut]` as a writable array over `buf` itself, and `buf[cut + skip:]` as a new buffer.

    The piece keeps the bytes where they arrived: only the few bytes after the cut are copied
    (copying the piece out instead cost a copy of every byte into freshly faulted memory).
    """
    rest = buf[cut + skip :]
    del buf[cut:]
    return np.frombuffer(buf, np.uint8), rest


class _Stream:
    """What both page streams keep: where the rows go (tables to `emit`; rows already in the
    landed CSV's form to `emit_rows`, when the caller lands CSV), the rows handed on so far and
    the bytes received but not yet parsed."""

    def __init__(
        self,
        schema: Schema,
        emit: Callable[[pa.Table], None],
        emit_rows: Callable[[CsvRows], None] | None = None,
    ) -> None:
        self.schema = schema
        self.emit = emit
        self.emit_rows = emit_rows
        self.rows = 0
        self._buf = bytearray()

    def _hand_on(self, rows: pa.Table | CsvRows) -> None:
        if not rows.num_rows:
            return
        self.rows += rows.num_rows
        if isinstance(rows, CsvRows):
            assert self.emit_rows is not None
            self.emit_rows(rows)
        else:
            self.emit(rows)


class PageStream(_Stream):
    """Parses a page while it streams in, a few MiB of whole rows at a time.

    SODA writes one row per line with the separators at line starts (`[{..}\\n,{..}\\n]`), so the
    rows received so far end at the last `\\n,`: each such piece is parsed and handed to `emit` at
    once, and memory stays at a piece, not a page. A body in another layout is parsed whole at the
    end. `finish` raises `BadResponse` if the body did not end with the array's `]`: the rows
    emitted before the cut are kept, and the caller goes on after the last of them.

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
        limit = NATIVE_PIECE_BYTES if self._to_csv is not None else PIECE_BYTES
        if len(self._buf) >= limit:
            cut = self._buf.rfind(b"\n,")
            if cut > 0:
                piece, self._buf = _split(self._buf, cut, 2)
                self._separated = True
                self._parse(piece)

    def finish(self) -> int:
        """The end of the body: parse what is left; returns the rows of the whole page."""
        if not self._started:
            raise BadResponse("page body is empty")
        end = self._buf.rfind(b"]")
        if end < 0 or self._buf[end + 1 :].strip():
            raise BadResponse(f"page cut short after {self.rows} rows")
        while end and self._buf[end - 1] in b" \t\r\n":
            end -= 1
        tail, self._buf = _split(self._buf, end, len(self._buf))
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


# Types whose JSON value is a string (SODA 2.1 writes numbers as strings), landed as sent.
_NATIVE_TEXT_TYPES = frozenset(
    {"text", "number", "calendar_date", "floating_timestamp", "fixed_timestamp"}
)


@functools.cache
def _say_not_built() -> None:
    logger.info("the native JSON -> CSV converter is not built: JSON pages take Arrow's path")


class JsonRowsToCsv:
    """JSON rows straight to the landed CSV's rows, in native code (`_jsoncsv.c`), for a
    `PageStream` whose rows go to a CSV file (`emit_rows`).

    It writes the bytes that the table path (`parse_rows_fast`, then Arrow's CSV writer) writes,
    for the rows it accepts: objects whose values are strings or null, and legacy locations whose
    members are strings. Anything else (another value type, a field the metadata does not name,
    a key given twice, a row without `:id`, invalid UTF-8 or JSON) makes it decline the piece,
    which then takes the table path, where the errors are raised. On one 50,000-row crashes page,
    per million rows: 0.8 CPU s against 5.4-5.7 for the table path and the CSV writer.
    """

    def __init__(self, schema: Schema) -> None:
        self.fields = tuple(schema.field_names)
        self.kinds = bytes(c.data_type == "location" for c in schema.columns)
        self.skip = tuple(sorted(_IGNORED_SYSTEM))
        self.id_index = self.fields.index(":id")

    @classmethod
    def for_schema(cls, schema: Schema) -> JsonRowsToCsv | None:
        """A converter for the schema, or None when the native module is not built or a column
        has a type it does not convert (checkboxes, points, urls...)."""
        if _jsoncsv is None:
            _say_not_built()
            return None
        if not all(
            c.data_type == "location" or c.data_type in _NATIVE_TEXT_TYPES for c in schema.columns
        ):
            return None
        return cls(schema)

    def __call__(self, rows: memoryview | bytes) -> CsvRows | None:
        """Rows separated by commas (a page without its brackets) -> the landed CSV rows, or
        None when the piece needs the table path."""
        assert _jsoncsv is not None
        done = _jsoncsv.convert(rows, self.fields, self.kinds, self.skip, self.id_index)
        if done is None:
            logger.debug("JSON rows left to Arrow: the native converter declined them")
            return None
        data, num_rows, last_id = done
        logger.debug("%d JSON rows converted to CSV natively", num_rows)
        last = pa.Table.from_arrays([pa.array([last_id], pa.string())], names=["socrata_id"])
        return CsvRows(memoryview(data), num_rows, last)


# ----------------------------------------------------------------------------------------------
# CSV pages


@dataclass(frozen=True)
class CsvRows:
    """Whole rows already in the landed CSV's columns, order and convention: a CSV page's rows
    passed through (see `CsvPageStream`) or JSON rows converted natively (see `JsonRowsToCsv`).
    A file writes them as they are."""

    data: memoryview
    num_rows: int
    last: pa.Table  # the last row's `socrata_id` (the only column read)

    @property
    def last_id(self) -> str:
        return str(self.last.column(0)[0].as_py())


class CsvPageStream(_Stream):
    """A `/resource/{id}.csv` page parsed while it streams in, a few MiB of whole rows at a time.

    Socrata's CSV (soda-fountain `CsvExporter`) is a header row of field names, then one line per
    row ending in `\n`, every non-null value quoted (`""` is an empty string) and null left
    empty: the landed CSV's own convention, which Arrow's CSV reader parses several times faster
    than the JSON of the same rows. Only datasets whose types CSV writes exactly are read this way
    (`Schema.csv_exact`). Columns are matched to the metadata by the header's names, in any
    order; a name the metadata lacks is a `SchemaError`.

    A body cut short is a `BadResponse` (the rows emitted before the cut are kept, and the
    caller goes on after the last of them): every row ends in `\n` and in the quoted `:updated_at`,
    so a cut inside a row leaves a line without its `\n`, an open quote or too few cells.

    Given `emit_rows`, rows whose header is the landed columns in the landed order (as
    `soql.SELECT_ALL` asks for) skip the parse: a piece is checked (whole rows with every cell, an
    `:id` each, valid UTF-8, no number in `E` form) and handed on as `CsvRows`, bytes the landed
    CSV file takes as they are. Anything else is parsed into a table and handed to `emit`.
    """

    MAX_HEADER = 1 << 20

    def __init__(
        self,
        schema: Schema,
        emit: Callable[[pa.Table], None],
        emit_rows: Callable[[CsvRows], None] | None = None,
    ) -> None:
        super().__init__(schema, emit, emit_rows)
        self._header: list[str] | None = None
        self._read = pacsv.ReadOptions()
        self._convert = pacsv.ConvertOptions()
        self._check = pacsv.ConvertOptions()
        self._numbers = [c.name for c in schema.columns if c.data_type == "number"]
        self._number_fields = [c.field_name for c in schema.columns if c.data_type == "number"]
        self._pass_through = False

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        if self._header is None and not self._read_header():
            return
        if len(self._buf) >= PIECE_BYTES:
            cut = _row_end(self._buf)
            if cut > 0:
                piece, self._buf = _split(self._buf, cut + 1, 0)
                self._parse(piece)

    def finish(self) -> int:
        """The end of the body: parse what is left; returns the rows of the whole page."""
        if self._header is None and not self._read_header():
            raise BadResponse("page body is empty" if not self._buf else "page cut in its header")
        if self._buf:
            if not self._buf.endswith(b"\n"):
                raise BadResponse(f"page cut short after {self.rows} rows")
            piece, self._buf = _split(self._buf, len(self._buf), 0)
            self._parse(piece)
        return self.rows

    def _read_header(self) -> bool:
        start = bytes(self._buf.lstrip()[:1])
        if start == b"<":
            raise BadResponse("the source answered with an HTML page, not CSV")
        if start in (b"[", b"{"):
            raise BadResponse(f"the source answered JSON, not CSV: {bytes(self._buf[:60])!r}")
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > self.MAX_HEADER:
                raise BadResponse("CSV page without a header line")
            return False
        line = bytes(self._buf[:end]).decode("utf-8", "replace").rstrip("\r")
        try:
            header = next(csv.reader([line]), [])
        except csv.Error as exc:  # a raw line break or a NUL in it
            raise BadResponse(f"CSV header unreadable ({exc}): {line[:60]!r}") from None
        known = set(self.schema.field_names)
        # computed regions (`:@...`) and `:version` are not landed, as in JSON pages
        unknown = [
            h for h in header if h not in known and not h.startswith(":@") and h != ":version"
        ]
        if unknown:
            raise SchemaError(
                f"rows carry fields the metadata does not name: {', '.join(unknown[:10])}"
            )
        missing = sorted(known - set(header))
        if missing or len(set(header)) != len(header):
            raise SchemaError(
                f"CSV header does not match the metadata (missing: {', '.join(missing[:10])}; "
                f"{len(header)} names, {len(set(header))} distinct)"
            )
        self._header = header
        self._read = pacsv.ReadOptions(column_names=header, use_threads=True)
        self._convert = csv_text_options(header)
        # The rows can go to the landed file as they are when their columns are the landed ones
        # in the landed order and their lines end in `\n` as the landed file's do.
        self._pass_through = (
            self.emit_rows is not None
            and header == self.schema.field_names
            and not self._buf[:end].endswith(b"\r")
        )
        self._check = csv_text_options(header, [":id", *self._number_fields])
        del self._buf[: end + 1]
        return True

    def _read_piece(self, piece: np.ndarray, convert: pacsv.ConvertOptions) -> pa.Table:
        self._read.block_size = len(piece) + 1  # one block: the piece is already a few MiB
        try:
            return pacsv.read_csv(
                pa.py_buffer(piece),
                read_options=self._read,
                parse_options=_CSV_PARSE,
                convert_options=convert,
            )
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            detail = str(exc).splitlines()[0][:200]
            raise BadResponse(f"page is not whole CSV after {self.rows} rows ({detail})") from None

    def _pass(self, piece: np.ndarray) -> bool:
        """Hand the piece's rows on as they are, when they need no change: checked whole CSV
        (Arrow reads `:id` and the numbers, which makes it count the cells of every row) and valid
        UTF-8, every row with an `:id`, and no number in `BigDecimal.toString`'s `E` form."""
        if piece[-2:].tobytes() == b"\r\n":
            return False
        checked = self._read_piece(piece, self._check)
        if not checked.num_rows:
            return True
        ids = checked.column(":id")
        if ids.null_count:
            raise BadResponse("CSV rows lack :id (was $select=*,:id sent?)")
        for field in self._number_fields:
            if pc.any(pc.match_substring(checked.column(field), "E")).as_py():
                return False
        if not _utf8(piece):
            raise BadResponse(f"page is not whole CSV after {self.rows} rows (not UTF-8)")
        logger.debug("%d CSV rows passed through unparsed", checked.num_rows)
        last = pa.Table.from_arrays([ids.slice(len(ids) - 1)], names=["socrata_id"])
        self._hand_on(CsvRows(piece.data, checked.num_rows, last))
        return True

    def _parse(self, piece: np.ndarray) -> None:
        if self._pass_through and self._pass(piece):
            return
        table = self._read_piece(piece, self._convert)
        table = table.select(self.schema.field_names).rename_columns(self.schema.names)
        for name in self._numbers:
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, plain_numbers(table.column(name)))
        if table.num_rows and table.column("socrata_id").null_count:
            raise BadResponse("CSV rows lack :id (was $select=*,:id sent?)")
        self._hand_on(table)


_CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)


def _utf8(data: np.ndarray) -> bool:
    """Whether the bytes are valid UTF-8, checked by Arrow in place (decoding them into a str
    would hold up to four times their size per worker)."""
    offsets = pa.py_buffer(np.array([0, len(data)], np.int64))
    text = pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)])
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _row_end(buf: bytearray, tries: int = 64) -> int:
    """Index of the last `\n` that ends a row (an even number of quotes before it), or -1."""
    cut = buf.rfind(b"\n")
    if cut < 0:
        return -1
    quotes = np.frombuffer(buf, np.uint8, count=cut) == ord('"')  # numpy counts 4x faster
    while cut >= 0 and tries:
        if np.count_nonzero(quotes[:cut]) % 2 == 0:
            return cut
        cut = buf.rfind(b"\n", 0, cut)
        tries -= 1
    return -1


def plain_numbers(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """Numbers as SODA's JSON writes them, from CSV's `BigDecimal.toString`.

    CSV writes `1E-7` or `1E+3` where JSON writes `0.0000001` or `1000` (JSON keeps the exponent
    only past a scale of 20); only values carrying an `E` differ, and they are rare.
    """
    marked = pc.match_substring(values, "E")
    if not pc.any(marked).as_py():
        return values
    texts = values.to_pylist()
    for i in np.flatnonzero(pc.fill_null(marked, False).to_numpy(zero_copy_only=False)):
        texts[i] = _plain_number(texts[i])
    return pa.chunked_array([pa.array(texts, pa.string())])


def _plain_number(text: str) -> str:
    """Java's `BigDecimal.toPlainString` of `text` unless its scale passes 20 (as SODA's JSON)."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text
    exponent = number.as_tuple().exponent
    if not isinstance(exponent, int) or abs(exponent) > 20:
        return text
    return format(number, "f")
