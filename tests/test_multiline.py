"""Text values with newlines, `\\r\\n`, quotes, commas, backslashes, tabs, emoji, spaces, empty
strings and several KB, in every reader of landed files, at the size where they break it.

Landed CSV is read back in blocks; a quoted newline where a block ends must not be taken for
the end of a row. The fake server's `hostile_text` puts such values in the text columns.
"""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from nyc_collisions.datasets import KNOWN
from nyc_collisions.pages import CsvPageStream
from nyc_collisions.pages.csv_pages import RowEnds
from nyc_collisions.schema import Schema
from nyc_collisions.sink import formats
from nyc_collisions.sink.formats import CsvEncoder, read_text_batches
from tests.fake_soda import FakeSoda
from tests.helpers import KEYS, NAMES, cli, exact, read_export_table

PERSONS = NAMES["persons"]
MIB = 1 << 20


def _backfill(srv: FakeSoda, dest: str, *extra: str) -> None:
    res = cli("backfill", "--source", srv.url, "--dest", dest, "--no-progress", *extra)
    assert res.code == 0, res.text


def _landed_csv(dest: Path, name: str) -> list[Path]:
    manifest = json.loads((dest / name / "manifest.json").read_text())
    return [dest / f["path"] for b in manifest["batches"] for f in b["files"]]


def _by_key(table: pa.Table, key: str) -> pa.Table:
    order = pc.sort_indices(pc.cast(table.column(key), pa.int64()))
    return table.take(order).cast(pa.schema([(n, pa.string()) for n in table.column_names]))


def _same_rows(export: Path, files: list[Path], key: str) -> None:
    """DuckDB and pandas read the landed files to the rows of the export (which `exact` held
    equal to the source), every value as its text, with the options README gives."""
    want = _by_key(read_export_table(export), key)
    paths = ", ".join(f"'{p}'" for p in files)
    query = (
        f"SELECT * FROM read_csv([{paths}], all_varchar = true, allow_quoted_nulls = false, "
        f"max_line_size = {64 * MIB})"
    )
    assert _by_key(duckdb.sql(query).to_arrow_table(), key).equals(want)
    frame = pd.concat(
        [pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""]) for p in files],
        ignore_index=True,
    )
    # pandas reads an empty string as null, as it does an empty field
    want_pandas = pa.table(
        {n: pc.if_else(pc.equal(want[n], ""), None, want[n]) for n in want.column_names}
    )
    got = _by_key(pa.Table.from_pandas(frame, preserve_index=False), key)
    assert got.equals(want_pandas)


@pytest.mark.slow
def test_multiline_values_in_landed_files_of_several_blocks(tmp_path: Path) -> None:
    """persons with hostile text, landed as a CSV file of at least 40 MB (several of the
    reader's blocks, and CSV pages of several pieces as they stream in): export equals the
    source field by field, and DuckDB and pandas read the file to the same rows."""
    dest = tmp_path / "land"
    with FakeSoda(sizes={PERSONS: 125_000}, seed=3, hostile_text=True) as srv:
        _backfill(srv, str(dest), "persons", "--workers", "1")
        (file,) = _landed_csv(dest, "persons")
        assert file.stat().st_size >= max(40 * MIB, 4 * formats.READ_BLOCK_BYTES)
        exact(srv, str(dest), "persons", tmp_path)
    _same_rows(tmp_path / "export-persons.csv", [file], KEYS[PERSONS])


