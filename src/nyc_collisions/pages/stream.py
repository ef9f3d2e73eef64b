"""What both page streams share: the size of the pieces a page is parsed in, how a piece is cut
from the bytes received, where the rows go, and a check of UTF-8 in place."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ..errors import BadResponse
from ..rows import CsvRows
from ..schema import Schema

# System fields `:*` selects that we do not land.
IGNORED_SYSTEM = frozenset({":version"})

# A page is parsed in pieces of about this many bytes of whole rows: memory stays at a piece.
PIECE_BYTES = 4 << 20
# The native converter's cost per call is small, so its pieces are smaller: less memory held
# per worker for the same CPU (measured in bench/README.md).
NATIVE_PIECE_BYTES = 1 << 20
# Bytes received with no row's end among them, at most: a row that long is a hostile or broken
# body, refused before it takes the machine's memory.
MAX_UNCUT_BYTES = 64 << 20


def split(buf: bytearray, cut: int, skip: int) -> tuple[np.ndarray, bytearray]:
    """`buf[:cut]` as a writable array over `buf` itself, and `buf[cut + skip:]` as a new buffer.

    The piece keeps the bytes where they arrived: only the few bytes after the cut are copied
    (copying the piece out instead cost a copy of every byte into freshly faulted memory).
    """
    rest = buf[cut + skip :]
    del buf[cut:]
    return np.frombuffer(buf, np.uint8), rest


class Stream:
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

    def _bounded(self, row_end: bytes | None = None) -> None:
        """Refuse a body that has sent `MAX_UNCUT_BYTES` with no row's end (`row_end` in them
        when given; else none it could be cut at)."""
        size = len(self._buf)
        if size > MAX_UNCUT_BYTES and (
            row_end is None or self._buf.rfind(row_end, size - MAX_UNCUT_BYTES) < 0
        ):
            raise BadResponse(
                f"page has more than {MAX_UNCUT_BYTES >> 20} MiB without a row's end after"
                f" {self.rows} rows; refused rather than held in memory"
            )

    def _hand_on(self, rows: pa.Table | CsvRows) -> None:
        if not rows.num_rows:
            return
        self.rows += rows.num_rows
        if isinstance(rows, CsvRows):
            assert self.emit_rows is not None
            self.emit_rows(rows)
        else:
            self.emit(rows)


def is_utf8(data: np.ndarray) -> bool:
    """Whether the bytes are valid UTF-8, checked by Arrow in place (decoding them into a str
    would hold up to four times their size per worker)."""
    offsets = pa.py_buffer(np.array([0, len(data)], np.int64))
    text = pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)])
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True
