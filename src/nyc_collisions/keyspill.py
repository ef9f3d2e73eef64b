"""Key sets too large for memory, compared bucket by bucket through local temporary files.

`KeySpill` hash-partitions tables of keys (a source's keys, a landed state's keys) by one column
into `buckets` Arrow IPC files per side, zstd-compressed, in a private temporary folder (under
`TMPDIR`, `/tmp` on Lambda). Equal keys land in the same bucket whichever side and thread wrote
them, so `pairs()` then hands one bucket of every side at a time to the comparison: memory holds
one bucket, never the key sets. Sizing the buckets from the expected row count
(`bucket_count`) bounds it whatever the dataset's size.

Rows wait in memory (`FLUSH_BYTES` in all) and are then appended to their buckets' files, each
file opened, written and closed in turn: however many buckets, one file is open at a time (two
per bucket held open would pass Lambda's 1,024 descriptors at about 50M rows). A bucket's file
is then a series of IPC streams, read back one after another.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from . import settings
from .host import LEFTOVER_AGE, boot_id, process_gone, process_start

logger = logging.getLogger(__name__)

BUCKET_ROWS = "NYC_COLLISIONS_KEYSCAN_BUCKET_ROWS"
DEFAULT_BUCKET_ROWS = 100_000  # rows of one side in a bucket: a few MiB compared at once
FLUSH_BYTES = 4 << 20  # rows held in memory before they are appended to their buckets' files
PREFIX = "nyc-collisions-keys-"
_OPTIONS = ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=1))
# murmur3's 64-bit finaliser, and an odd multiplier for the polynomial over a key's bytes
_MIX1, _MIX2, _POLY = (
    np.uint64(0xFF51AFD7ED558CCD),
    np.uint64(0xC4CEB9FE1A85EC53),
    np.uint64(0x100000001B3),
)


def bucket_count(rows: int, bucket_rows: int | None = None) -> int:
    """Buckets for `rows` keys a side, each about `bucket_rows` rows (default: env
    NYC_COLLISIONS_KEYSCAN_BUCKET_ROWS, else 100,000)."""
    per = bucket_rows or settings.env_int(BUCKET_ROWS, DEFAULT_BUCKET_ROWS, 1, 1 << 40)
    return max(1, -(-max(rows, 0) // per))


def key_hash(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string (null: 0), vectorised over the Arrow buffers.

    Arrow has no public hash kernel; this is a polynomial over the bytes (one vector step per
    byte position, so keys of a few dozen bytes cost a few dozen passes), then mixed. Only its
    spread matters (it picks buckets): equal strings get equal hashes on every side.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    n = len(values)
    out = np.zeros(n, np.uint64)
    if n == 0:
        return out
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32)[values.offset : values.offset + n + 1]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets)
    rows: np.ndarray | None = None  # None: every row; else the rows still that long
    for j in range(int(lengths.max())):
        if rows is None and int(lengths.min()) <= j:
            rows = np.flatnonzero(lengths > j)
        elif rows is not None:
            rows = rows[lengths[rows] > j]
        if rows is None:
            out = out * _POLY + data[starts + j]
        else:
            out[rows] = out[rows] * _POLY + data[starts[rows] + j]
    out += lengths.astype(np.uint64)  # "" and "\0" differ
    out ^= out >> np.uint64(33)
    out *= _MIX1
    out ^= out >> np.uint64(33)
    out *= _MIX2
    out ^= out >> np.uint64(33)
    if values.null_count:
        out[np.asarray(values.is_null())] = 0
    return out


class _Bucket:
    """One side's rows of one bucket: held (`pending`), then appended to its file as one more
    IPC stream (`flush`)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self.pending: list[pa.Table] = []

    def flush(self) -> None:
        if self.pending:
            with (
                self.path.open("ab") as file,
                ipc.new_stream(file, self.schema, options=_OPTIONS) as writer,
            ):
                for table in self.pending:
                    writer.write_table(table)
            self.pending.clear()

    def read(self) -> pa.Table:
        """Every stream of the file, as one table (empty when nothing was written)."""
        if not self.path.exists():
            return self.schema.empty_table()
        size = self.path.stat().st_size
        tables = []
        with pa.OSFile(str(self.path)) as file:
            while file.tell() < size:
                tables.append(ipc.open_stream(file).read_all())
        return pa.concat_tables(tables) if tables else self.schema.empty_table()