def test_a_value_of_several_mib_reads_back_by_the_documented_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text value of a few MiB on many lines (rows up to 64 MiB land): export equals the
    source, and DuckDB and pandas read the landed file with the options README gives (DuckDB's
    own bound on a row is 2 MB unless raised)."""
    from tests.fake_soda import hostile

    big = 'witness statement, "quoted", line\n' * 100_000  # 3.4 MB
    monkeypatch.setattr(hostile, "VALUES", (big, ""))
    monkeypatch.setattr(hostile, "_WEIGHTS", np.array([0.5, 0.5]))
    dest = tmp_path / "land"
    with FakeSoda(sizes={PERSONS: 40}, seed=3, hostile_text=True) as srv:
        _backfill(srv, str(dest), "persons")
        exact(srv, str(dest), "persons", tmp_path)
    (file,) = _landed_csv(dest, "persons")
    assert big.encode() in file.read_bytes().replace(b'""', b'"')
    _same_rows(tmp_path / "export-persons.csv", [file], KEYS[PERSONS])


@pytest.mark.parametrize(
    ("dest", "fmt"), [("local", "csv"), ("s3", "csv"), ("local", "parquet")], indirect=["dest"]
)
def test_multiline_values_through_every_command(
    dest: str, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All three datasets with hostile text, read back in blocks small enough (64 KiB) that each
    landed file spans many: backfill, update, reconcile, verify, status and compact keep the
    landed state equal to the source, landed as CSV (in a folder and on S3) and as Parquet."""
    monkeypatch.setattr(formats, "READ_BLOCK_BYTES", 64 << 10)
    sizes = {NAMES["crashes"]: 2_000, PERSONS: 4_000, NAMES["vehicles"]: 3_000}
    with FakeSoda(sizes=sizes, seed=5, hostile_text=True) as srv:
        _backfill(srv, dest, "--format", fmt, "--page-size", "1000", "--file-rows", "2000")
        for dataset_id in NAMES.values():
            srv.insert(dataset_id, 150)
            srv.edit(dataset_id, 150)
            srv.delete(dataset_id, 20)
        res = cli("update", "--reconcile", "--source", srv.url, "--dest", dest)
        assert res.code == 0, res.text
        res = cli("verify", "--source", srv.url, "--dest", dest)
        assert res.code == 0, res.text
        status = json.loads(cli("status", "--json", "--source", srv.url, "--dest", dest).out)
        assert [s["agree"] for s in status] == [True] * 3
        for name in NAMES:
            exact(srv, dest, name, tmp_path, ".parquet")
        res = cli("compact", "--prune", "--dest", dest, "--file-rows", "3000")
        assert res.code == 0, res.text
        for name in NAMES:
            exact(srv, dest, name, tmp_path, ".csv")


def test_multiline_values_land_the_same_bytes_by_every_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hostile values land the same bytes whichever way the rows come: persons as CSV pages
    passed through or as JSON pages converted natively, crashes' JSON through the native
    converter or Arrow's path; one page of several MiB each, cut into pieces as it streams in."""
    from nyc_collisions import pages

    sizes = {NAMES["crashes"]: 8_000, PERSONS: 16_000, NAMES["vehicles"]: 0}
    runs = {
        "csv": ("persons", "--wire", "csv"),
        "json": ("persons", "--wire", "json"),
        "native": ("crashes",),
        "arrow": ("crashes",),
    }
    landed: dict[str, bytes] = {}
    with FakeSoda(sizes=sizes, seed=9, hostile_text=True) as srv:
        for run, args in runs.items():
            if run == "arrow":
                monkeypatch.setattr(pages.native, "_jsoncsv", None)
            dest = tmp_path / run
            _backfill(srv, str(dest), *args, "--workers", "1", "--page-size", "16000")
            exact(srv, str(dest), args[0], tmp_path / run)
            (file,) = _landed_csv(dest, args[0])
            landed[run] = file.read_bytes()
    assert landed["csv"] == landed["json"]
    assert landed["native"] == landed["arrow"]


def test_multiline_values_in_pages_cut_short_are_fetched_again(tmp_path: Path) -> None:
    """Pages cut inside a row (often inside a value of many lines, after one of its newlines),
    reset or cut to fewer rows: what lands is still the source, CSV pages and JSON pages."""
    sizes = {NAMES["crashes"]: 3_000, PERSONS: 5_000, NAMES["vehicles"]: 0}
    dest = str(tmp_path / "land")
    with FakeSoda(sizes=sizes, seed=4, hostile_text=True) as srv:
        srv.random_faults(0.3, ["truncate_mid", "reset", "truncate_rows"], seed=3)
        _backfill(srv, dest, "crashes", "persons", "--page-size", "700")
        assert srv.stats()["faults"].get("truncate_mid")
        srv.clear_faults()
        for name in ("crashes", "persons"):
            exact(srv, dest, name, tmp_path)


