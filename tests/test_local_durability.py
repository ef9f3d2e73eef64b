"""A local commit is durable: every entry the manifest depends on is on disk before it is."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nyc_collisions.host import boot_id
from nyc_collisions.sink.local import LocalStorage


def test_a_data_files_entry_is_flushed_before_the_manifest_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data file is renamed into `data/<batch>/` (a folder made for it), then the manifest that
    names it. The file's own bytes were flushed; its entry in `data/<batch>/`, and that folder's
    in `data/`, must be too, or after a power loss the manifest can be on disk and name a file
    that is not (file systems need not order them: btrfs's log tree, ext4 data=writeback)."""
    synced: list[str] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    root = tmp_path / "landing"
    storage = LocalStorage(root)
    (root / "crashes").mkdir(parents=True)
    writer = storage.open_writer("crashes/data/B1/part-0000-000000-abcdef.csv")
    writer.write(b"a,b\n1,2\n")
    writer.close()
    data = synced.copy()
    assert storage.put_if("crashes/manifest.json", b'{"names": "B1"}', expect=None)
    assert str(root / "crashes/data/B1") in data  # the file's entry
    assert str(root / "crashes/data") in data  # its new folder's
    assert str(root / "crashes") in data  # and that one's
    assert str(root / "crashes") in synced[len(data) :]  # then the manifest's


def test_a_temporary_file_whose_writers_pid_is_reused_goes_a_day_later(tmp_path: Path) -> None:
    """A killed run's temporary file names its writer's pid; when that pid is another live
    process's now (a restarted container's entrypoint gets the same one), the file is not left
    for good: untouched for a day, the next cleanup removes it. A fresh one stays."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        storage = LocalStorage(tmp_path)
        folder = tmp_path / "crashes" / "data" / "20260101T000000Z-update-dead01"
        folder.mkdir(parents=True)
        owner = f"{(boot_id() or '0' * 8)[:8]}-{child.pid}"
        old = folder / f".part-0000-000000.csv.{owner}-0badf00d.tmp"
        fresh = folder / f".part-0000-000001.csv.{owner}-0badf00e.tmp"
        for path in (old, fresh):
            path.write_bytes(b"rows")
        then = time.time() - 2 * 24 * 3600
        os.utime(old, (then, then))
        assert storage.cleanup_uploads("crashes/") == 1
        assert not old.exists()
        assert fresh.exists()
    finally:
        child.kill()
        child.wait()
