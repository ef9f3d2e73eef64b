"""The key spill of verify and reconcile: every key comes back once, in the bucket of its hash,
however many buckets and however often rows were appended to their files."""

from __future__ import annotations

import resource
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from nyc_collisions import keyspill
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
