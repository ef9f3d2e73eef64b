"""The native JSON -> CSV converter (`_jsoncsv.c`, `pages.JsonRowsToCsv`) against the table
path it stands in for: the same landed bytes for the rows it takes, and a decline (the table
path then decides, and raises the errors) for everything else."""

from __future__ import annotations

import io
import random

import numpy as np
import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nyc_collisions import pages
from nyc_collisions.datasets import KNOWN
from nyc_collisions.errors import BadResponse, SchemaError
from nyc_collisions.pages import (
    CsvRows,
    JsonRowsToCsv,
    PageStream,
    parse_page_plain,
    parse_rows_fast,
)
from nyc_collisions.schema import Schema
from nyc_collisions.sink.formats import CsvEncoder

META = {
    "columns": [
        {"fieldName": "crash_date", "dataTypeName": "floating_timestamp", "position": 1},
        {"fieldName": "borough", "dataTypeName": "text", "position": 2},
        {"fieldName": "location", "dataTypeName": "location", "position": 3},
        {"fieldName": "collision_id", "dataTypeName": "number", "position": 4},
        {"fieldName": "on_street_name", "dataTypeName": "text", "position": 5},
    ]
}
TEXT_FIELDS = ("crash_date", "borough", "collision_id", "on_street_name")
MEMBERS = ("human_address", "latitude", "longitude")


def schema() -> Schema:
    return Schema.from_metadata(KNOWN["crashes"], META)


def converter() -> JsonRowsToCsv:
    conv = JsonRowsToCsv.for_schema(schema())
    assert conv is not None
    return conv


def test_the_native_converter_is_built() -> None:
    """Installed from source with a C compiler (as CI is), the module is there; without one
    the package still installs and every page takes the table path."""
    from nyc_collisions import _jsoncsv

    assert pages.native._jsoncsv is _jsoncsv


def test_only_schemas_of_strings_and_locations_are_converted() -> None:
    assert JsonRowsToCsv.for_schema(schema()) is not None
    meta = {"columns": [*META["columns"], {"fieldName": "flag", "dataTypeName": "checkbox"}]}
    assert JsonRowsToCsv.for_schema(Schema.from_metadata(KNOWN["crashes"], meta)) is None


def table_csv(table: pa.Table) -> bytes:
    """The landed CSV rows of a text table (the encoder's header line dropped)."""
    out = io.BytesIO()
    encoder = CsvEncoder(out, schema())
    encoder.write(table)
    encoder.close()
    return out.getvalue().split(b"\n", 1)[1]


def json_string(text: str, rnd: random.Random) -> bytes:
    """`text` as a JSON string literal, each character written one of the ways JSON allows."""
    out = ['"']
    short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r"}
    short["\t"] = "\\t"
    for ch in text:
        code = ord(ch)
        way = rnd.random()
        if ch in short and way < 0.6:
            out.append(short[ch])
        elif ch == "/" and way < 0.5:
            out.append("\\/")
        elif code < 0x20 or ch in short or way < 0.15:
            if code > 0xFFFF:
                code -= 0x10000
                high, low = 0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)
                out.append(f"\\u{high:04x}\\u{low:04X}")
            else:
                out.append(f"\\u{code:04x}" if way < 0.1 else f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out).encode()


def json_row(row: dict[str, object], rnd: random.Random) -> bytes:
    """One row as SODA would write it, but with the keys in any order, optional whitespace and
    every value escaped in any of JSON's ways (keys stay plain, as SODA writes them; an escaped
    key is declined)."""
    items = list(row.items())
    rnd.shuffle(items)
    ws = (lambda: rnd.choice(["", "", " ", "\n", "\t "])) if rnd.random() < 0.3 else (lambda: "")
    parts = []
    for key, value in items:
        if value is None:
            text = b"null"
        elif isinstance(value, dict):
            members = list(value.items())
            rnd.shuffle(members)
            inner = b",".join(
                b'"' + m.encode() + b'"' + f"{ws()}:{ws()}".encode() + json_string(str(v), rnd)
                for m, v in members
            )
            text = b"{" + ws().encode() + inner + ws().encode() + b"}"
        elif key in (":id", ":updated_at"):  # plain as SODA writes them (escaped: declined)
            text = b'"' + str(value).encode() + b'"'
        else:
            text = json_string(str(value), rnd)
        parts.append(b'"' + key.encode() + b'"' + f"{ws()}:{ws()}".encode() + text)
    return b"{" + ws().encode() + f"{ws()},{ws()}".encode().join(parts) + ws().encode() + b"}"


_text = st.one_of(
    st.text(max_size=10),
    st.sampled_from(['O\'BRIEN "X", ST', "a\\b", "\u00e9\u4e2d\U0001f600", "x\ny", "/", ""]),
)
_value = st.one_of(st.none(), _text)
_location = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(MEMBERS), _text, max_size=3),
    st.just({"human_address": '{"address": "", "city": "", "state": "", "zip": ""}'}),
)


