"""The key spill of verify and reconcile: every key comes back once, in the bucket of its hash,
however many buckets and however often rows were appended to their files."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from nyc_collisions import keyspill
from nyc_collisions.host import boot_id, process_start
from nyc_collisions.keyspill import KeySpill, bucket_count, key_hash

SIDE = pa.schema([pa.field("k", pa.string()), pa.field("n", pa.int64())])


@pytest.fixture
def spill_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = tmp_path / "spill"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    yield root
    assert not list(root.iterdir()), "the spill's folder stayed behind"


def _keys(side: str, start: int, n: int) -> pa.Table:
    return pa.table(
        {"k": [f"{side}-{i}" for i in range(start, start + n)], "n": list(range(start, start + n))}
    )


def test_a_spill_of_a_very_large_dataset_stays_within_the_open_file_limit(
    spill_root: Path,
) -> None:
    """Buckets for 60M rows a side (600 each) under Lambda's 1,024 descriptors: every bucket's
    file had been held open at once, two per bucket, and the spill failed with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        with KeySpill({"source": SIDE, "landed": SIDE}, "k", bucket_count(60_000_000)) as spill:
            spill.add("source", _keys("x", 0, 5000))
            spill.add("landed", _keys("x", 2500, 5000))
            seen = {"source": 0, "landed": 0}
            for bucket in spill.pairs():
                for side, table in bucket.items():
                    seen[side] += table.num_rows
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert seen == {"source": 5000, "landed": 5000}


def test_keys_appended_to_their_buckets_many_times_come_back_once_each(
    spill_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows held in memory are appended to the buckets' files whenever they pass a size (here
    a few KiB, so each file is many streams), from several threads at once."""
    monkeypatch.setattr(keyspill, "FLUSH_BYTES", 4096)
    buckets = 7
    with KeySpill({"source": SIDE, "landed": SIDE}, "k", buckets) as spill:

        def add(side: str, first: int) -> None:
            for start in range(first, first + 60 * 333, 333):
                spill.add(side, _keys(side, start, 333))

        threads = [
            threading.Thread(target=add, args=(side, first))
            for side in ("source", "landed")
            for first in (0, 20_000)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got: dict[str, list[str]] = {"source": [], "landed": []}
        for b, bucket in enumerate(spill.pairs()):
            for side, table in bucket.items():
                assert table.schema == SIDE
                hashes = key_hash(table.column("k")) % buckets
                assert set(hashes.tolist()) <= {b}, f"{side}: keys of other buckets in bucket {b}"
                got[side] += table.column("k").to_pylist()
                # the rows stay whole: each key with its own number
                assert table.column("k").to_pylist() == [
                    f"{side}-{n}" for n in table.column("n").to_pylist()
                ]
        for side in got:
            want = [f"{side}-{i}" for first in (0, 20_000) for i in range(first, first + 60 * 333)]
            assert sorted(got[side]) == sorted(want)


@pytest.fixture
def sleeper() -> Iterator[int]:
    """A live process of this host: the pid a killed run's leftover names, reused."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def _leftover(root: Path, owner: str, days_old: float) -> Path:
    folder = root / f"{keyspill.PREFIX}{owner}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    (folder / "source-0000.arrow").write_bytes(b"keys")
    then = time.time() - days_old * 24 * 3600
    for path in (folder / "source-0000.arrow", folder):
        os.utime(path, (then, then))
    return folder


def test_spills_of_killed_runs_go_with_the_next_spill_and_live_ones_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sleeper: int
) -> None:
    """A killed verify or reconcile leaves its spill folder in TMPDIR (a warm Lambda keeps its
    /tmp; a container's may be a volume that outlives it): the next spill removes one whose
    process has ended, whose pid is another process's now, or of another boot untouched for a
    day; never one of a live run."""
    root = tmp_path / "spill"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    mine = (boot_id() or "host")[:8]
    me = f"{mine}-{os.getpid()}-{process_start(os.getpid())}"
    gone = [
        _leftover(root, "deadbeef-4242-1", days_old=2),  # another boot, or a restarted container
        _leftover(root, f"{mine}-{sleeper}-1", days_old=0),  # its pid reused by a live process
        _leftover(root, f"{mine}-{sleeper}", days_old=2),  # an older version's name, reused pid
    ]
    kept = [
        _leftover(root, me, days_old=2),  # a live run (this one) reading its spill
        _leftover(root, "deadbeef-4242-1", days_old=0.5),  # another host's, maybe still running
    ]
    with KeySpill({"a": SIDE}, "k", 1) as spill:
        spill.add("a", _keys("a", 0, 3))
    assert [p.name for p in gone if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []
