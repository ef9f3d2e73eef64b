"""A local folder as storage (the interface is in `storage.py`).

Conditional writes (`put_if`, `delete_if`): a key's version is a hash of its content, compared
and replaced under an exclusive `flock` on a guard file beside the key (`.<name>.guard`), so two
processes cannot both replace the same version. The lock dies with its process (a SIGKILL cannot
leave it held); the guard file is removed while still held, and a waiter that locked the removed
file notices and locks the new one. New content is written to a temporary file, flushed to disk
and renamed into place: a crash never leaves an empty or half-written `lock.json` or manifest.
On NFS this needs a mount with locking (NFSv4, or v3 with lockd; not `nolock`/`local_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from ..errors import DestinationBusy, DestinationError
from ..host import LEFTOVER_AGE, boot_id, process_gone
from ..settings import user_path
from .local_files import TMP_NAME, LocalWriter, disk_error, sync_folder, tmp_for
from .storage import Versioned, Writer

MIN_FREE_BYTES = 64 * 1024 * 1024
GUARD_WAIT = 30.0  # seconds to wait for another process's compare-and-write (it takes ms)
STALE_TMP = 600.0  # a temporary file of another host's process: left by a killed one after this


def _own_file(key: str) -> bool:
    """Whether `key` names a temporary or guard file of this store (`tmp_for`, `_guarded`)."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith((".tmp", ".guard"))


