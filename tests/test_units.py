"""Pure pieces, without HTTP: SoQL builders, partition plans, page parsing, retry policy."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nyc_collisions.datasets import KNOWN, resolve, resolve_many
from nyc_collisions.errors import BadResponse, SchemaError, UsageError
from nyc_collisions.pages import parse_page, parse_page_fast, parse_page_plain
from nyc_collisions.plan import SnapshotPlan, partition_count, partition_step
from nyc_collisions.schema import Schema
from nyc_collisions.socrata import soql
from nyc_collisions.socrata.client import (
    RetryPolicy,
    SodaClient,
    error_message,
    validate_base_url,
)

META = {
    "columns": [
        {"fieldName": "collision_id", "dataTypeName": "number", "position": 2},
        {"fieldName": "borough", "dataTypeName": "text", "position": 1},
        {"fieldName": "location", "dataTypeName": "location", "position": 3},
        {"fieldName": ":@computed_region_x", "dataTypeName": "number", "position": 4},
    ]
}


def schema() -> Schema:
    return Schema.from_metadata(KNOWN["crashes"], META)


def test_quote_doubles_single_quotes() -> None:
    assert soql.quote("O'BRIEN") == "'O''BRIEN'"


@pytest.mark.parametrize(
    ("after", "upper", "where"),
    [
        (None, None, None),
        ("row-a", None, ":id > 'row-a'"),
        (None, "row-z", ":id <= 'row-z'"),
        ("row-a", "row-z", ":id > 'row-a' AND :id <= 'row-z'"),
    ],
    ids=["whole", "after", "upper", "range"],
)
def test_page_params_keyset(after: str | None, upper: str | None, where: str | None) -> None:
    params = soql.page_params(after=after, upper=upper, limit=5000)
    assert params["$select"] == "*,:id,:created_at,:updated_at"
    assert params["$order"] == ":id"
    assert params["$limit"] == "5000"
    assert params.get("$where") == where
    assert "$offset" not in params


def test_page_params_with_user_where_keeps_precedence() -> None:
    params = soql.page_params(after="r1", upper=None, limit=10, where="a = 1 OR b = 2")
    assert params["$where"] == "(a = 1 OR b = 2) AND (:id > 'r1')"


def test_incremental_params() -> None:
    p = soql.incremental_params(updated_at="2024-01-01T00:00:00.000Z", row_id="row-x", limit=7)
    assert p["$order"] == ":updated_at,:id"
    assert p["$where"] == (
        ":updated_at > '2024-01-01T00:00:00.000Z' OR "
        "(:updated_at = '2024-01-01T00:00:00.000Z' AND :id > 'row-x')"
    )
    p = soql.incremental_params(updated_at="T", row_id=None, limit=7, until="U")
    assert p["$where"] == "(:updated_at > 'T') AND (:updated_at <= 'U')"


def test_count_and_probe_params() -> None:
    assert soql.count_params() == {"$select": "count(*) AS n"}
    assert soql.boundary_params("row-b", 99) == {
        "$select": ":id",
        "$order": ":id",
        "$limit": "1",
        "$offset": "99",
        "$where": ":id > 'row-b'",
    }
    assert soql.keys_params(key="unique_id", after=None, limit=3)["$select"] == ":id,unique_id"


@pytest.mark.parametrize(
    ("rows", "workers", "page", "expected"),
    [(0, 4, 100, 1), (150, 4, 100, 1), (1000, 4, 100, 4), (1000, 16, 100, 10), (10, 1, 1, 1)],
)
def test_partition_count(rows: int, workers: int, page: int, expected: int) -> None:
    assert partition_count(rows, workers, page) == expected


def test_partition_step_covers_rows() -> None:
    assert partition_step(10, 3) == 4
    assert partition_step(0, 1) == 1


def test_a_plan_from_before_rows_were_kept_resumes_with_a_step_per_partition() -> None:
    doc = {
        "kind": "snapshot",
        "batch_id": "b",
        "dataset_id": "h9gi-nx95",
        "key": "collision_id",
        "format": "csv",
        "columns": [["collision_id", "number"]],
        "started": "2026-01-01T00:00:00Z",
        "source_count": 300,
        "page_size": 100,
        "planned": 3,
        "step": 100,
        "complete": False,
        "partitions": [{"index": 0, "lower": None, "upper": "row-a"}],
        "chain": {"after": "row-a", "made": 1},
    }
    plan = SnapshotPlan.from_dict(doc, "plan.json")
    assert [p.rows for p in plan.partitions] == [100]
    assert SnapshotPlan.from_dict(plan.to_dict(), "plan.json") == plan


def test_schema_from_metadata_orders_and_skips_computed_regions() -> None:
    s = schema()
    assert s.names == [
        "borough",
        "collision_id",
        "location",
        "socrata_id",
        "socrata_created_at",
        "socrata_updated_at",
    ]


def test_schema_rejects_missing_key() -> None:
    with pytest.raises(SchemaError, match="key"):
        Schema.from_metadata(KNOWN["persons"], META)


def test_parse_page_text_values() -> None:
    body = (
        b'[{"borough":"QUEENS","collision_id":"7","location":{"latitude":"40.5",'
        b'"longitude":"-73.9","human_address":"{\\"a\\": \\"\\"}"},":id":"row-1",'
        b'":created_at":"2021-02-23T16:03:14.703Z",":updated_at":"2021-02-23T16:03:14.703Z",'
        b'":version":"rv-1"}\n,{"collision_id":"8",":id":"row-2"}\n]'
    )
    table = parse_page(body, schema())
    rows = table.to_pylist()
    assert rows[0]["location"] == (
        '{"human_address":"{\\"a\\": \\"\\"}","latitude":"40.5","longitude":"-73.9"}'
    )
    assert rows[1] == {
        "borough": None,
        "collision_id": "8",
        "location": None,
        "socrata_id": "row-2",
        "socrata_created_at": None,
        "socrata_updated_at": None,
    }


def test_parse_page_typed_roundtrip() -> None:
    body = (
        b'[{"collision_id":"7",":id":"r",":updated_at":"2021-02-23T16:03:14.703Z",'
        b'":created_at":"2020-01-01T00:00:00.000Z"}]'
    )
    s = schema()
    typed = s.to_typed(parse_page(body, s))
    assert typed.column("collision_id").to_pylist() == [7]
    assert s.to_text(typed).to_pylist() == parse_page(body, s).to_pylist()


@pytest.mark.parametrize(
    "body",
    [
        b'[{"collision_id":"7",":id":"r"}\n,{"collision_id":"8"',
        b"",
        b'{"a":1}',
        b"[1,2]",
        b'[{"borough":"\xff",":id":"r"}\n]',
    ],
    ids=["cut_short", "empty", "object", "not_rows", "not_utf8"],
)
def test_parse_page_rejects_incomplete_bodies(body: bytes) -> None:
    with pytest.raises(BadResponse):
        parse_page(body, schema())


def test_parse_page_rejects_unknown_fields() -> None:
    with pytest.raises(SchemaError, match="surprise"):
        parse_page(b'[{"collision_id":"7",":id":"r","surprise":"x"}]', schema())


def test_parse_page_requires_id() -> None:
    with pytest.raises(BadResponse, match=":id"):
        parse_page(b'[{"collision_id":"7"}]', schema())


def test_number_that_does_not_fit_fails_clearly() -> None:
    s = schema()
    table = parse_page(b'[{"collision_id":"7.5",":id":"r"}]', s)
    with pytest.raises(SchemaError, match="collision_id"):
        s.to_typed(table)


def test_error_message_reads_both_shapes() -> None:
    a = b'{"code":"query.compiler.malformed","error":true,"message":"bad $where"}'
    b = (
        b'{"message":"Query coordinator error: query.soql.no-such-column; No such column: x",'
        b'"errorCode":"query.soql.no-such-column","data":{}}'
    )
    assert error_message(a) == "query.compiler.malformed: bad $where"
    assert "No such column: x" in error_message(b)
    assert error_message(b"<html>oops</html>") == "<html>oops</html>"


def test_retry_policy_honours_retry_after_and_caps() -> None:
    policy = RetryPolicy(base=1, cap=8)
    assert policy.delay(1, 2.5) == 2.5
    assert policy.delay(3, 1000) == policy.max_retry_after
    # the server's value never makes the wait shorter than half the backoff
    assert policy.delay(3, 0) == policy.delay(3, 1) == 4
    assert all(0 <= policy.delay(10, None) <= 8 for _ in range(100))


@pytest.mark.parametrize("url", ["ftp://x", "data.cityofnewyork.us", "http://", "https://h/?q=1"])
def test_bad_source_urls(url: str) -> None:
    with pytest.raises(UsageError):
        validate_base_url(url)


def test_resolve_datasets() -> None:
    assert resolve("crashes").dataset_id == "h9gi-nx95"
    assert resolve("f55k-p6yu").name == "persons"
    assert resolve("abcd-1234").key == ":id"
    assert resolve("abcd-1234", key="row_key").key == "row_key"
    assert [d.name for d in resolve_many([])] == ["crashes", "persons", "vehicles"]
    with pytest.raises(UsageError):
        resolve("collisions")


_text_values = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.sampled_from(['O\'BRIEN "X", ST', "a\\b", "\u00e9\u4e2d", "x\ny"]),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "borough": _text_values,
                "collision_id": st.integers(0, 10**9).map(str),
                "location": st.one_of(
                    st.none(),
                    st.fixed_dictionaries(
                        {
                            "latitude": _text_values,
                            "longitude": _text_values,
                            "human_address": _text_values,
                        }
                    ),
                ),
                ":id": st.text(min_size=1, max_size=8),
            }
        ),
        max_size=30,
    ),
    st.booleans(),
)
def test_fast_and_plain_parsers_agree(rows: list[dict[str, object]], one_per_line: bool) -> None:
    """The Arrow fast path gives exactly the reference parser's table, or steps aside."""
    clean = [
        {
            k: ({m: x for m, x in v.items() if x is not None} if isinstance(v, dict) else v)
            for k, v in r.items()
            if v is not None
        }
        for r in rows
    ]
    parts = [orjson.dumps(r) for r in clean]
    body = b"[" + (b"\n," if one_per_line else b",").join(parts) + (b"\n]" if parts else b"]")
    plain = parse_page_plain(body, schema())
    fast = parse_page_fast(body, schema())
    if fast is not None:
        assert fast.equals(plain)
    if one_per_line and not any(_control_chars(r.get("location")) for r in rows):
        assert fast is not None or not rows


