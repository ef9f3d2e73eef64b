"""CSV pages (`/resource/{id}.csv`): parsed while they stream in, or handed on as the landed
CSV's rows unparsed when they are already in its form."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ..errors import BadResponse, SchemaError
from ..rows import CsvRows
from ..schema import Schema, csv_text_options
from . import stream
from .stream import Stream, is_utf8, split

logger = logging.getLogger(__name__)


class CsvPageStream(Stream):
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
        self._ends = RowEnds()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        if self._header is None and not self._read_header():
            return
        if len(self._buf) >= stream.PIECE_BYTES:
            cut = self._ends.scan(self._buf)
            if cut > 0:
                piece, self._buf = split(self._buf, cut + 1, 0)
                self._ends.cut(cut + 1)
                self._parse(piece)
            self._bounded()

    def finish(self) -> int:
        """The end of the body: parse what is left; returns the rows of the whole page."""
        if self._header is None and not self._read_header():
            raise BadResponse("page body is empty" if not self._buf else "page cut in its header")
        if self._buf:
            if not self._buf.endswith(b"\n"):
                raise BadResponse(f"page cut short after {self.rows} rows")
            piece, self._buf = split(self._buf, len(self._buf), 0)
            if np.count_nonzero(piece == ord('"')) % 2:  # a value that spans lines, cut in it
                raise BadResponse(f"page cut short inside a value after {self.rows} rows")
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
        self._check = csv_text_options(header, [":id", ":updated_at", *self._number_fields])
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
        if not is_utf8(piece):
            raise BadResponse(f"page is not whole CSV after {self.rows} rows (not UTF-8)")
        logger.debug("%d CSV rows passed through unparsed", checked.num_rows)
        last = pa.Table.from_arrays([ids.slice(len(ids) - 1)], names=["socrata_id"])
        latest = pc.max(checked.column(":updated_at")).as_py() or ""
        self._hand_on(CsvRows(piece.data, checked.num_rows, last, latest))
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


class RowEnds:
    """Where rows end in a buffer that grows at its end and is cut at a row's end (a `\n` ends
    a row when an even number of quotes comes before it).

    The last few line breaks are tried first (one pass over the buffer: rows of a line or a
    few); when none ends a row (values of many lines), every line break is placed, looking at
    each byte once until the next cut however many lines a value spans."""

    QUICK_TRIES = 64

    def __init__(self) -> None:
        self._seen = 0  # bytes of the buffer placed (0: the quick way first)
        self._odd = 0  # whether an odd number of quotes is in them
        self._last = -1  # the last row end in them

    def scan(self, buf: bytearray) -> int:
        """Index of the last `\n` in `buf` that ends a row, or -1."""
        if not self._seen:
            cut = _last_row_end(buf, self.QUICK_TRIES)
            if cut >= 0:
                return cut
        new = np.frombuffer(buf, np.uint8)[self._seen :]  # counted in bulk by numpy
        if len(new):
            quotes = np.flatnonzero(new == ord('"'))
            breaks = np.flatnonzero(new == ord("\n"))
            # quotes before each line break, with those before the new bytes: even ends a row
            odd = (np.searchsorted(quotes, breaks) + self._odd) & 1
            ends = breaks[odd == 0]
            if len(ends):
                self._last = self._seen + int(ends[-1])
            self._odd = (self._odd + len(quotes)) & 1
            self._seen = len(buf)
        return self._last

    def cut(self, n: int) -> None:
        """The buffer's first `n` bytes, up to and with a row end, were taken off: the rest
        starts a row, and is looked at the quick way first again."""
        self._seen = self._odd = 0
        self._last = -1


def _last_row_end(buf: bytearray, tries: int) -> int:
    """Index of the last `\n` that ends a row among the last `tries` line breaks, or -1."""
    cut = buf.rfind(b"\n")
    if cut < 0:
        return -1
    quotes = np.frombuffer(buf, np.uint8, count=cut) == ord('"')  # counted in bulk by numpy
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