@st.composite
def _rows(draw: st.DrawFn) -> dict[str, object]:
    row: dict[str, object] = {f: draw(_value) for f in TEXT_FIELDS}
    row = {k: v for k, v in row.items() if v is not None or draw(st.booleans())}  # null or absent
    location = draw(_location)
    if location is not None or draw(st.booleans()):
        row["location"] = location
    plain = st.characters(min_codepoint=0x20, exclude_characters='"\\', exclude_categories=("Cs",))
    row[":id"] = draw(st.text(plain, min_size=1, max_size=8))
    row[":created_at"] = "2021-02-23T16:03:14.703Z"
    # any plain text, non-ASCII too: the latest is the greatest as Python orders strings
    updated = draw(st.one_of(st.none(), st.text(plain, max_size=6)))
    if updated is not None or draw(st.booleans()):
        row[":updated_at"] = updated
    if draw(st.booleans()):
        row[":version"] = "rv-" + draw(st.text(max_size=3))
    if draw(st.booleans()):
        row[":@computed_region_x"] = draw(_value)
    return row


@settings(max_examples=300, deadline=None)
@given(st.lists(_rows(), max_size=25), st.integers(0, 2**32), st.booleans())
def test_converted_rows_are_the_bytes_the_table_path_lands(
    rows: list[dict[str, object]], seed: int, one_per_line: bool
) -> None:
    rnd = random.Random(seed)
    inner = (b"\n," if one_per_line else b",").join(json_row(r, rnd) for r in rows)
    got = converter()(inner)
    want = parse_page_plain(b"[" + inner + b"]", schema())
    control = any(
        isinstance(r.get("location"), dict)
        and any(ord(c) < 32 for v in r["location"].values() for c in v)  # type: ignore[union-attr]
        for r in rows
    )
    if control:  # control characters in a location member: orjson escapes those
        assert got is None or bytes(got.data) == table_csv(want)
        return
    assert got is not None
    assert bytes(got.data) == table_csv(want)
    assert got.num_rows == len(rows)
    if rows:
        assert got.last_id == rows[-1][":id"]
    times = [str(r[":updated_at"]) for r in rows if r.get(":updated_at") is not None]
    assert got.latest == max(times, default="")


GOOD = (
    b'{"borough":"QUEENS","location":{"latitude":"40.5","longitude":"-73.9",'
    b'"human_address":"{\\"address\\": \\"\\"}"},":id":"row-1"}\n,'
    b'{"collision_id":"8",":id":"row-2"}'
)


def test_a_good_piece_is_converted() -> None:
    got = converter()(GOOD)
    assert got is not None
    assert bytes(got.data) == (
        b',"QUEENS","{""human_address"":""{\\""address\\"": \\""\\""}"",""latitude"":""40.5"",'
        b'""longitude"":""-73.9""}",,,"row-1",,\n,,,"8",,"row-2",,\n'
    )
    assert bytes(got.data) == table_csv(parse_page_plain(b"[" + GOOD + b"]", schema()))
    assert (got.num_rows, got.last_id) == (2, "row-2")
    empty = converter()(b" \n ")
    assert empty is not None
    assert (bytes(empty.data), empty.num_rows) == (b"", 0)


@pytest.mark.parametrize(
    "inner",
    [
        b'{"borough":7,":id":"r"}',
        b'{"borough":true,":id":"r"}',
        b'{"borough":["a"],":id":"r"}',
        b'{"borough":{"a":"b"},":id":"r"}',
        b'{"location":"40.5, -73.9",":id":"r"}',
        b'{"location":{"latitude":"1","zip":"2"},":id":"r"}',
        b'{"location":{"latitude":null},":id":"r"}',
        b'{"location":{"latitude":"1","latitude":"2"},":id":"r"}',
        b'{"location":{"latitude":"\\n"},":id":"r"}',
        b'{"unknown":"x",":id":"r"}',
        b'{"borough":"a","borough":"b",":id":"r"}',
        b'{"borough":"a"}',
        b'{"borough":"a",":id":null}',
        b'{"borough":"a",":id":"r\\u0041"}',
        b'{":id":"r"},',
        b'{":id":"r"},,{":id":"s"}',
        b'{":id":"r"}{":id":"s"}',
        b'{":id":"r"} x',
        b'[{":id":"r"}]',
        b'{"borough":"\xff",":id":"r"}',
        b'{"borough":"\xc3",":id":"r"}',
        b'{"borough":"\xed\xa0\x80",":id":"r"}',
        b'{"borough":"\\ud800",":id":"r"}',
        b'{"borough":"\\udc00\\ud800",":id":"r"}',
        b'{"borough":"\\x41",":id":"r"}',
        b'{"borough":"\\u00g1",":id":"r"}',
        b'{"borough":"a\tb",":id":"r"}',
        b'{"borough":"a\nb",":id":"r"}',
        b'{"borough" "a",":id":"r"}',
        b'{"borough":nul,":id":"r"}',
        b'{"bor\\u006fugh":"a",":id":"r"}',
        b'{":updated_at":"2021\\u002d02",":id":"r"}',
    ],
)
def test_what_the_table_path_must_decide_is_declined(inner: bytes) -> None:
    assert converter()(inner) is None