def _control_chars(value: object) -> bool:
    """Control characters in a location member: the fast path leaves those to orjson."""
    if isinstance(value, dict):
        return any(_control_chars(v) for v in value.values())
    return isinstance(value, str) and any(ord(c) < 32 for c in value)


def _crash_body(n: int) -> bytes:
    rows = [
        {"collision_id": str(i), "borough": "QUEENS" if i % 2 else None, ":id": f"row-{i:05d}"}
        for i in range(n)
    ]
    return (
        b"[" + b"\n,".join(orjson.dumps({k: v for k, v in r.items() if v}) for r in rows) + b"\n]"
    )


@pytest.mark.parametrize("chunk", [1, 7, 100, 10_000])
def test_page_stream_parses_pieces_as_they_arrive(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nyc_collisions.pages as pages

    monkeypatch.setattr(pages.stream, "PIECE_BYTES", 200)
    body = _crash_body(50)
    got: list[pa.Table] = []
    stream = pages.PageStream(schema(), got.append)
    for i in range(0, len(body), chunk):
        stream.feed(body[i : i + chunk])
    assert stream.finish() == 50
    assert len(got) > 1
    assert pa.concat_tables(got).equals(parse_page(body, schema()))


def test_page_stream_keeps_rows_before_a_cut_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import nyc_collisions.pages as pages

    monkeypatch.setattr(pages.stream, "PIECE_BYTES", 100)
    body = _crash_body(30)
    got: list[pa.Table] = []
    stream = pages.PageStream(schema(), got.append)
    stream.feed(body[: len(body) // 2])
    with pytest.raises(BadResponse, match="cut short"):
        stream.finish()
    ids = [r["socrata_id"] for t in got for r in t.to_pylist()]
    assert ids == [f"row-{i:05d}" for i in range(len(ids))]
    assert 0 < len(ids) < 30


@pytest.mark.parametrize("body", [b"<html><body>busy</body></html>", b'{"a": 1}', b"   "])
def test_page_stream_rejects_what_is_not_a_page(body: bytes) -> None:
    from nyc_collisions.pages import PageStream

    def read_all() -> None:
        stream = PageStream(schema(), lambda t: None)
        stream.feed(body)
        stream.finish()

    with pytest.raises(BadResponse):
        read_all()


# ----------------------------------------------------------------------------------------------
# CSV pages (`--wire csv`): the same table as the JSON of the same rows


CSV_META = {
    "columns": [
        {"fieldName": "unique_id", "dataTypeName": "number", "position": 1},
        {"fieldName": "collision_id", "dataTypeName": "number", "position": 2},
        {"fieldName": "crash_date", "dataTypeName": "calendar_date", "position": 3},
        {"fieldName": "person_type", "dataTypeName": "text", "position": 4},
    ]
}


def csv_schema() -> Schema:
    return Schema.from_metadata(KNOWN["persons"], CSV_META)


def _csv_cell(value: str | None, number: bool = False) -> str:
    """As Socrata's CsvExporter: null empty, every value quoted, numbers by BigDecimal.toString."""
    if value is None:
        return ""
    if number:
        value = str(Decimal(value))
    return '"' + value.replace('"', '""') + '"'


def _csv_body(rows: list[dict[str, str | None]], order: list[str]) -> bytes:
    numbers = {"unique_id", "collision_id"}
    lines = [",".join(f'"{f}"' for f in order)]
    lines += [",".join(_csv_cell(r.get(f), f in numbers) for f in order) for r in rows]
    return ("\n".join(lines) + "\n").encode()


def _plain_decimals() -> st.SearchStrategy[str]:
    """Numbers as SODA's JSON writes them (plain), some that Java's toString writes with E."""
    return st.one_of(
        st.integers(-(10**12), 10**12).map(str),
        st.decimals(allow_nan=False, allow_infinity=False, places=9).map(lambda d: format(d, "f")),
        st.sampled_from(["0.0000001", "-0.00000010", "0.000001", "0"]),
    )


_csv_rows = st.lists(
    st.fixed_dictionaries(
        {
            "unique_id": _plain_decimals(),
            "collision_id": st.one_of(st.none(), _plain_decimals()),
            "crash_date": st.one_of(st.none(), st.just("2022-07-03T00:00:00.000")),
            "person_type": _text_values,
            ":id": st.integers(0, 10**6).map(lambda i: f"row-{i:07d}"),
            ":created_at": st.just("2021-02-23T16:03:14.703Z"),
            ":updated_at": st.just("2021-02-23T16:03:14.703Z"),
        }
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(_csv_rows, st.randoms(use_true_random=False), st.integers(1, 300), st.integers(40, 400))
def test_csv_page_equals_json_page(
    rows: list[dict[str, str | None]], rnd: Any, chunk: int, piece: int
) -> None:
    """Socrata's CSV of some rows parses to the table the reference parser makes of their JSON,
    whatever the header order, the chunking of the body and the size of the pieces."""
    import nyc_collisions.pages as pages

    order = csv_schema().field_names
    rnd.shuffle(order)
    body = _csv_body(rows, order)
    json_body = orjson.dumps([{k: v for k, v in r.items() if v is not None} for r in rows])
    old, pages.stream.PIECE_BYTES = pages.stream.PIECE_BYTES, piece
    try:
        got: list[pa.Table] = []
        stream = pages.CsvPageStream(csv_schema(), got.append)
        for i in range(0, len(body), chunk):
            stream.feed(body[i : i + chunk])
        assert stream.finish() == len(rows)
    finally:
        pages.stream.PIECE_BYTES = old
    want = parse_page_plain(json_body, csv_schema())
    table = pa.concat_tables(got) if got else csv_schema().text_schema().empty_table()
    assert table.equals(want)


def _landed_csv(body: bytes, chunk: int, pass_through: bool) -> tuple[bytes, int, int]:
    """What a CSV file holds after a page went through `CsvPageStream` into a `CsvEncoder`,
    the rows handed on unparsed, and the rows the page counted."""
    import io

    from nyc_collisions.pages import CsvPageStream, CsvRows
    from nyc_collisions.sink.formats import CsvEncoder

    out = io.BytesIO()
    encoder = CsvEncoder(out, csv_schema())
    unparsed = 0
    last = ""

    def emit(table: pa.Table) -> None:
        nonlocal last
        encoder.write(table)
        last = table.column("socrata_id")[-1].as_py()

    def emit_rows(rows: CsvRows) -> None:
        nonlocal unparsed, last
        encoder.write_rows(rows.data)
        unparsed += rows.num_rows
        assert rows.last_id > last  # the last `:id` of the rows, in order
        last = rows.last_id

    stream = CsvPageStream(csv_schema(), emit, emit_rows if pass_through else None)
    for i in range(0, len(body), chunk):
        stream.feed(body[i : i + chunk])
    n = stream.finish()
    encoder.close()
    return out.getvalue(), unparsed, n


@settings(max_examples=150, deadline=None)
@given(_csv_rows, st.booleans(), st.integers(1, 300), st.integers(40, 400))
def test_csv_page_passed_through_lands_the_bytes_of_the_parsed_page(
    rows: list[dict[str, str | None]], shuffle: bool, chunk: int, piece: int
) -> None:
    """Rows handed on unparsed land exactly the bytes the parsed rows land: pieces with a
    number in `E` form, and pages whose header is not in the landed order, are parsed."""
    import nyc_collisions.pages as pages

    rows = sorted({r[":id"]: r for r in rows}.values(), key=lambda r: str(r[":id"]))
    order = csv_schema().field_names
    if shuffle:
        order = order[1:] + order[:1]
    body = _csv_body(rows, order)
    old, pages.stream.PIECE_BYTES = pages.stream.PIECE_BYTES, piece
    try:
        want, none, n = _landed_csv(body, chunk, pass_through=False)
        got, unparsed, m = _landed_csv(body, chunk, pass_through=True)
    finally:
        pages.stream.PIECE_BYTES = old
    assert none == 0
    assert n == m == len(rows)
    assert got == want
    if shuffle:
        assert unparsed == 0
    elif not any("E" in _csv_cell(r["unique_id"], True) for r in rows) and not any(
        "E" in _csv_cell(r["collision_id"], True) for r in rows
    ):
        assert unparsed == len(rows)


@pytest.mark.parametrize("pass_through", [False, True], ids=["parsed", "passed-through"])
def test_csv_page_cut_anywhere_is_a_prefix_or_an_error(
    monkeypatch: pytest.MonkeyPatch, pass_through: bool
) -> None:
    """Cut at every byte: the rows kept are the first rows, and a page reads as whole only
    when the cut fell between two rows (which keyset paging then goes on after)."""
    import csv
    import io

    import nyc_collisions.pages as pages

    monkeypatch.setattr(pages.stream, "PIECE_BYTES", 64)
    rows: list[dict[str, str | None]] = [
        {
            "unique_id": str(i),
            "collision_id": "0.0000001" if i == 5 else None if i % 3 else str(i),
            "crash_date": "2022-07-03T00:00:00.000",
            "person_type": ['multi\nline "q", x', "", None, "Pedestrian"][i % 4],
            ":id": f"row-{i:03d}",
            ":created_at": "2021-02-23T16:03:14.703Z",
            ":updated_at": "2021-02-23T16:03:14.703Z",
        }
        for i in range(8)
    ]
    order = csv_schema().field_names
    body = _csv_body(rows, order)
    row_ends = {len(_csv_body(rows[:k], order)) for k in range(len(rows) + 1)}
    id_column = order.index(":id")
    for cut in range(len(body) + 1):
        ids: list[str] = []

        def emit(table: pa.Table, ids: list[str] = ids) -> None:
            ids.extend(table.column("socrata_id").to_pylist())

        def emit_rows(rows: pages.CsvRows, ids: list[str] = ids) -> None:
            text = io.StringIO(bytes(rows.data).decode(), newline="")
            these = [cells[id_column] for cells in csv.reader(text)]
            assert rows.num_rows == len(these)
            assert rows.last_id == these[-1]
            ids.extend(these)

        stream = pages.CsvPageStream(csv_schema(), emit, emit_rows if pass_through else None)
        stream.feed(body[:cut])
        try:
            n = stream.finish()
            whole = True
        except BadResponse:
            whole = False
        assert ids == [f"row-{i:03d}" for i in range(len(ids))], cut
        assert whole == (cut in row_ends), cut
        if whole:
            assert n == len(ids)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"<html><body>busy</body></html>", BadResponse),
        (b'[{"unique_id": "1"}]', BadResponse),
        (b"", BadResponse),
        (b'"unique_id","collision_id"', BadResponse),
        (b'"unique_id","nope"\n', SchemaError),
        (b'"unique_id","collision_id"\n', SchemaError),
    ],
)
def test_csv_page_rejects_what_is_not_a_page(body: bytes, error: type[Exception]) -> None:
    from nyc_collisions.pages import CsvPageStream

    def read_all() -> None:
        stream = CsvPageStream(csv_schema(), lambda t: None)
        stream.feed(body)
        stream.finish()

    with pytest.raises(error):
        read_all()


@pytest.mark.parametrize("pass_through", [False, True], ids=["parsed", "passed-through"])
def test_csv_page_that_is_not_utf8_is_refetched(pass_through: bool) -> None:
    """A byte that is not UTF-8 in any cell makes the page a `BadResponse` (fetched again),
    whether its rows are parsed or passed through (where only `:id` and numbers are read)."""
    from nyc_collisions.pages import CsvPageStream

    rows: list[dict[str, str | None]] = [
        {"unique_id": str(i), "person_type": "Occupant", ":id": f"row-{i}"} for i in range(3)
    ]
    body = _csv_body(rows, csv_schema().field_names).replace(b"Occupant", b"Occ\xffpant", 1)
    handed: list[object] = []

    def read_all() -> None:
        stream = CsvPageStream(csv_schema(), handed.append, handed.append if pass_through else None)
        stream.feed(body)
        stream.finish()

    with pytest.raises(BadResponse, match="not whole CSV"):
        read_all()
    assert handed == []


def test_csv_page_skips_computed_regions_as_json_pages_do() -> None:
    from nyc_collisions.pages import CsvPageStream

    rows: list[dict[str, str | None]] = [
        {"unique_id": "1", ":id": "row-1", ":@computed_region_x": "7", ":version": "rv-1"}
    ]
    order = [*csv_schema().field_names, ":@computed_region_x", ":version"]
    got: list[pa.Table] = []
    stream = CsvPageStream(csv_schema(), got.append)
    stream.feed(_csv_body(rows, order))
    assert stream.finish() == 1
    assert got[0].column_names == csv_schema().names
    assert got[0].column("socrata_id").to_pylist() == ["row-1"]


def test_csv_page_of_only_a_header_is_empty() -> None:
    from nyc_collisions.pages import CsvPageStream

    stream = CsvPageStream(csv_schema(), lambda t: None)
    stream.feed(_csv_body([], csv_schema().field_names))
    assert stream.finish() == 0


def test_csv_wire_only_where_exact() -> None:
    assert csv_schema().csv_exact
    assert not schema().csv_exact  # crashes: a legacy location loses its human_address in CSV


def test_gzip_bodies_inflate_or_are_refused() -> None:
    import gzip

    import httpx

    from nyc_collisions.socrata.client import _body

    def body(data: bytes, encoding: str | None = "gzip") -> bytes:
        headers = {"Content-Encoding": encoding} if encoding else {}
        response = httpx.Response(200, headers=headers, stream=httpx.ByteStream(data))
        return b"".join(_body(response))

    page = b'[{"a":"1"}\n]' * 5000
    packed = gzip.compress(page)
    assert body(packed) == page
    assert body(page, None) == page
    with pytest.raises(BadResponse, match="cut short"):
        body(packed[: len(packed) // 2])
    with pytest.raises(BadResponse, match="inflate"):
        body(packed[:10] + b"\x00" * 50 + packed[60:])


_MALLOC_PROBE = """
import ctypes, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    from nyc_collisions.runtime import tune_allocators
    tune_allocators()
before = libc.mallinfo2().hblkhd
block = bytearray(8 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


def test_tuned_malloc_keeps_page_pieces_in_its_heap() -> None:
    """A few-MiB block (a piece of a page) comes from malloc's heap once tuned, not from a fresh
    mapping (faulted in page by page, unmapped when freed) as glibc does by default."""
    if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
        pytest.skip("glibc only")
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc before 2.33 has no mallinfo2")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def mapped(mode: str) -> int:
        run = [sys.executable, "-c", _MALLOC_PROBE, mode]
        return int(subprocess.run(run, env=env, capture_output=True, check=True).stdout)

    assert mapped("default") >= 8 << 20
    assert mapped("tuned") == 0


_ARENA_PROBE = """
import ctypes, sys, threading
if sys.argv[1] == "tuned":
    from nyc_collisions.runtime import tune_allocators
    tune_allocators()
ready, done = threading.Barrier(9), threading.Event()
def work():
    block = bytearray(1 << 20)  # held until all threads have allocated
    ready.wait()
    done.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
ready.wait()
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" block per arena, on stderr
done.set()
"""


def test_tuned_malloc_keeps_to_two_arenas() -> None:
    """Threads share 2 malloc arenas once tuned, instead of one each (each arena keeps what its
    threads freed)."""
    if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
        pytest.skip("glibc only")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def arenas(mode: str) -> int:
        run = [sys.executable, "-c", _ARENA_PROBE, mode]
        err = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stderr
        return sum(line.startswith("Arena ") for line in err.splitlines())

    assert arenas("default") > 2
    assert arenas("tuned") <= 2


class _HeldS3:
    """Just the multipart calls, each part held in flight until `release` is set; records how
    many are in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.most = self.parts = 0
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def create_multipart_upload(self, **kw: Any) -> dict[str, Any]:
        return {"UploadId": "u"}

    def upload_part(self, **kw: Any) -> dict[str, Any]:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        self.entered.release()
        self.release.wait(timeout=30)
        with self.lock:
            self.now -= 1
            self.parts += 1
        return {"ETag": f"e{kw['PartNumber']}"}

    def complete_multipart_upload(self, **kw: Any) -> None:
        pass


def test_s3_parts_in_flight_are_bounded_across_writers(
    monkeypatch: pytest.MonkeyPatch, s3_env: str
) -> None:
    """However many partitions write at once, at most PARTS_IN_FLIGHT parts (the memory of
    parts not yet sent) are uploading; a writer waits for a slot instead."""
    from nyc_collisions.sink import s3 as st_mod
    from nyc_collisions.sink import s3_transfer

    monkeypatch.setattr(s3_transfer, "PART_SIZE", 1024)
    storage = st_mod.S3Storage("bucket", "prefix")
    held = _HeldS3()
    storage.client = held  # type: ignore[assignment]

    def partition(i: int) -> None:
        writer = storage.open_writer(f"part-{i}.csv")
        for _ in range(6):
            writer.write(b"x" * 1024)
        writer.close()

    threads = [threading.Thread(target=partition, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    # the slots fill while every part is held; one more is not sent until a slot frees (a slow
    # machine could only let a broken bound pass here, never fail a sound one)
    try:
        for _ in range(st_mod.PARTS_IN_FLIGHT):
            assert held.entered.acquire(timeout=10)
        assert not held.entered.acquire(timeout=0.3)
    finally:
        held.release.set()
    for t in threads:
        t.join()
    assert held.parts == 36
    assert held.most == st_mod.PARTS_IN_FLIGHT


@pytest.mark.parametrize(
    "url", ["http://localhost:8080", "http://127.0.0.9", "http://[::1]:9", "https://192.0.2.1"]
)
def test_plain_http_is_fine_to_this_machine(url: str) -> None:
    assert validate_base_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://192.0.2.1",
        "http://data.cityofnewyork.us",
        "http://127.0.0.1.example.org",
        "http://localhost.example.org",
    ],
)
def test_plain_http_to_another_host_needs_allowing(url: str) -> None:
    with pytest.raises(UsageError, match="--allow-http"):
        validate_base_url(url)
    assert validate_base_url(url, allow_http=True) == url


def test_a_client_that_would_never_try_is_refused() -> None:
    with pytest.raises(UsageError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(UsageError, match="timeout"):
        SodaClient("http://127.0.0.1:9", timeout=0)


@pytest.mark.parametrize("pass_through", [False, True])
def test_csv_page_cut_inside_a_value_that_spans_lines_is_refetched(pass_through: bool) -> None:
    """A cut right after a newline inside the last row's quoted value leaves a body that ends in
    `\\n`: only the open quote shows the row is not whole (Arrow would take the value as cut)."""
    from nyc_collisions.pages import CsvPageStream, CsvRows

    order = [f for f in csv_schema().field_names if f != "person_type"] + ["person_type"]
    row = {f: "1" for f in order} | {":id": "row-1", "person_type": "first line\nsecond line"}
    body = _csv_body([row, row | {":id": "row-2"}], order)
    cut = body[: body.rindex(b"first line\n") + len(b"first line\n")]
    got: list[Any] = []

    def emit_rows(rows: CsvRows) -> None:
        got.append(rows)

    stream = CsvPageStream(csv_schema(), got.append, emit_rows if pass_through else None)
    stream.feed(cut)
    with pytest.raises(BadResponse, match="cut short"):
        stream.finish()
    assert sum(t.num_rows for t in got) <= 1  # the whole first row at most


@pytest.mark.parametrize(
    ("package", "unknown"),
    [
        # the source's HTTP and SoQL: no page parsers, nothing of what is landed
        ("socrata", ("pages", "state", "source", "sink", "rows", "schema")),
        # where rows land: neither the source nor the page parsers
        ("sink", ("pages", "socrata", "source")),
    ],
)
def test_a_layer_loads_nothing_of_the_layers_it_does_not_know(
    package: str, unknown: tuple[str, ...]
) -> None:
    import pkgutil

    import nyc_collisions

    root = Path(nyc_collisions.__file__).parent / package
    modules = [f"nyc_collisions.{package}.{m.name}" for m in pkgutil.iter_modules([str(root)])]
    probe = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('nyc_collisions.'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded = {m.split(".")[1] for m in proc.stdout.split()}
    assert modules
    assert loaded.isdisjoint(unknown), sorted(loaded & set(unknown))


def test_storages_opened_one_after_another_share_one_loader_that_does_not_grow() -> None:
    """Each boto3 session adds boto3's data folder to its loader's search paths: with one
    loader for the process (`new_session`), every storage opened grew that list for good."""
    from nyc_collisions.sink.s3_transfer import _service_models, new_session

    new_session()
    before = list(_service_models().search_paths)
    for _ in range(20):
        new_session()
    assert _service_models().search_paths == before


def test_a_fraction_in_a_whole_number_column_names_the_way_to_land_it() -> None:
    """persons' `person_age` is a `number` that DATASETS.md has as whole numbers, typed int64
    in Parquet and the table: a fraction the source's type allows stops that typing in one
    error naming the column, the value and the format that keeps it (landed CSV)."""
    meta = {
        "columns": [
            {"fieldName": "unique_id", "dataTypeName": "number", "position": 1},
            {"fieldName": "person_age", "dataTypeName": "number", "position": 2},
        ]
    }
    schema = Schema.from_metadata(KNOWN["persons"], meta)
    text = {n: pa.array([None], pa.string()) for n in schema.names}
    text["person_age"] = pa.array(["56.5"])
    with pytest.raises(SchemaError, match="person_age") as caught:
        schema.to_typed(pa.table(text, schema=schema.text_schema()))
    assert "56.5" in str(caught.value)
    assert "--format csv" in str(caught.value)