def test_fake_server_hostile_text_knob() -> None:
    """`hostile_text` puts every kind of hostile value in the text columns of all three
    datasets, spread through the rows, the same for the same seed, the other values as without
    the knob; JSON and CSV pages carry them exactly (the CSV written by Arrow, as usual)."""
    import csv
    import io

    import httpx

    from tests.fake_soda.hostile import VALUES, text_fields
    from tests.fake_soda.schema import SCHEMAS

    sizes = {NAMES["crashes"]: 4_000, PERSONS: 4_000, NAMES["vehicles"]: 4_000}
    seen: set[object] = set()
    with (
        FakeSoda(sizes=sizes, seed=2, hostile_text=True) as srv,
        FakeSoda(sizes=sizes, seed=2, hostile_text=True) as again,
        FakeSoda(sizes=sizes, seed=2) as plain,
    ):
        for dataset_id in NAMES.values():
            rows = srv.rows(dataset_id)
            assert rows == again.rows(dataset_id)
            fields = set(text_fields(SCHEMAS[dataset_id]))
            hostile = []
            for i, (row, base) in enumerate(zip(rows, plain.rows(dataset_id), strict=True)):
                changed = {k for k in row.keys() | base.keys() if row.get(k) != base.get(k)}
                assert changed <= fields
                hostile += [i] if changed else []
                seen |= {row[k] for k in changed if row.get(k) in VALUES}
            assert {i * 10 // len(rows) for i in hostile} == set(range(10))  # every tenth
            params = {"$select": "*,:id", "$order": ":id", "$limit": "50000"}
            url = f"{srv.url}/resource/{dataset_id}"
            want = [{k: v for k, v in r.items() if k == ":id" or k[0] != ":"} for r in rows]
            assert httpx.get(f"{url}.json", params=params).json() == want
            if dataset_id == NAMES["crashes"]:
                continue  # CSV writes a location as address lines (test_fake_soda checks them)
            text = httpx.get(f"{url}.csv", params=params).text
            parsed = list(csv.DictReader(io.StringIO(text, newline="")))
            assert parsed == [{k: r.get(k, "") for k in parsed[0]} for r in want]
    assert seen == set(VALUES)


def _schema() -> Schema:
    meta = {
        "columns": [
            {"fieldName": "borough", "dataTypeName": "text", "position": 1},
            {"fieldName": "collision_id", "dataTypeName": "number", "position": 2},
        ]
    }
    return Schema.from_metadata(KNOWN["crashes"], meta)


def landed_csv(rows: list[dict[str, str]]) -> bytes:
    s = _schema()
    table = pa.table({n: pa.array([r.get(n) for r in rows], pa.string()) for n in s.names})
    out = io.BytesIO()
    encoder = CsvEncoder(out, s)
    encoder.write(table)
    encoder.close()
    return out.getvalue()


class SlowFile(io.RawIOBase):
    """A landed file read as S3's ranged reads are: each read takes a few milliseconds."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._data.seek(offset, whence)

    def tell(self) -> int:
        return self._data.tell()

    def readinto(self, buffer: Any) -> int:
        time.sleep(0.005)
        return self._data.readinto(buffer)


def test_a_landed_row_longer_than_a_read_block_reads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_read_csv` promises that a row longer than a block is read again with larger blocks.
    A landed CSV file (written by the tool's own encoder) with one long value must read back
    to its rows, not fail as unreadable (`current._read_file` then says the landed file is
    damaged and asks for a fresh backfill)."""
    monkeypatch.setattr(formats, "READ_BLOCK_BYTES", 64 << 10)  # then 512 KiB, then 4 MiB
    rows = [{"borough": f"b{i}", "socrata_id": f"row-{i:05d}"} for i in range(2000)]
    rows.insert(1500, {"borough": "x" * (1 << 20), "socrata_id": "row-long"})
    data = landed_csv(rows)
    for _ in range(3):
        back = pa.concat_tables(list(read_text_batches("csv", SlowFile(data), _schema())))
        assert back.column("socrata_id").to_pylist() == [r["socrata_id"] for r in rows]
        assert back.column("borough").to_pylist() == [r["borough"] for r in rows]


def _landed_bytes(values: list[str]) -> bytes:
    """A landed CSV file of crashes' two first columns (and the system fields) with `values`
    as the borough."""
    out = io.BytesIO()
    enc = CsvEncoder(out, _TWO)
    n = len(values)
    cols = {
        "borough": values,
        "collision_id": [str(i) for i in range(n)],
        "socrata_id": [f"row-{i:05d}" for i in range(n)],
        "socrata_created_at": [None] * n,
        "socrata_updated_at": [None] * n,
    }
    enc.write(pa.table(cols, schema=_TWO.text_schema()))
    enc.close()
    return out.getvalue()


_TWO = Schema.from_metadata(
    KNOWN["crashes"],
    {
        "columns": [
            {"fieldName": "borough", "dataTypeName": "text", "position": 1},
            {"fieldName": "collision_id", "dataTypeName": "number", "position": 2},
        ]
    },
)


def test_a_crlf_value_split_by_a_read_block_reads_back_whole() -> None:
    """Short rows and one value `windows\\r\\nline break` placed so that its `\\r` is the
    last byte of the reader's first block (Arrow's streaming reader drops the `\\n` of a quoted
    `\\r\\n` split between two blocks)."""
    block = formats.READ_BLOCK_BYTES
    values = [f"plain value {i}" for i in range(block // 40)]
    for pad in range(200):
        values[0] = "y" * pad
        data = _landed_bytes(values)
        row = data.count(b"\n", 0, data.rfind(b"\n", 0, block - 1))  # the row holding block-1
        trial = list(values)
        trial[row] = "windows\r\nline break"
        data = _landed_bytes(trial)
        if data[block - 1 : block + 1] == b"\r\n":
            break
    else:
        pytest.fail("no padding puts the value's \\r at the block's end")
    got = pa.concat_tables(list(read_text_batches("csv", io.BytesIO(data), _TWO)))
    assert got.column("borough").to_pylist() == trial


def test_export_keeps_crlf_values_a_read_block_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """persons with hostile text landed as CSV, the read block set to end on the `\\r` of a
    `\\r\\n` inside a value (where a block ends is a matter of the data): export (and so
    compact, read and the table, which read alike) equals the source."""
    dest = tmp_path / "land"
    with FakeSoda(sizes={PERSONS: 3000}, seed=3, hostile_text=True) as srv:
        _backfill(srv, str(dest), "persons", "--format", "csv")
        (file,) = _landed_csv(dest, "persons")
        at = file.read_bytes().find(b"\r\n", 200_000)  # landed rows end in `\n`: a value's
        assert at > 0
        monkeypatch.setattr(formats, "READ_BLOCK_BYTES", at + 1)
        exact(srv, str(dest), "persons", tmp_path)


MANY_LINES = 'line, "q"\n' * 300_000  # 3 MB on 300,000 lines


def test_a_csv_page_of_values_on_many_lines_is_cut_at_its_rows_ends() -> None:
    """A CSV page of 30 rows, each with a 3 MB value of 300,000 lines (no row near the 64 MiB a
    row may have), fed in 1 MiB pieces: every row comes out, each byte looked at once."""
    head = b'"borough","collision_id",":id",":created_at",":updated_at"\n'
    quoted = b'"' + MANY_LINES.replace('"', '""').encode() + b'"'
    rows = [quoted + b',"%d","row-%05d",,"2024-01-01T00:00:00.000Z"\n' % (i, i) for i in range(30)]
    body = head + b"".join(rows)
    got: list[pa.Table] = []
    page = CsvPageStream(_TWO, got.append)
    for i in range(0, len(body), MIB):
        page.feed(body[i : i + MIB])
    assert page.finish() == 30
    assert pa.concat_tables(got).column("borough").to_pylist() == [MANY_LINES] * 30


def _last_row_end_reference(buf: bytes) -> int:
    odd, last = 0, -1
    for i, b in enumerate(buf):
        if b == ord('"'):
            odd ^= 1
        elif b == ord("\n") and not odd:
            last = i
    return last


def test_row_ends_match_a_reference_under_random_chunks_and_pieces() -> None:
    """Where `RowEnds` says the last row ends, the quick way or by placing every line break,
    under random pieces and values of up to 150 lines: as a reference parity count says."""
    rng = random.Random(7)
    for trial in range(300):
        rows = []
        for _ in range(rng.randint(1, 60)):
            cells = []
            for _ in range(rng.randint(1, 4)):
                kind = rng.random()
                if kind < 0.4:
                    cells.append("x" * rng.randint(0, 5))
                elif kind < 0.8:
                    lines = (
                        rng.choice([0, 1, 2, 70, 150]) if rng.random() < 0.3 else rng.randint(0, 3)
                    )
                    body = "\n".join("a" * rng.randint(0, 3) for _ in range(lines + 1))
                    body = body.replace("a", '""', rng.randint(0, 2))
                    cells.append(f'"{body}"')
                else:
                    cells.append("")
            rows.append(",".join(cells) + "\n")
        data = "".join(rows).encode()
        ends = RowEnds()
        buf = bytearray()
        piece = rng.choice([1, 2, 5, 17, 64, 300, 5000])
        i = 0
        while i < len(data):
            n = rng.randint(1, 40)
            buf += data[i : i + n]
            i += n
            if len(buf) >= piece:
                got = ends.scan(buf)
                want = _last_row_end_reference(bytes(buf))
                assert got == want, (trial, piece, bytes(buf)[:200])
                if got > 0:
                    buf = buf[got + 1 :]
                    ends.cut(got + 1)
        assert _last_row_end_reference(bytes(buf)) == len(buf) - 1 or not buf