class KeySpill:
    """Tables of keys, per named side, spilled into hash buckets of `column` (see the module).

    `add` may be called from several threads. Use as a context manager: the folder goes at the
    end, whatever happens; one left by a killed process of this host goes with the next spill.
    """

    def __init__(self, sides: dict[str, pa.Schema], column: str, buckets: int) -> None:
        self.column = column
        self.buckets = max(1, buckets)
        self.schemas = sides
        _remove_orphans()
        self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{_owner()}-"))
        self._lock = threading.Lock()
        self._files = {
            side: [
                _Bucket(self.folder / f"{side}-{b:04d}.arrow", schema) for b in range(self.buckets)
            ]
            for side, schema in sides.items()
        }
        self.rows = dict.fromkeys(sides, 0)
        self._pending_bytes = 0
        self._closed = False

    def __enter__(self) -> KeySpill:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def add(self, side: str, table: pa.Table) -> None:
        """Spill the rows of `table` (the side's columns, in any order) into their buckets."""
        if not table.num_rows:
            return
        table = table.select(self.schemas[side].names)
        if self.buckets == 1:
            parts = [(0, table)]
        else:
            which = key_hash(table.column(self.column)) % np.uint64(self.buckets)
            order = np.argsort(which, kind="stable")
            counts = np.bincount(which.astype(np.int64), minlength=self.buckets)
            table = table.take(pa.array(order))
            bounds = np.concatenate([[0], np.cumsum(counts)])
            parts = [
                (b, table.slice(int(bounds[b]), int(counts[b])))
                for b in range(self.buckets)
                if counts[b]
            ]
        with self._lock:
            if self._closed:
                raise RuntimeError("key spill already closed")
            for b, part in parts:
                self._files[side][b].pending.append(part)
                self._pending_bytes += part.nbytes
            self.rows[side] += table.num_rows
            if self._pending_bytes > FLUSH_BYTES:
                self._flush()

    def _flush(self) -> None:
        for files in self._files.values():
            for f in files:
                f.flush()
        self._pending_bytes = 0

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._flush()
                self._closed = True

    @property
    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.arrow") if p.exists())

    def pairs(self) -> Iterator[dict[str, pa.Table]]:
        """One bucket at a time: every side's rows of that bucket (each file is removed once
        read, so the disk used shrinks as the comparison goes)."""
        self.close()
        for b in range(self.buckets):
            bucket = {}
            for side, files in self._files.items():
                table = files[b].read()
                files[b].path.unlink(missing_ok=True)
                bucket[side] = table.combine_chunks()
            yield bucket

    def remove(self) -> None:
        try:
            self.close()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _owner() -> str:
    """This process in a spill folder's name: boot (and pid namespace), pid, start time."""
    pid = os.getpid()
    return f"{boot_id()[:8] or 'host'}-{pid}-{process_start(pid) or 0}"


def _remove_orphans() -> None:
    """Remove spill folders of killed processes (a warm Lambda keeps its /tmp): of this host's
    when their process has ended (or its pid is another's now); one whose process cannot be
    told (another boot or pid namespace, an older name without the start) once a day untouched."""
    root = Path(tempfile.gettempdir())
    mine = boot_id()[:8] or "host"
    try:
        found = list(root.glob(f"{PREFIX}*"))
    except OSError:
        return
    for path in found:
        parts = path.name[len(PREFIX) :].split("-")
        ours = len(parts) >= 3 and parts[0] == mine and parts[1].isdigit()
        started = parts[2] if ours and parts[2].isdigit() and parts[2] != "0" else ""
        if ours and started:
            gone = process_gone(int(parts[1]), started)
        else:
            gone = (ours and process_gone(int(parts[1]))) or _untouched(path) > LEFTOVER_AGE
        if gone:
            logger.info("removing %s, left by a killed run", path)
            shutil.rmtree(path, ignore_errors=True)


def _untouched(folder: Path) -> float:
    """Seconds since anything in `folder` was last written (0 when it cannot be told)."""
    try:
        newest = max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.iterdir())])
    except OSError:
        return 0.0
    return time.time() - newest