def test_a_piece_cut_anywhere_is_declined() -> None:
    """A piece ends at a row's end; cut anywhere inside its last row it is not taken."""
    last = GOOD.rfind(b"\n,") + 2
    for cut in range(last, len(GOOD) - 1):
        got = converter()(GOOD[:cut])
        assert got is None or cut == last, cut


def landed(body: bytes, native: bool, chunk: int) -> tuple[bytes, int]:
    """What a CSV file holds after a JSON page went through a `PageStream`, and the rows it
    says the page held; rows converted natively count against `native`."""
    out = io.BytesIO()
    encoder = CsvEncoder(out, schema())

    def emit_rows(rows: CsvRows) -> None:
        assert native
        encoder.write_rows(rows.data)

    stream = PageStream(schema(), encoder.write, emit_rows if native else None)
    for i in range(0, len(body), chunk):
        stream.feed(body[i : i + chunk])
    n = stream.finish()
    encoder.close()
    return out.getvalue(), n


@pytest.mark.parametrize("chunk", [1, 13, 100_000])
def test_a_page_lands_the_same_bytes_converted_or_not(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces of a page are converted as they arrive; one the converter declines (a number
    value in the middle) takes the table path in its place among the others."""
    monkeypatch.setattr(pages.stream, "PIECE_BYTES", 300)
    monkeypatch.setattr(pages.stream, "NATIVE_PIECE_BYTES", 300)
    rows = [
        orjson.dumps({"borough": f'B "{i}"', "collision_id": str(i), ":id": f"row-{i:04d}"})
        for i in range(60)
    ]
    rows[31] = b'{"borough":"QUEENS","collision_id":31,":id":"row-0031"}'
    body = b"[" + b"\n,".join(rows) + b"\n]\n"
    converted: list[int] = []
    original = JsonRowsToCsv.__call__

    def counting(self: JsonRowsToCsv, piece: memoryview | bytes) -> CsvRows | None:
        got = original(self, piece)
        converted.append(got.num_rows if got is not None else -1)
        return got

    monkeypatch.setattr(JsonRowsToCsv, "__call__", counting)
    assert landed(body, True, chunk) == landed(body, False, chunk)
    assert -1 in converted
    assert sum(n for n in converted if n > 0) > (40 if chunk < 300 else 0)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b'[{"borough":"a",":id":"r"}\n,{"borough":"b"}\n]', BadResponse),
        (b'[{"borough":"a",":id":"r"}\n,{"weather":"b",":id":"s"}\n]', SchemaError),
        (b'[{"borough":"\xff",":id":"r"}\n]', BadResponse),
    ],
)
def test_errors_are_the_table_paths(body: bytes, error: type[Exception]) -> None:
    for native in (True, False):
        with pytest.raises(error):
            landed(body, native, 7)


def test_mutated_pieces_are_declined_or_converted_exactly() -> None:
    """Thousands of pieces with bytes changed, added or removed: each is declined, or lands
    exactly what the reference parser makes of it (which never refuses one it took)."""
    rnd = random.Random(7)
    alphabet = b'{}[]",:\\/u0aA\n \xff\xc3\xa9nul'
    conv = converter()
    accepted = 0
    for _ in range(3000):
        piece = bytearray(GOOD)
        for _ in range(rnd.randint(1, 4)):
            at = rnd.randrange(len(piece))
            way = rnd.random()
            if way < 0.4:
                piece[at] = rnd.choice(alphabet)
            elif way < 0.7:
                piece.insert(at, rnd.choice(alphabet))
            else:
                del piece[at]
        got = conv(bytes(piece))
        if got is None:
            continue
        accepted += 1
        want = parse_page_plain(b"[" + piece + b"]", schema())
        assert bytes(got.data) == table_csv(want), bytes(piece)
    assert accepted > 100


def test_a_null_location_member_lands_the_same_by_either_parser() -> None:
    """`json_pages` says its two parsers give the same table (and `test_fuzz_pages` asserts
    `fast.equals(want)` whenever Arrow's path takes a page). A location member sent as JSON
    null is dropped by Arrow's path (`{}`) but kept by the reference (`{"latitude":null}`), so
    the same row lands differently depending on which parser its page or piece happened to
    take (a single number elsewhere in the piece sends it to the reference)."""
    body = b'[{"location":{"latitude":null,"longitude":"-73.9"},":id":"row-1"}\n]'
    fast = parse_rows_fast(np.frombuffer(body[1:-1], np.uint8).copy(), schema())
    plain = parse_page_plain(body, schema())
    assert fast is not None  # Arrow's path takes it (the native converter declines it)
    assert fast.column("location").to_pylist() == plain.column("location").to_pylist()
