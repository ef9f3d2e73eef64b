"""A hostile or broken source never takes the process down: a page row that is not an object
(`null`, a number, a string, an array), wherever it falls in a page or in a piece of one, is a
bad page (fetched again, then one clear line), and so is a CSV header Python cannot read;
metadata that names a field twice is refused. Arrow's JSON reader crashes the process on a
`null` row that starts its input (apache/arrow#47409), so the CLI runs here are processes of
their own: a crash shows as a signal, not as a dead test run."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from nyc_collisions import pages
from nyc_collisions.datasets import KNOWN
from nyc_collisions.errors import BadResponse, SchemaError
from nyc_collisions.pages import PageStream, parse_page
from nyc_collisions.schema import Schema
from nyc_collisions.sink.formats import CsvEncoder
from tests.fake_soda import FakeSoda
from tests.helpers import cli, exact

PIECE_START = {"after_rows": 1200, "pad": 2 << 20}
"""A bad row in the middle of the page, 2 MiB long: the client's 1 MiB piece is cut just
before it (it holds no row separator), so a piece starts with it."""


_PEAK = """
import atexit, runpy, sys
def peak():  # VmHWM: this program's own peak (ru_maxrss would count the forking test's too)
    with open("/proc/self/status") as status, open(PEAK, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM")))
PEAK = sys.argv[1]
atexit.register(peak)
sys.argv = ["nyc-collisions", *sys.argv[2:]]
runpy.run_module("nyc_collisions", run_name="__main__")
"""


def backfill(
    url: str, dest: str, *extra: str, dataset: str = "crashes", peak: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m nyc_collisions backfill DATASET` in a process of its own (writing its peak RSS
    in KiB to `peak`, when given)."""
    run = ("-c", _PEAK, str(peak)) if peak is not None else ("-m", "nyc_collisions")
    done = subprocess.run(
        [
            *(sys.executable, *run, "backfill", dataset, "--retries", "3"),
            *("--source", url, "--dest", dest, *extra),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "NYC_COLLISIONS_RETRY_BASE": "0.01"},
        timeout=180,
        check=False,
    )
    assert done.returncode >= 0, f"killed by signal {-done.returncode}: {done.stderr[-3000:]}"
    return done


def one_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("nyc-collisions: error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    ("text", "where", "fmt"),
    [
        ("null", {"after_rows": 0}, "csv"),
        ("null", {"after_rows": 0}, "parquet"),
        ("null", PIECE_START, "csv"),
        ("null", {}, "csv"),
        ("null", {"after_rows": -1}, "csv"),
        ("7", {"after_rows": 0}, "csv"),
        ('"x"', PIECE_START, "csv"),
        ("[1]", {"after_rows": -1}, "parquet"),
    ],
    ids=[
        "null_first_row",
        "null_first_row_parquet",
        "null_starts_a_piece",
        "null_mid_page",
        "null_last_row",
        "number_first_row",
        "string_starts_a_piece",
        "array_last_row_parquet",
    ],
)
def test_a_row_that_is_not_an_object_fails_the_run_with_one_line(
    text: str, where: dict[str, int], fmt: str, soda: FakeSoda, tmp_path: Path
) -> None:
    soda.add_fault("bad_row", times=None, match="$select=*", text=text, **where)
    dest = tmp_path / "land"
    done = backfill(soda.url, str(dest), "--format", fmt)
    assert done.returncode == 1, done.stderr
    # more than 3 where each attempt lands the pieces before the bad row: the fault is placed in
    # each response, not at one row, so each retry has rows to go on from
    attempts = soda.stats()["faults"]["bad_row"]
    assert attempts >= 3
    one_line(done.stderr, f"gave up after {attempts} attempts", "rows are not JSON objects")
    assert not list(dest.rglob("manifest.json"))


def test_a_csv_header_with_a_raw_line_break_fails_the_run_with_one_line(
    soda: FakeSoda, tmp_path: Path
) -> None:
    """Python's CSV reader raised its own error on it: a traceback, not one line."""
    soda.add_fault("bad_header", times=None, match="$select=*", text="\r")
    dest = tmp_path / "land"
    done = backfill(soda.url, str(dest), "--wire", "csv", dataset="persons")
    assert done.returncode == 1, done.stderr
    one_line(done.stderr, "gave up after 3 attempts", "CSV header")
    assert not list(dest.rglob("manifest.json"))


def test_a_null_row_that_starts_a_piece_once_lands_exactly_after_a_retry(
    soda: FakeSoda, dest: str, tmp_path: Path
) -> None:
    """Once the source answers well, the run goes on after the rows it already had."""
    soda.add_fault("bad_row", match="$select=*", **PIECE_START)
    done = backfill(soda.url, dest)
    assert done.returncode == 0, done.stderr
    assert soda.stats()["faults"]["bad_row"] == 1
    exact(soda, dest, "crashes", tmp_path)


def test_metadata_naming_a_field_twice_is_refused(soda: FakeSoda, tmp_path: Path) -> None:
    soda.add_fault("duplicate_field", times=None, field="borough")
    dest = tmp_path / "land"
    res = cli("backfill", "crashes", "--source", soda.url, "--dest", str(dest))
    assert res.code == 1, res.text
    one_line(res.err, "h9gi-nx95", "'borough'")
    assert not dest.exists() or not [p for p in dest.rglob("*") if p.is_file()]


def test_metadata_with_two_fields_landing_as_one_column_is_refused() -> None:
    meta = {"columns": [{"fieldName": "socrata_id", "dataTypeName": "text", "position": 1}]}
    meta["columns"].append({"fieldName": "collision_id", "dataTypeName": "number"})
    with pytest.raises(SchemaError, match="'socrata_id' and ':id'"):
        Schema.from_metadata(KNOWN["crashes"], meta)


# -- the same rows in process, each at an exact place in a page and in a piece ----------------

META = {
    "columns": [
        {"fieldName": "borough", "dataTypeName": "text", "position": 1},
        {"fieldName": "location", "dataTypeName": "location", "position": 2},
        {"fieldName": "collision_id", "dataTypeName": "number", "position": 3},
    ]
}
SCHEMA = Schema.from_metadata(KNOWN["crashes"], META)


def good_row(i: int) -> bytes:
    location = {"latitude": "40.5", "longitude": "-73.9", "human_address": '{"zip": ""}'}
    row = {"borough": "QUEENS", "location": location, "collision_id": str(i), ":id": f"row-{i:05d}"}
    return orjson.dumps(row)


def chunks(body: bytes, rows: list[bytes], bad: int, place: str) -> list[bytes]:
    """The page in two chunks, the first ending just inside row `bad` (the piece cut from it
    ends before that row, so the next piece starts with it) or just inside the row after it (a
    piece ends with it); or in one chunk."""
    start = 1 + sum(len(r) + 2 for r in rows[:bad])
    if place == "piece_start":
        cut = start + 1
    elif place == "piece_end":
        cut = start + len(rows[bad]) + 3
    else:
        cut = len(body)
    return [body[:cut], body[cut:]]


def stream(parts: list[bytes], native: bool) -> tuple[list[str], BadResponse | None]:
    """The `:id`s a `PageStream` hands on (landed as CSV), and the error it raised."""
    out = io.BytesIO()
    encoder = CsvEncoder(out, SCHEMA)
    page = PageStream(
        SCHEMA, encoder.write, (lambda rows: encoder.write_rows(rows.data)) if native else None
    )
    error = None
    try:
        for part in parts:
            page.feed(part)
        page.finish()
    except BadResponse as exc:
        error = exc
    encoder.close()
    convert = pacsv.ConvertOptions(column_types={"socrata_id": pa.string()})
    landed = pacsv.read_csv(io.BytesIO(out.getvalue()), convert_options=convert)
    return landed.column("socrata_id").to_pylist(), error


@pytest.mark.parametrize("native", [True, False], ids=["native", "arrow"])
@pytest.mark.parametrize("place", ["piece_start", "piece_end", "whole_page"])
@pytest.mark.parametrize("at", [0, 100, 199], ids=["first", "middle", "last"])
@pytest.mark.parametrize("value", [b"null", b" null ", b"7", b'"x"', b"[1]", b"[null]", b"true"])
def test_a_bad_row_anywhere_is_a_bad_page(
    value: bytes, at: int, place: str, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A piece is cut from the first chunk (the piece size is that chunk's length), so the bad
    row starts or ends a piece; the good rows before it are handed on, in order."""
    rows = [good_row(i) for i in range(200)]
    rows[at] = value
    body = b"[" + b"\n,".join(rows) + b"\n]\n"
    parts = chunks(body, rows, at, place)
    piece = len(parts[0]) - 1  # the stream keeps no `[`
    monkeypatch.setattr(pages.stream, "PIECE_BYTES", piece)
    monkeypatch.setattr(pages.stream, "NATIVE_PIECE_BYTES", piece)
    ids, error = stream(parts, native)
    assert error is not None
    assert "not JSON objects" in str(error)
    # the rows of the pieces before the bad one: all of them when it starts a piece or ends
    # the page, none when it ends the first piece (or the page is one piece and its tail)
    handed = at if place == "piece_start" or at == len(rows) - 1 else 0
    assert ids == [f"row-{i:05d}" for i in range(handed)]
    with pytest.raises(BadResponse, match="not JSON objects"):
        parse_page(body, SCHEMA)


def test_soda_layout_still_takes_arrows_path() -> None:
    """Only what Arrow's reader must not see is kept from it: SODA's own layout still reads
    there (a table, not None: the fast path), the rest goes to the reference parser."""
    rows = [good_row(i) for i in range(50)]
    assert pages.parse_page_fast(b"[" + b"\n,".join(rows) + b"\n]\n", SCHEMA) is not None
    for body in (b"[null]", b"[ null ]", b"[null\n,{}]", b'[{":id":"a"}\r,null]'):
        assert pages.parse_page_fast(body, SCHEMA) is None


@pytest.mark.parametrize(
    "body",
    [
        b'[{":id":"a"}{":id":"b"}\n]',
        b'[{":id":"a"} {":id":"b"}\n,{":id":"c"}\n]',
        b'[{":id":"a","location":\n,{"latitude":"1"}}\n]',
        b'[{":id":"a","location":{"latitude":"1"}\n,{"longitude":"2"}}\n]',
        b'[{":id":"a"}\n,\n,{":id":"b"}\n]',
    ],
    ids=["no_comma", "no_comma_then_rows", "row_broken_at_a_colon", "row_broken_at_a_brace", "two"],
)
def test_a_page_that_is_not_a_json_array_of_objects_is_not_read_by_arrow(body: bytes) -> None:
    """Arrow's reader takes line-delimited JSON, laxer than an array: it read `{..}{..}` as two
    rows, and a row broken by a `\n,` (blanked as a separator) as one; only the reference
    parser decides such a page (it refuses it)."""
    assert pages.parse_page_fast(body, SCHEMA) is None
    with pytest.raises(BadResponse, match="not complete JSON"):
        parse_page(body, SCHEMA)


@pytest.mark.parametrize("native", [True, False], ids=["native", "arrow"])
def test_a_page_ending_with_a_comma_is_refused_when_a_piece_was_cut_there(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[{..}\n,{..}\n,\n]`: the last piece is cut at the last `\n,`, which leaves nothing."""
    body = b"[" + b"\n,".join(good_row(i) for i in range(20)) + b"\n,\n]"
    monkeypatch.setattr(pages.stream, "PIECE_BYTES", len(body) - 4)
    monkeypatch.setattr(pages.stream, "NATIVE_PIECE_BYTES", len(body) - 4)
    ids, error = stream([body[:-2], body[-2:]], native)
    assert isinstance(error, BadResponse)
    assert "not complete JSON" in str(error)
    assert len(ids) == 20  # the rows are kept; the run goes on after them


def test_a_count_no_count_can_be_is_one_clear_line(soda: FakeSoda, tmp_path: Path) -> None:
    """A count past what files and records hold (or below zero) is a bad answer, not an
    unexpected failure where the plan is written."""
    body = orjson.dumps([{"n": "99999999999999999999999", "m": "2025-11-17T21:18:46.130Z"}])
    soda.add_fault("body", times=None, match="count(*)", status=200, body=body.decode())
    done = backfill(soda.url, str(tmp_path / "land"))
    assert done.returncode == 1, done.stderr
    one_line(done.stderr, "not a count")
    assert not (tmp_path / "land" / "crashes" / "manifest.json").exists()


def test_the_sources_message_cannot_drive_the_terminal(soda: FakeSoda, tmp_path: Path) -> None:
    """Escape sequences in what the source says (erase the line, retitle the window) reach
    the terminal as `?`."""
    message = "\x1b[2K\x1b[1Gnyc-collisions: all done\x1b]0;owned\x07"
    body = orjson.dumps({"code": "query.compiler.malformed", "message": message}).decode()
    soda.add_fault("body", times=None, match="/api/views/", status=400, body=body)
    done = backfill(soda.url, str(tmp_path / "land"))
    assert done.returncode == 1, done.stderr
    one_line(done.stderr, "query.compiler.malformed", "?[2K")
    assert "\x1b" not in done.stderr
    assert "\x07" not in done.stderr


def _gzip(*parts: bytes, repeat: int = 1) -> bytes:
    """`parts[0]`, `parts[1]` `repeat` times, then the rest, gzipped."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    head, middle, *tail = parts
    out = [z.compress(head), *(z.compress(middle) for _ in range(repeat))]
    return b"".join([*out, *(z.compress(t) for t in tail), z.flush()])


class _Front(BaseHTTPRequestHandler):
    """Answers requests whose path holds `match` with `body` (gzip), and sends the others on
    to `upstream`."""

    upstream = ""
    match = ""
    body = b""

    def do_GET(self) -> None:
        if self.match in self.path:
            status, body, headers = 200, self.body, {"Content-Encoding": "gzip"}
        else:
            got = httpx.get(self.upstream + self.path)
            status, body, headers = got.status_code, got.content, {}
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _front(upstream: str, match: str, body: bytes) -> Iterator[str]:
    handler = type("Front", (_Front,), {"upstream": upstream, "match": match, "body": body})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("match", "body", "said"),
    [
        # 1 MiB of gzip that inflates to 768 MiB, as the metadata
        ("/api/views/", _gzip(b"", b" " * (1 << 20), b"{}", repeat=768), "MiB"),
        # a page whose one value is 256 MiB long: no row's end to cut a piece at
        (
            "%24order",
            _gzip(b'[{":id":"row-a","borough":"', b"A" * (1 << 20), b'"}]', repeat=256),
            "without a row's end",
        ),
    ],
    ids=["metadata_gzip_bomb", "page_without_row_ends"],
)
def test_an_answer_that_would_not_fit_in_memory_is_refused_in_bounded_memory(
    soda: FakeSoda, tmp_path: Path, match: str, body: bytes, said: str
) -> None:
    with _front(soda.url, match, body) as url:
        peak = tmp_path / "peak.txt"
        done = backfill(url, str(tmp_path / "land"), "--wire", "json", peak=peak)
    assert done.returncode == 1, done.stderr
    one_line(done.stderr, said)
    assert int(peak.read_text()) < 400 << 10, f"peak RSS {peak.read_text()} KiB"


@pytest.mark.parametrize("native", [True, False], ids=["native", "arrow"])
def test_a_page_in_another_layout_past_the_bound_is_read_while_its_rows_end(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compact JSON (`[{..},{..}]`, no line breaks: nothing to cut pieces at) is kept whole to
    its end and read, however long, as long as rows end in it; a value longer than the bound
    (no `}` in it) is refused. The bound is made small here, as the run above shows it whole."""
    monkeypatch.setattr(pages.stream, "MAX_UNCUT_BYTES", 64 << 10)
    rows = [good_row(i) for i in range(40_000)]  # past the size a piece is cut at, too
    body = b"[" + b",".join(rows) + b"]"
    assert len(body) > pages.stream.PIECE_BYTES
    parts = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    ids, error = stream(parts, native)
    assert error is None
    assert ids == [f"row-{i:05d}" for i in range(40_000)]
    value = b'[{":id":"row-a","borough":"' + b"A" * (5 << 20) + b'"}]'
    ids, error = stream([value[i : i + 65536] for i in range(0, len(value), 65536)], native)
    assert ids == []
    assert error is not None
    assert "without a row's end" in str(error)
