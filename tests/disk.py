"""A small disk for the tests of a full disk: a real tmpfs where this machine lets the test mount
one (root with CAP_SYS_ADMIN), else the same limit enforced at the storage seam.

At the seam, every file that `sink/local.py` opens for writing below the folder shares one byte
budget and fails with the kernel's ENOSPC error once it is spent, and the folder's free space
reads as what is left of it. What the seam does not cover is the kernel's own refusal (at a
`mkdir`, a rename or an `fsync`): those paths are only tested where the tmpfs can be mounted.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nyc_collisions.sink import local


class SmallDisk:
    def __init__(self, path: Path, kind: str, size: int) -> None:
        self.path = path
        self.kind = kind
        self.left = size

    def fill(self) -> None:
        """Take all the space that is left."""
        if self.kind == "seam":
            self.left = 0
            return
        with open(self.path / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass


class _Limited:
    """A file opened for writing whose bytes count against the disk's budget."""

    def __init__(self, f: Any, disk: SmallDisk) -> None:
        self._f = f
        self._disk = disk

    def write(self, data: Any) -> int:
        n = len(data)
        if n > self._disk.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._disk.left -= n
        return int(self._f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


@contextmanager
def small_disk(tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode == 0:
        try:
            yield SmallDisk(mount, "tmpfs", size)
        finally:
            subprocess.run(["umount", str(mount)], check=False)
        return
    disk = SmallDisk(mount, "seam", size)
    real_open = open
    real_usage = shutil.disk_usage

    def limited_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        inside = Path(file).resolve().is_relative_to(mount.resolve())
        return _Limited(f, disk) if inside and any(m in mode for m in "wax+") else f

    def usage(path: Any) -> Any:
        got = real_usage(path)
        if Path(path).resolve().is_relative_to(mount.resolve()):
            return got._replace(free=disk.left)
        return got

    monkeypatch.setattr(local, "open", limited_open, raising=False)
    monkeypatch.setattr(local.shutil, "disk_usage", usage)
    yield disk
