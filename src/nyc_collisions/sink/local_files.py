"""Files of a local folder, written whole and durable: each goes to a temporary name beside its
own (which says which process of which boot writes it), is flushed to disk and renamed into
place, and its folder is flushed too, so that after a crash or a power loss a file is either
whole where it belongs or absent, never half there, and never named by a manifest that outlived
it."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ..errors import DestinationError
from ..host import boot_id

NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
TMP_NAME = re.compile(r"\.([0-9a-f]{8})-(\d+)-[0-9a-f]{8}\.tmp$")  # (boot, pid) of `tmp_for`


def tmp_for(path: Path) -> Path:
    """A temporary name beside `path` that says which process of which boot writes it."""
    owner = f"{(boot_id() or '0' * 8)[:8]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(f".{path.name}.{owner}.tmp")


def disk_error(path: Path | str, exc: OSError) -> DestinationError:
    if exc.errno == errno.ENOSPC:
        return DestinationError(f"{path}: no space left on device")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DestinationError(f"{path}: not writable ({exc.strerror})")
    if exc.errno in NO_LOCKS:
        return DestinationError(
            f"{path}: file locks are not available here ({exc.strerror}); nyc-collisions needs "
            "them to keep a second run from writing at once: use a local disk or an NFS mount "
            "with locking"
        )
    return DestinationError(f"{path}: {exc.strerror or exc}")


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename, a new file or folder) to disk."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalWriter:
    """One file written to its temporary name, renamed into place at `close` (see above)."""

    def __init__(self, final: Path, make_folder: Callable[[Path], None]) -> None:
        self._final = final
        self._tmp = tmp_for(final)
        try:
            make_folder(final.parent)
            self._file: IO[bytes] = open(self._tmp, "wb", buffering=1 << 20)  # noqa: SIM115
        except OSError as exc:
            raise disk_error(final, exc) from exc
        self.bytes_written = 0
        self.closed = False
        self._aborted = False

    def write(self, data: bytes | memoryview) -> int:
        if self._aborted:  # an encoder closing after an abort (e.g. at garbage collection)
            return len(data)
        try:
            n = self._file.write(data)
        except OSError as exc:
            self.abort()
            raise disk_error(self._final, exc) from exc
        self.bytes_written += n
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self._final)
            # its entry too: a manifest naming it must never outlive it after a power loss
            sync_folder(self._final.parent)
        except OSError as exc:
            self.abort()
            raise disk_error(self._final, exc) from exc
        self.closed = True

    def abort(self) -> None:
        self.closed = self._aborted = True
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink()
