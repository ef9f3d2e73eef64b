"""Stream text tables into a sequence of files of about `file_rows` rows each (a file is closed
at the end of the piece of rows that takes it to `file_rows` or past).

Each finished file is handed to `on_file` with its entry (path, rows, bytes) and the last row it
holds, so the caller can record its progress (a backfill's part record, an update's watermark).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from ..rows import CsvRows
from ..schema import Schema
from .formats import CsvEncoder, Encoder, encoder
from .storage import Storage, Writer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    path: str
    rows: int
    bytes: int


OnFile = Callable[[FileEntry | None, pa.Table | None, bool], None]


class FileRotation:
    def __init__(
        self,
        storage: Storage,
        schema: Schema,
        fmt: str,
        file_rows: int,
        path_for: Callable[[int], str],
        first_seq: int,
        on_file: OnFile,
    ) -> None:
        self.storage = storage
        self.schema = schema
        self.fmt = fmt
        self.file_rows = file_rows
        self.path_for = path_for
        self.seq = first_seq
        self.on_file = on_file
        self._writer: Writer | None = None
        self._enc: Encoder | None = None
        self._path = ""
        self._rows = 0
        self.last_row: pa.Table | None = None
        self.landed_rows = 0
        self.landed_bytes = 0
        self.files = 0

    def write(self, rows: pa.Table | CsvRows) -> None:
        """Append a text table, or CSV rows passed through from the source (CSV files only;
        `last_row` then holds only their last `socrata_id`)."""
        if rows.num_rows == 0:
            return
        if self._writer is None:
            self._path = self.path_for(self.seq)
            self._writer = self.storage.open_writer(self._path)
            self._enc = encoder(self.fmt, self._writer, self.schema)
        assert self._enc is not None
        if isinstance(rows, CsvRows):
            if not isinstance(self._enc, CsvEncoder):
                raise TypeError(f"CSV rows cannot go into a {self.fmt} file")
            self._enc.write_rows(rows.data)
            self.last_row = rows.last
        else:
            self._enc.write(rows)
            self.last_row = rows.slice(rows.num_rows - 1)
        self._rows += rows.num_rows
        if self._rows >= self.file_rows:
            self.commit(done=False)

    def commit(self, *, done: bool) -> None:
        """Close the open file, if any, and report it; `done` says the stream has ended."""
        entry = None
        if self._writer is not None:
            assert self._enc is not None
            self._enc.close()
            self._writer.close()
            entry = FileEntry(self._path, self._rows, self._writer.bytes_written)
            self.landed_rows += entry.rows
            self.landed_bytes += entry.bytes
            self.files += 1
            logger.info("wrote %s (%d rows)", entry.path, entry.rows)
        elif not done:
            return
        self._writer, self._enc, self._rows = None, None, 0
        self.on_file(entry, self.last_row, done)
        self.seq += 1

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer, self._enc, self._rows = None, None, 0