def _version(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = user_path(root, "--dest")
        self.url = str(self.root)
        self._made: set[Path] = set()  # folders this run created (removed again if left empty)
        self._made_lock = threading.Lock()
        self._guard_lock = threading.Lock()  # flock excludes processes; this, our own threads
        self._conditional_ok = False

    def _path(self, key: str) -> Path:
        """The file of `key`; never outside the folder, whatever a record edited by hand says."""
        *folders, name = key.split("/")  # a prefix ends with "/": its name is ""
        if "\0" in key or name in (".", "..") or any(p in ("", ".", "..") for p in folders):
            raise DestinationError(f"{self.url}: {key[:80]!r} is not a key inside the destination")
        return self.root / key

    def _make_folder(self, folder: Path) -> None:
        """`mkdir -p`, remembering which folders did not exist before."""
        missing = []
        parent = folder
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        folder.mkdir(parents=True, exist_ok=True)
        for made in missing:  # each new folder's entry in its parent, on disk
            sync_folder(made.parent)
        with self._made_lock:
            self._made.update(missing)

    def open_writer(self, key: str) -> Writer:
        return LocalWriter(self._path(key), self._make_folder)

    def put_bytes(self, key: str, data: bytes, *, check: Callable[[], None] | None = None) -> None:
        writer = LocalWriter(self._path(key), self._make_folder)
        writer.write(data)
        if check is not None:
            try:
                check()
            except BaseException:
                writer.abort()
                raise
        writer.close()

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise disk_error(self._path(key), exc) from exc

    def open_reader(self, key: str) -> IO[bytes]:
        try:
            return open(self._path(key), "rb")
        except OSError as exc:
            raise disk_error(self._path(key), exc) from exc

    def list_keys(self, prefix: str) -> list[str]:
        """The keys below `prefix`, in order; never this store's own temporary and guard files
        (a write in progress, or one a killed process left half done), which are no keys: an S3
        listing does not show a write before it completes either."""
        return [k for k in self._files(prefix) if not _own_file(k)]

    def _files(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = Path(dirpath) / name
                out.append(full.relative_to(self.root).as_posix())
        return sorted(out)

    def delete(self, keys: list[str], *, check: Callable[[], None] | None = None) -> None:
        """Delete files, then the folders below a dataset's folder that this left empty (at
        once: no call here is sent again later, so `check` is needed only once)."""
        if check is not None:
            check()
        emptied: set[Path] = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise disk_error(path, exc) from exc
            emptied.add(path.parent)
        for folder in sorted(emptied, key=lambda f: len(f.parts), reverse=True):
            # data/<batch>/, runs/<batch>/parts/...; never the root or a dataset's own folder
            while len(folder.relative_to(self.root).parts) > 1:
                try:
                    folder.rmdir()  # only ever removes an empty folder
                except OSError:
                    break
                folder = folder.parent

    def check_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise DestinationError(f"{self.root}: exists and is not a folder")
        probe = self.root / f".write-test-{uuid.uuid4().hex[:8]}"
        try:
            self._make_folder(self.root)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise disk_error(self.root, exc) from exc
        free = shutil.disk_usage(self.root).free
        if free < MIN_FREE_BYTES:
            raise DestinationError(f"{self.root}: only {free // 1024} KiB free on the disk")

    def discard_if_empty(self) -> None:
        """Remove the folders this run created that hold no file, deepest first: a run that
        failed before landing anything leaves nothing behind, in a new destination folder or in
        one that already existed (its lock's folders are empty once the lock is released)."""
        with self._made_lock:
            made = sorted(self._made, key=lambda folder: len(folder.parts), reverse=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only ever removes an empty folder

    def cleanup_uploads(self, prefix: str, *, check: Callable[[], None] | None = None) -> int:
        """Remove the temporary files and guard files that killed processes left below `prefix`:
        a temporary file once its writer (named in it) has ended, or is of another host and
        older than `STALE_TMP`; a guard file only while holding its lock (see the docstring)."""
        stale, n = [], 0
        for key in filter(_own_file, self._files(prefix)):
            path = self._path(key)
            if path.name.endswith(".guard"):
                n += self._drop_guard(path)
            elif self._gone(path):
                stale.append(key)
        self.delete(stale, check=check)
        return n + len(stale)

    def _gone(self, tmp: Path) -> bool:
        owner = TMP_NAME.search(tmp.name)
        ours = False  # of this host's processes: its writer alive, or its pid reused
        if owner and owner.group(1) == (boot_id() or "0" * 8)[:8]:
            if process_gone(int(owner.group(2))):
                return True
            ours = True
        age = self._age(tmp)
        return age is not None and age > (LEFTOVER_AGE if ours else STALE_TMP)

    def _drop_guard(self, guard: Path) -> int:
        try:
            fd = os.open(guard, os.O_RDWR)
        except OSError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(guard).st_ino == os.fstat(fd).st_ino:
                guard.unlink()
                return 1
        except OSError:
            pass  # held by a live process, or gone already
        finally:
            os.close(fd)
        return 0

    # -- conditional writes ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _guarded(self, path: Path) -> Iterator[None]:
        """Hold the exclusive lock of `path`'s guard file for a compare-and-write."""
        guard = path.with_name(f".{path.name}.guard")
        with self._guard_lock:
            fd = self._lock(guard)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    guard.unlink()  # while held: see the module docstring
                os.close(fd)

    def _lock(self, guard: Path) -> int:
        deadline = time.monotonic() + GUARD_WAIT
        while True:
            self._make_folder(guard.parent)
            fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise DestinationBusy(
                                f"{guard}: another run holds this file's lock for over "
                                f"{GUARD_WAIT:.0f}s (stopped?); if none is running, delete it"
                            ) from None
                        time.sleep(0.005)
                mine = os.fstat(fd)
                try:
                    now = os.stat(guard)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # we locked a guard file its holder had removed: lock the new one

    def _staged(self, path: Path, data: bytes) -> Path:
        """`data` in a temporary file beside `path`, flushed to disk: ready to rename."""
        self._make_folder(path.parent)
        tmp = tmp_for(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp

    def _current(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def get_versioned(self, key: str, *, with_age: bool = False) -> Versioned | None:
        path = self._path(key)
        try:
            data = self._current(path)
        except OSError as exc:
            raise disk_error(path, exc) from exc
        if data is None:
            return None
        return Versioned(data, _version(data), self._age(path) if with_age else None)

    def _age(self, path: Path) -> float | None:
        """Seconds since `path` was written, both times by the file system's clock: the mtime of
        a file written now (on NFS, the server's clock; never this host's)."""
        probe = tmp_for(path.with_name("clock"))
        try:
            written = path.stat().st_mtime_ns
            probe.touch()
            now = probe.stat().st_mtime_ns
        except OSError:
            return None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
        return max(0.0, (now - written) / 1e9)

    def put_if(
        self,
        key: str,
        data: bytes,
        *,
        expect: str | None,
        check: Callable[[], None] | None = None,
    ) -> str | None:
        """Compare and rename under the guard's lock, a few microseconds: the new content is
        written and flushed before (a process stopped there holds nobody up)."""
        path = self._path(key)
        tmp: Path | None = None
        try:
            tmp = self._staged(path, data)
            if check is not None:
                check()
            with self._guarded(path):
                current = self._current(path)
                if (None if current is None else _version(current)) != expect:
                    return None
                os.replace(tmp, path)
            sync_folder(path.parent)
        except OSError as exc:
            raise disk_error(path, exc) from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        return _version(data)

    def delete_if(self, key: str, *, expect: str) -> bool:
        path = self._path(key)
        try:
            with self._guarded(path):
                current = self._current(path)
                if current is None or _version(current) != expect:
                    return False
                path.unlink()
        except OSError as exc:
            raise disk_error(path, exc) from exc
        return True

    def check_conditional(self) -> None:
        """File locks work here: a create-if-absent succeeds once, then is refused."""
        if self._conditional_ok:
            return
        probe = f".conditional-probe-{uuid.uuid4().hex[:8]}"
        first = self.put_if(probe, b"1", expect=None)
        again = self.put_if(probe, b"2", expect=None)
        if first is not None:
            self.delete_if(probe, expect=first)
        if first is None or again is not None:
            raise DestinationError(
                f"{self.root}: a create-if-absent write was not refused; nyc-collisions needs "
                "working file locks here to keep a second run from writing at once"
            )
        self._conditional_ok = True
