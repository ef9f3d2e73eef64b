"""Storage behind one small interface: a local folder (`local.py`) or an S3 prefix (`s3.py`).

Keys are relative, `/`-separated paths below the destination root. Writers make a file visible
only when it is complete: a local file is written under a temporary name and renamed; an S3 object
is a multipart upload (parts sent in the background while rows keep arriving) that is completed on
`close()` and aborted on `abort()`. Small metadata objects (manifests, plans) are written whole.

The lease and the manifest are written with conditional writes (`put_if`, `delete_if`): a write
names the version it replaces (or that the key must be absent) and fails when another writer got
there first. S3 sends `If-None-Match: *` / `If-Match: <etag>`; a local folder compares versions
under a file lock (see `local.py`). `check_conditional` probes once that the store honours them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import unquote, urlparse

from ..errors import UsageError

DEFAULT_LOCAL_DEST = "./nyc-collisions-data"


@dataclass(frozen=True)
class Versioned:
    """A small object as read, with the version a conditional write names to replace it.

    `age` is how long ago it was written, by the store's own clock (never this host's), when
    asked for and known.
    """

    data: bytes
    version: str
    age: float | None = None


class Writer(Protocol):
    """A binary, write-only file whose content becomes visible at `close()`."""

    def write(self, data: bytes | memoryview) -> int: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def bytes_written(self) -> int: ...


class Storage(Protocol):
    url: str

    def open_writer(self, key: str) -> Writer: ...
    def put_bytes(self, key: str, data: bytes, *, check: Callable[[], None] | None = None) -> None:
        """Write `data`; with `check`, as `put_if` sends: `check()` before every attempt, and
        no attempt sent again later by a library's own retries (a run's records)."""
        ...

    def get_bytes(self, key: str) -> bytes | None: ...
    def open_reader(self, key: str) -> IO[bytes]: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def delete(self, keys: list[str], *, check: Callable[[], None] | None = None) -> None:
        """Delete `keys`; with `check`, sent as `put_bytes` sends with it (a cleanup's, under
        the lease: a delete sent again after a take-over would remove the new holder's files)."""
        ...

    def check_writable(self) -> None: ...
    def cleanup_uploads(self, prefix: str, *, check: Callable[[], None] | None = None) -> int:
        """Remove what killed writers left below `prefix`; `check` as `delete` takes it."""
        ...

    def discard_if_empty(self) -> None: ...

    # -- conditional writes (the lease and the manifest) --------------------------------------
    def get_versioned(self, key: str, *, with_age: bool = False) -> Versioned | None: ...
    def put_if(
        self,
        key: str,
        data: bytes,
        *,
        expect: str | None,
        check: Callable[[], None] | None = None,
    ) -> str | None:
        """Write `data` only if the key is at version `expect` (absent when None); the new
        version, or None when the condition failed. `data` must differ from every earlier
        content of the key (a retried request that had landed is recognised by its content).
        `check()` runs before every attempt (a lease's: it raises once the lease is lost), and
        no attempt is sent again later by a library's own retries."""
        ...

    def delete_if(self, key: str, *, expect: str) -> bool:
        """Delete the key only if it is at version `expect`; False when it was not."""
        ...

    def check_conditional(self) -> None:
        """Raise `DestinationError` unless the store honours conditional writes (probed once)."""
        ...


# what S3 (and botocore) take for a bucket name, legacy names with capitals and _ included
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")


def open_storage(dest: str) -> Storage:
    """`s3://bucket/prefix` or a local path (`file://` allowed)."""
    from .local import LocalStorage
    from .s3 import S3Storage

    if not dest or not dest.strip():
        raise UsageError("--dest is empty")
    if "://" in dest:
        if any(ord(c) < 32 for c in dest):  # urlparse drops tabs and line breaks: another place
            raise UsageError(f"--dest {dest!r} has a control character in it")
        parsed = urlparse(dest)
        if parsed.scheme == "s3":
            if not _BUCKET.fullmatch(parsed.netloc) or "?" in dest or "#" in dest:
                raise UsageError(f"--dest {dest!r} is not s3://bucket/prefix")
            return S3Storage(parsed.netloc, parsed.path.strip("/"))
        if parsed.scheme == "file":
            # file:///abs/path (or file://localhost/...): a host would be dropped, and the
            # path land elsewhere (file://data/land is /land)
            path = unquote(parsed.path)
            if (
                parsed.netloc.lower() not in ("", "localhost")
                or not path.startswith("/")
                or "?" in dest
                or "#" in dest
                or "\0" in path
            ):
                raise UsageError(
                    f"--dest {dest!r} is not a file URL of a folder: use file:///absolute/path "
                    "or a plain path"
                )
            return LocalStorage(Path(path))
        raise UsageError(f"--dest {dest!r}: use s3://bucket/prefix or a local folder")
    return LocalStorage(Path(dest))
