"""A short fuzz run of the page parsers on mutated real-looking pages (the fake server's own
crashes JSON and persons CSV), bounded by example count: no input crashes the process, the
paths that read one page (native converter and Arrow's reader for JSON, pass-through and parse
for CSV) land the same rows or refuse it alike, and every landed row has its `:id`.

Deterministic (`derandomize`) and with no deadline, so a slow shared machine only takes longer.
A crash (a signal inside native code) ends the test process: run a failing example in a process
of its own, or under the sanitizers (docs/native.md)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import httpx
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nyc_collisions import pages
from nyc_collisions.datasets import KNOWN
from nyc_collisions.errors import BadResponse, SchemaError
from nyc_collisions.pages import CsvPageStream, JsonRowsToCsv, PageStream, parse_page_plain
from nyc_collisions.schema import Schema, csv_text_options
from nyc_collisions.sink.formats import CsvEncoder
from nyc_collisions.socrata.soql import SELECT_ALL
from tests.fake_soda import FakeSoda

# A longer, random run: NYC_COLLISIONS_FUZZ_EXAMPLES=20000 (a failure prints its seed).
LONG = int(os.environ.get("NYC_COLLISIONS_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=LONG or 1000,
    deadline=None,
    derandomize=not LONG,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ROWS = 24

# Byte strings that matter to the parsers: JSON structure and values that are not objects,
# line breaks (where Arrow cuts its blocks), escapes, broken UTF-8, CSV quoting.
JSON_TOKENS = [
    b"null", b"\n,", b"\n,null", b"\n, null ", b"\n,7", b'\n,"x"', b"\n,[]", b"\r", b"\r\n,",
    b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\\u0000", b"\\ud800", b"\\n", b"\xff",
    b"\xc3", b"\xe9", b"7", b"-1.5e3", b"true", b" ", b"\n", b"\t", b"\x00", b'":id"',
    b'":id":null', b'":id":"r"', b'"location":{}', b'"latitude":"1"', b'"x":"y"', b'""',
    b'"borough":"Z",', b'"location":null,', b"}{", b"}\n,{", b"\n,{",
]  # fmt: skip
CSV_TOKENS = [
    b'"', b'""', b",", b"\n", b"\r\n", b"\r", b"1E5", b'"1E-7"', b"\xff", b"\xc3", b"\x00",
    b'"a\nb"', b',"",', b",,", b'"x"', b"null", b":id", b" ",
]  # fmt: skip
NOT_OBJECTS = [b"null", b" null", b"7", b'"x"', b"[1]", b"[]", b"true", b"{}"]


@dataclass(frozen=True)
class Page:
    body: bytes = field(repr=False)
    schema: Schema = field(repr=False)


def _fetch(srv: FakeSoda, dataset: str, fmt: str) -> Page:
    with httpx.Client(base_url=srv.url, trust_env=False) as client:
        meta = client.get(f"/api/views/{KNOWN[dataset].dataset_id}.json").json()
        params = {"$select": SELECT_ALL, "$order": ":id", "$limit": str(ROWS)}
        body = client.get(f"/resource/{KNOWN[dataset].dataset_id}.{fmt}", params=params).content
    return Page(body, Schema.from_metadata(KNOWN[dataset], meta))


@pytest.fixture(scope="module")
def crashes_json(soda_ro: FakeSoda) -> Page:
    return _fetch(soda_ro, "crashes", "json")


@pytest.fixture(scope="module")
def persons_csv(soda_ro: FakeSoda) -> Page:
    return _fetch(soda_ro, "persons", "csv")


def mutate(data: st.DataObject, body: bytes, tokens: list[bytes], row_end: bytes) -> bytes:
    """A few edits: tokens inserted or written over bytes, bytes dropped, rows dropped, doubled
    or (JSON) replaced by a value that is not an object."""
    out = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4), "edits")):
        at = data.draw(st.integers(0, len(out)), "at")
        way = data.draw(st.sampled_from(["insert", "over", "drop", "row"]), "way")
        token = data.draw(st.sampled_from(tokens), "token")
        if way == "insert":
            out[at:at] = token
        elif way == "over":
            out[at : at + len(token)] = token
        elif way == "drop":
            del out[at : at + data.draw(st.integers(1, 40), "span")]
        else:
            rows = bytes(out).split(row_end)
            i = data.draw(st.integers(0, len(rows) - 1), "row")
            change = data.draw(st.sampled_from(["drop", "double", "not_object"]), "change")
            if change == "drop":
                del rows[i]
            elif change == "double":
                rows.insert(i, rows[i])
            elif row_end == b"\n,":  # keeps the page's `[` and `\n]` around the row
                head = b"[" if rows[i][:1] == b"[" else b""
                tail = rows[i][rows[i].rfind(b"}") + 1 :] if b"]" in rows[i][-4:] else b""
                rows[i] = head + data.draw(st.sampled_from(NOT_OBJECTS), "value") + tail
            out = bytearray(row_end.join(rows))
    return bytes(out)


@contextmanager
def pieces_of(size: int) -> Iterator[None]:
    with (
        mock.patch.object(pages.stream, "PIECE_BYTES", size),
        mock.patch.object(pages.stream, "NATIVE_PIECE_BYTES", size),
    ):
        yield


Outcome = tuple[pa.Table, type[Exception] | None]


def land(
    body: bytes, schema: Schema, make: Callable[..., PageStream | CsvPageStream], rows: bool
) -> Outcome:
    """What a CSV file holds after the page went through the stream (read back as text), and the
    error the stream raised, if any (the rows landed before it are kept, as a run keeps them)."""
    out = io.BytesIO()
    encoder = CsvEncoder(out, schema)
    stream = make(schema, encoder.write, (lambda r: encoder.write_rows(r.data)) if rows else None)
    error: type[Exception] | None = None
    try:
        chunk = 1 + len(body) // 5
        for at in range(0, len(body), chunk):
            stream.feed(body[at : at + chunk])
        stream.finish()
    except (BadResponse, SchemaError) as exc:
        error = type(exc)
    encoder.close()
    options = csv_text_options(schema.names)
    table = pacsv.read_csv(io.BytesIO(out.getvalue()), convert_options=options)
    assert table.column("socrata_id").null_count == 0, "a landed row without its :id"
    return table, error


def table_csv(table: pa.Table, schema: Schema) -> bytes:
    out = io.BytesIO()
    encoder = CsvEncoder(out, schema)
    encoder.write(table)
    encoder.close()
    return out.getvalue().split(b"\n", 1)[1]


def reference(body: bytes, schema: Schema) -> pa.Table | type[Exception]:
    try:
        return parse_page_plain(body, schema)
    except (BadResponse, SchemaError) as exc:
        return type(exc)


@FUZZ
@given(data=st.data())
def test_mutated_json_pages(crashes_json: Page, data: st.DataObject) -> None:
    schema = crashes_json.schema
    body = mutate(data, crashes_json.body, JSON_TOKENS, b"\n,")
    want = reference(body, schema)
    # Arrow's path on the whole page: declined, or the reference's table
    fast = pages.parse_page_fast(body, schema)
    if fast is not None:
        assert isinstance(want, pa.Table), "Arrow's path took a page the reference refuses"
        assert fast.equals(want)
    # the native converter on the rows: declined, or the bytes the table path lands
    inner = body[body.find(b"[") + 1 : body.rfind(b"]")]
    conv = JsonRowsToCsv.for_schema(schema)
    assert conv is not None
    got = conv(inner)
    if got is not None:
        whole = reference(b"[" + inner + b"]", schema)
        assert isinstance(whole, pa.Table), "the native converter took rows the reference refuses"
        assert bytes(got.data) == table_csv(whole, schema)
    # the page streamed in pieces: converted natively or read by Arrow, the same rows land
    with pieces_of(data.draw(st.sampled_from([256, 2048, 1 << 20]), "piece")):
        native = land(body, schema, PageStream, rows=True)
        arrow = land(body, schema, PageStream, rows=False)
    assert native[1] == arrow[1]
    assert native[0].equals(arrow[0])
    if arrow[1] is None:
        assert isinstance(want, pa.Table)
        assert arrow[0].equals(want)


@FUZZ
@given(data=st.data())
def test_mutated_csv_pages(persons_csv: Page, data: st.DataObject) -> None:
    schema = persons_csv.schema
    body = mutate(data, persons_csv.body, CSV_TOKENS, b"\n")
    with pieces_of(data.draw(st.sampled_from([256, 2048, 1 << 20]), "piece")):
        passed = land(body, schema, CsvPageStream, rows=True)
        parsed = land(body, schema, CsvPageStream, rows=False)
    assert passed[1] == parsed[1]
    assert passed[0].equals(parsed[0])


@settings(FUZZ, max_examples=LONG or 400)
@given(
    value=st.sampled_from(NOT_OBJECTS[:-1]),
    at=st.integers(0, ROWS - 1),
    piece=st.integers(200, 6000),
)
def test_a_row_that_is_not_an_object_is_refused_on_every_path(
    crashes_json: Page, value: bytes, at: int, piece: int
) -> None:
    rows = crashes_json.body.rstrip()[1:-1].split(b"\n,")
    rows[at] = value
    body = b"[" + b"\n,".join(rows) + b"]"
    with pieces_of(piece):
        native = land(body, crashes_json.schema, PageStream, rows=True)
        arrow = land(body, crashes_json.schema, PageStream, rows=False)
    assert native[1] is arrow[1] is BadResponse
    assert native[0].num_rows == arrow[0].num_rows <= at
