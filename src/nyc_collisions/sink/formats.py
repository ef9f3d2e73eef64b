"""File formats: encode text tables to CSV or Parquet on a writer, and read them back.

CSV: one header row of landed column names, every value quoted text as the source sent it; an
empty unquoted field is null, `""` an empty string. Parquet: columns typed from the metadata.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import IO, Any, Protocol

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import UsageError
from ..schema import Schema, csv_text_options
from .storage import Writer

FORMATS = ("csv", "parquet")
READ_BATCH_ROWS = 65_536
# Arrow's CSV reader holds many times its block while it parses (8 MiB blocks: ~150 MB more
# peak RSS than 1 MiB ones, and no faster); a row longer than a block is read again with larger
# blocks (see `read_text_batches`).
READ_BLOCK_BYTES = 1 << 20
MAX_READ_BLOCK_BYTES = 1 << 30
# A landed CSV value may hold newlines (`\n`, `\r\n`, `\r`), so Arrow must cut its read blocks
# at row ends found by parsing the quotes, not at the last newline of a block.
_READ_PARSE = pacsv.ParseOptions(newlines_in_values=True)


def check_format(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: use csv or parquet")
    return fmt


class Encoder(Protocol):
    def write(self, table: pa.Table) -> None: ...
    def close(self) -> None: ...


class CsvEncoder:
    def __init__(self, writer: Writer | IO[bytes], schema: Schema) -> None:
        self._schema = schema
        self._writer = writer
        # Arrow writes the header now and each table as it is given, so rows written as
        # bytes (`write_rows`) keep their place among them.
        self._csv = pacsv.CSVWriter(
            writer, schema.text_schema(), write_options=pacsv.WriteOptions(include_header=True)
        )

    def write(self, table: pa.Table) -> None:
        self._csv.write_table(table)

    def write_rows(self, data: memoryview) -> None:
        """Whole rows already written in this format (a CSV page passed through)."""
        self._writer.write(data)

    def close(self) -> None:
        self._csv.close()


class ParquetEncoder:
    def __init__(self, writer: Writer | IO[bytes], schema: Schema) -> None:
        self._schema = schema
        self._pq = pq.ParquetWriter(writer, schema.typed_schema(), compression="zstd")

    def write(self, table: pa.Table) -> None:
        self._pq.write_table(self._schema.to_typed(table))

    def close(self) -> None:
        self._pq.close()


def encoder(fmt: str, writer: Writer | IO[bytes], schema: Schema) -> Encoder:
    if fmt == "csv":
        return CsvEncoder(writer, schema)
    return ParquetEncoder(writer, schema)


def _read_csv(source: IO[bytes], schema: Schema, columns: list[str] | None) -> Iterator[pa.Table]:
    """A landed CSV file's rows, read in blocks of `READ_BLOCK_BYTES`; a row that does not fit
    in one (Arrow then refuses the block) makes it read the file again with blocks 8 times
    larger, skipping the rows it already gave."""
    block, given = READ_BLOCK_BYTES, 0
    start, lock = source.tell(), threading.Lock()
    while True:
        skip = given
        span = _Span(source, start, lock)
        try:
            reader = pacsv.open_csv(
                span,
                read_options=pacsv.ReadOptions(block_size=block),
                parse_options=_READ_PARSE,
                convert_options=csv_text_options(schema.names, columns),
            )
            for batch in reader:
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                batch, skip = batch.slice(skip), 0
                given += batch.num_rows
                yield pa.Table.from_batches([batch])
            return
        except pa.ArrowInvalid as exc:
            if "straddl" not in str(exc) or block >= MAX_READ_BLOCK_BYTES:
                raise
            block *= 8
        finally:
            span.end()


class _Span(io.RawIOBase):
    """One reading of `source` from `start`, at a position of its own: Arrow's read-ahead of a
    reader given up may still read, and must neither move the next reading's position nor read
    on once it is ended (it then finds the end of the file)."""

    def __init__(self, source: IO[bytes], start: int, lock: threading.Lock) -> None:
        super().__init__()
        self._source, self._pos, self._lock = source, start, lock
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        """Read as a file does, but never end on a `\r` (a read is one of Arrow's blocks, and
        Arrow drops the `\n` of a quoted `\r\n` split between two blocks): that byte is left
        to the next read."""
        view = memoryview(b).cast("B")
        with self._lock:
            if self._ended:
                return 0
            self._source.seek(self._pos)
            n = self._source.readinto(view) or 0  # type: ignore[attr-defined]
            while n and view[n - 1] == 0x0D:  # \r
                if n > 1:
                    n -= 1
                    break
                more = self._source.readinto(view[n:]) or 0  # type: ignore[attr-defined]
                if not more:  # the file ends on it
                    break
                n += more
            self._pos += n
        return n

    def end(self) -> None:
        with self._lock:
            self._ended = True


def read_text_batches(
    fmt: str, source: IO[bytes], schema: Schema, columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """Stream a landed file back as text tables (all columns, or just `columns`)."""
    if fmt == "csv":
        yield from _read_csv(source, schema, columns)
        return
    file = pq.ParquetFile(source)
    want = columns or schema.names
    kept = tuple(c for c in schema.columns if c.name in want)
    sub = Schema(kept, schema.integer_fields, schema.text_fields)
    for batch in file.iter_batches(batch_size=READ_BATCH_ROWS, columns=sub.names):
        yield sub.to_text(pa.Table.from_batches([batch]))
