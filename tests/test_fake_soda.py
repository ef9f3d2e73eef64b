"""The fake SODA server itself: paging, SoQL, formats, errors, tokens, faults, latency, admin.

Every test speaks real HTTP (httpx) to a server on 127.0.0.1 and checks answers against the
server's own rows (`srv.rows`), evaluated independently in Python.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_soda import CRASHES, GENERIC, PERSONS, VEHICLES, FakeSoda, FakeSodaClient, Latency

SIZES = {CRASHES: 1500, PERSONS: 3600, VEHICLES: 2800, GENERIC: 150}
TINY = {CRASHES: 300, PERSONS: 700, VEHICLES: 500, GENERIC: 50}
KEYS = {CRASHES: "collision_id", PERSONS: "unique_id", VEHICLES: "unique_id", GENERIC: "id"}
SYSTEM = (":id", ":created_at", ":updated_at", ":version")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def srv() -> Iterator[FakeSoda]:
    """Read-only server: no mutation, no fault."""
    with FakeSoda(sizes=SIZES, seed=5, tokens=("tok-1", "tok-2")) as s:
        yield s


@pytest.fixture
def fresh() -> Iterator[FakeSoda]:
    """A small server of its own, for mutations and faults."""
    with FakeSoda(sizes=TINY, seed=9) as s:
        yield s


@pytest.fixture(scope="module")
def rows(srv: FakeSoda) -> dict[str, list[dict[str, Any]]]:
    return {d: srv.rows(d) for d in SIZES}


def get(srv: FakeSoda, dataset: str, fmt: str = "json", **params: Any) -> httpx.Response:
    params = {k.replace("S_", "$"): v for k, v in params.items()}
    return httpx.get(f"{srv.url}/resource/{dataset}.{fmt}", params=params, timeout=30)


def query(srv: FakeSoda, dataset: str, **params: Any) -> list[dict[str, Any]]:
    r = get(srv, dataset, **params)
    assert r.status_code == 200, r.text
    out: list[dict[str, Any]] = r.json()
    return out


def strip(row: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.startswith(":") or k in keep}


# ----------------------------------------------------------------------------------------------
# Paging


@pytest.mark.parametrize("dataset", [CRASHES, PERSONS, VEHICLES, GENERIC])
def test_keyset_paging_over_id_returns_every_row_once(
    srv: FakeSoda, rows: dict[str, Any], dataset: str
) -> None:
    got: list[dict[str, Any]] = []
    after = None
    while True:
        params = {"S_select": "*,:id", "S_order": ":id", "S_limit": 401}
        if after is not None:
            params["S_where"] = f":id > '{after}'"
        page = query(srv, dataset, **params)
        got += page
        if len(page) < 401:
            break
        after = page[-1][":id"]
    ids = [r[":id"] for r in got]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert got == [strip(r, (":id",)) for r in rows[dataset]]


def test_id_order_is_not_key_order(rows: dict[str, Any]) -> None:
    keys = [int(r["collision_id"]) for r in rows[CRASHES]]
    assert keys != sorted(keys)
    assert keys != sorted(keys, reverse=True)


def test_partition_probes_and_bounded_partitions_cover_all(
    srv: FakeSoda, rows: dict[str, Any]
) -> None:
    n = len(rows[PERSONS])
    bounds = [
        query(srv, PERSONS, S_select=":id", S_order=":id", S_limit=1, S_offset=k)[0][":id"]
        for k in (n // 4, n // 2, 3 * n // 4)
    ]
    assert bounds == [rows[PERSONS][k][":id"] for k in (n // 4, n // 2, 3 * n // 4)]
    edges = [None, *bounds, None]
    seen: list[str] = []
    for lo, hi in itertools.pairwise(edges):
        where = (
            " AND ".join(([f":id > '{lo}'"] if lo else []) + ([f":id <= '{hi}'"] if hi else []))
            or None
        )
        params = {"S_select": ":id,unique_id", "S_order": ":id", "S_limit": 100_000}
        if where:
            params["S_where"] = where
        part = query(srv, PERSONS, **params)
        assert all(set(r) == {":id", "unique_id"} for r in part)
        seen += [r[":id"] for r in part]
    assert seen == [r[":id"] for r in rows[PERSONS]]


def test_incremental_keyset_over_updated_at(srv: FakeSoda, rows: dict[str, Any]) -> None:
    got: list[dict[str, Any]] = []
    where = None
    while True:
        params = {"S_select": ":*,*", "S_order": ":updated_at,:id", "S_limit": 500}
        if where:
            params["S_where"] = where
        page = query(srv, VEHICLES, **params)
        got += page
        if len(page) < 500:
            break
        t, k = page[-1][":updated_at"], page[-1][":id"]
        where = f":updated_at > '{t}' OR (:updated_at = '{t}' AND :id > '{k}')"
    order = [(r[":updated_at"], r[":id"]) for r in got]
    assert order == sorted(order)
    assert sorted(got, key=lambda r: r[":id"]) == rows[VEHICLES]
    # bulk loads: many rows share one :updated_at, and a page boundary falls inside a tie
    assert Counter(r[":updated_at"] for r in got).most_common(1)[0][1] > 500


def test_order_by_key_with_offset_and_desc(srv: FakeSoda, rows: dict[str, Any]) -> None:
    keys = sorted(int(r["collision_id"]) for r in rows[CRASHES])
    page = query(srv, CRASHES, S_order="collision_id", S_offset=100, S_limit=50)
    assert [int(r["collision_id"]) for r in page] == keys[100:150]
    page = query(
        srv, CRASHES, S_order="collision_id DESC", S_limit=5, S_where=f"collision_id < {keys[500]}"
    )
    assert [int(r["collision_id"]) for r in page] == keys[495:500][::-1]


def test_system_field_orders_and_literals(srv: FakeSoda, rows: dict[str, Any]) -> None:
    ids = [r[":id"] for r in rows[VEHICLES]]
    page = query(srv, VEHICLES, S_select=":id", S_order=":id DESC", S_limit=5, S_offset=2)
    assert [r[":id"] for r in page] == ids[::-1][2:7]
    # literals longer or shorter than any :id compare by code point, not by length
    assert query(srv, VEHICLES, S_select="count(*)", S_where=f":id >= '{ids[9]}x'") == [
        {"count": str(len(ids) - 10)}
    ]
    assert query(srv, VEHICLES, S_select="count(*)", S_where=f":id < '{ids[9]}x'") == [
        {"count": "10"}
    ]
    assert query(srv, VEHICLES, S_select="count(*)", S_where=":id > 'row-'") == [
        {"count": str(len(ids))}
    ]
    # a fixed timestamp literal may come with or without the Z, with fewer digits
    stamps = sorted({r[":updated_at"] for r in rows[VEHICLES]})
    t = stamps[len(stamps) // 2]
    for literal, canonical in ((t, t), (t.rstrip("Z"), t), (t[:19], t[:19] + ".000Z")):
        where = f":updated_at >= '{literal}'"
        (n,) = query(srv, VEHICLES, S_select="count(*) AS n", S_where=where)
        assert int(n["n"]) == sum(r[":updated_at"] >= canonical for r in rows[VEHICLES])
    # ordering by :updated_at alone is a valid (generic) order, ties in any order
    page = query(srv, VEHICLES, S_select=":updated_at", S_order=":updated_at DESC", S_limit=50)
    assert [r[":updated_at"] for r in page] == sorted(
        (r[":updated_at"] for r in rows[VEHICLES]), reverse=True
    )[:50]


def test_no_order_is_arbitrary_but_complete(srv: FakeSoda, rows: dict[str, Any]) -> None:
    page = query(srv, CRASHES, S_select=":id,collision_id", S_limit=10_000)
    ids = [r[":id"] for r in page]
    keys = [int(r["collision_id"]) for r in page]
    assert ids != sorted(ids)
    assert keys != sorted(keys)
    assert sorted(ids) == [r[":id"] for r in rows[CRASHES]]
    assert len(query(srv, CRASHES)) == 1000  # default $limit


# ----------------------------------------------------------------------------------------------
# SoQL


def test_counts_and_aggregates(srv: FakeSoda, rows: dict[str, Any]) -> None:
    crashes = rows[CRASHES]
    assert query(srv, CRASHES, S_select="count(*)") == [{"count": str(len(crashes))}]
    assert query(srv, CRASHES, S_select="COUNT(*)") == [{"COUNT": str(len(crashes))}]
    brooklyn = [r for r in crashes if r.get("borough") == "BROOKLYN"]
    assert query(srv, CRASHES, S_select="count(*) AS n", S_where="borough = 'BROOKLYN'") == [
        {"n": str(len(brooklyn))}
    ]
    (agg,) = query(
        srv,
        CRASHES,
        S_select="max(:updated_at), min(collision_id) AS lo, count(borough), max(crash_date)",
    )
    assert agg == {
        "max_updated_at": max(r[":updated_at"] for r in crashes),
        "lo": str(min(int(r["collision_id"]) for r in crashes)),
        "count_borough": str(sum("borough" in r for r in crashes)),
        "max_crash_date": max(r["crash_date"] for r in crashes),
    }
    t = sorted(r[":updated_at"] for r in crashes)[len(crashes) // 2]
    (agg,) = query(
        srv,
        CRASHES,
        S_select="count(*) AS n, max(:updated_at) AS m",
        S_where=f":updated_at <= '{t}'",
    )
    assert agg == {"n": str(sum(r[":updated_at"] <= t for r in crashes)), "m": t}
    assert query(srv, CRASHES, S_select="count(*)", S_where="collision_id < 0") == [{"count": "0"}]


WHERE_CASES = {
    "and_or_parens": (
        "(borough = 'QUEENS' OR borough = 'BRONX') AND number_of_persons_injured > 0",
        lambda r: (
            r.get("borough") in ("QUEENS", "BRONX")
            and float(r.get("number_of_persons_injured", "nan")) > 0
        ),
    ),
    "not_is_null": (
        "NOT (borough IS NULL) AND on_street_name IS NOT NULL",
        lambda r: "borough" in r and "on_street_name" in r,
    ),
    "in_between": (
        "contributing_factor_vehicle_1 IN ('Unspecified', 'Driver Inattention/Distraction') "
        "AND number_of_motorist_injured BETWEEN 1 AND 2",
        lambda r: (
            r.get("contributing_factor_vehicle_1")
            in ("Unspecified", "Driver Inattention/Distraction")
            and 1 <= float(r["number_of_motorist_injured"]) <= 2
        ),
    ),
    "like": (
        "on_street_name LIKE '%STREET'",
        lambda r: r.get("on_street_name", "").endswith("STREET"),
    ),
    "quote_escape": (
        "on_street_name = 'O''BRIEN AVENUE' OR off_street_name = 'O''BRIEN AVENUE'",
        lambda r: "O'BRIEN AVENUE" in (r.get("on_street_name"), r.get("off_street_name")),
    ),
    "system_fields": (
        ":updated_at >= '2022-01-01T00:00:00.000Z' AND :id < 'row-m' AND :created_at < :updated_at",
        lambda r: (
            r[":updated_at"] >= "2022-01-01T00:00:00.000Z"
            and r[":id"] < "row-m"
            and r[":created_at"] < r[":updated_at"]
        ),
    ),
    "floating_timestamp": (
        "crash_date >= '2020-03-01' AND crash_date < '2020-04-01T00:00:00'",
        lambda r: "2020-03-01" <= r["crash_date"] < "2020-04-01",
    ),
    "number_not_text": (
        "collision_id < 3000100 AND number_of_persons_injured >= '2'",
        lambda r: (
            int(r["collision_id"]) < 3000100
            and float(r.get("number_of_persons_injured", "nan")) >= 2
        ),
    ),
    "text_not_number": (
        "crash_time > '9:00' AND crash_time < '9:30'",
        lambda r: "9:00" < r["crash_time"] < "9:30",
    ),
    "not_equal": (
        "borough != 'BROOKLYN' AND borough <> 'QUEENS'",
        lambda r: r.get("borough") not in (None, "BROOKLYN", "QUEENS"),
    ),
}


@pytest.mark.parametrize("case", list(WHERE_CASES))
def test_where(srv: FakeSoda, rows: dict[str, Any], case: str) -> None:
    where, predicate = WHERE_CASES[case]
    page = query(srv, CRASHES, S_select=":*,*", S_where=where, S_order=":id", S_limit=10_000)
    expected = [r for r in rows[CRASHES] if predicate(r)]
    assert page == expected
    assert expected, f"{case}: the data should have matching rows"


def test_number_columns_compare_numerically_text_by_code_point(
    srv: FakeSoda, rows: dict[str, Any]
) -> None:
    # "10:15" < "9:05" as text; 10 > 9 as numbers
    times = query(
        srv, CRASHES, S_select="crash_time", S_where="crash_time > '9:30'", S_limit=10_000
    )
    assert times
    assert all(t["crash_time"] > "9:30" for t in times)
    assert not any(t["crash_time"].startswith("1") for t in times)
    ages = query(srv, PERSONS, S_select="person_age", S_where="person_age > 9", S_limit=10_000)
    assert any(len(a["person_age"]) > 1 for a in ages)
    assert len(ages) == sum(float(r.get("person_age", "-1e9")) > 9 for r in rows[PERSONS])


def test_multi_key_order_with_desc_and_nulls(srv: FakeSoda, rows: dict[str, Any]) -> None:
    page = query(
        srv,
        CRASHES,
        S_select="borough,collision_id,crash_date",
        S_order="borough DESC, crash_date ASC, collision_id DESC",
        S_limit=10_000,
    )
    expected = sorted(rows[CRASHES], key=lambda r: -int(r["collision_id"]))
    expected.sort(key=lambda r: r["crash_date"])
    expected.sort(key=lambda r: (r.get("borough") is None, r.get("borough", "")), reverse=True)
    assert [r["collision_id"] for r in page] == [r["collision_id"] for r in expected]
    assert "borough" not in page[0]  # nulls first when descending (PostgreSQL's default)


def test_select_forms(srv: FakeSoda, rows: dict[str, Any]) -> None:
    first = rows[PERSONS][0]
    (row,) = query(srv, PERSONS, S_select=":*,*", S_order=":id", S_limit=1)
    assert row == first
    assert set(SYSTEM) <= set(row)
    (row,) = query(srv, PERSONS, S_select="*", S_order=":id", S_limit=1)
    assert row == strip(first)
    (row,) = query(
        srv,
        PERSONS,
        S_select=":id, :updated_at AS t, person_type AS kind",
        S_order=":id",
        S_limit=1,
    )
    assert row == {":id": first[":id"], "t": first[":updated_at"], "kind": first["person_type"]}
    r = get(srv, PERSONS, S_select=":id,*")
    assert r.status_code == 400
    assert r.json()["code"] == "query.compiler.malformed"


def test_simple_filter_parameter(srv: FakeSoda, rows: dict[str, Any]) -> None:
    page = query(
        srv, CRASHES, borough="STATEN ISLAND", S_order=":id", S_limit=10_000, S_select=":id"
    )
    assert [r[":id"] for r in page] == [
        r[":id"] for r in rows[CRASHES] if r.get("borough") == "STATEN ISLAND"
    ]


# ----------------------------------------------------------------------------------------------
# Formats, headers, metadata


def test_json_format_one_row_per_line_nulls_omitted_numbers_strings(srv: FakeSoda) -> None:
    r = get(srv, CRASHES, S_select="*,:id", S_order=":id", S_limit=50)
    assert r.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in r.headers
    assert r.headers["content-encoding"] == "gzip"
    lines = r.text.split("\n")
    assert lines[0].startswith("[{")
    assert lines[-1] == "]"
    assert all(line.startswith(",{") for line in lines[1:-1])
    assert len(lines) == 51
    page = r.json()
    assert all(None not in row.values() for row in page)
    assert len({frozenset(row) for row in page}) > 1  # rows have different key sets
    assert all(isinstance(row["collision_id"], str) for row in page)
    assert json.loads(r.headers["x-soda2-fields"])[-1] == ":id"
    types = dict(
        zip(
            json.loads(r.headers["x-soda2-fields"]),
            json.loads(r.headers["x-soda2-types"]),
            strict=True,
        )
    )
    assert types["crash_date"] == "floating_timestamp"
    assert types["location"] == "location"
    assert r.headers["x-soda2-data-out-of-date"] == "false"
    assert r.headers["etag"].startswith('"')
    assert r.headers["last-modified"].endswith("GMT")
    assert r.headers["x-socrata-requestid"]
    empty = get(srv, CRASHES, S_where="collision_id < 0")
    assert empty.text == "[]"


def test_gzip_only_when_accepted_and_enabled(srv: FakeSoda) -> None:
    r = httpx.get(f"{srv.url}/resource/{CRASHES}.json", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in r.headers
    assert len(r.json()) == 1000
    with FakeSoda(sizes=TINY, gzip=False) as plain:
        r = httpx.get(f"{plain.url}/resource/{CRASHES}.json")
        assert "content-encoding" not in r.headers
        assert len(r.json()) == 300
    with httpx.stream(
        "GET",
        f"{srv.url}/resource/{CRASHES}.json",
        params={"$limit": 3},
        headers={"Accept-Encoding": "gzip"},
    ) as r:
        body = b"".join(r.iter_raw())
    assert len(json.loads(gzip.decompress(body))) == 3


def test_csv_parses_back_to_the_json_values(srv: FakeSoda, rows: dict[str, Any]) -> None:
    text = get(srv, CRASHES, "csv", S_select=":*,*", S_order=":id", S_limit=10_000).text
    assert text.startswith('":id",":created_at",":updated_at",":version","crash_date"')
    parsed = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(parsed) == len(rows[CRASHES])
    located = 0
    for got, row in zip(parsed, rows[CRASHES], strict=True):
        want = dict(row)
        # a legacy location is written as Socrata's CsvColumnRep does: address lines, then
        # `(lat, lon)`; its human_address JSON does not survive
        location = got.pop("location")
        if "location" in want:
            loc = want.pop("location")
            address = json.loads(loc["human_address"])
            lines = f"{address['address']}\n{address['city']}, {address['state']} {address['zip']}"
            assert location == f"{lines}\n({loc['latitude']}, {loc['longitude']})"
            located += 1
        else:
            assert location == ""
        assert {k: v for k, v in got.items() if v != ""} == want
    assert located
    assert any("," in v or '"' in v for row in parsed for v in row.values())


def test_csv_numbers_are_written_as_java_bigdecimal_tostring() -> None:
    from tests.fake_soda.engine import _csv_cell
    from tests.fake_soda.schema import NUMBER

    assert _csv_cell("0.0000001", NUMBER) == '"1E-7"'
    assert _csv_cell("-0.00000010", NUMBER) == '"-1.0E-7"'
    assert _csv_cell("0.000001", NUMBER) == '"0.000001"'
    assert _csv_cell("12", NUMBER) == '"12"'


def test_csv_of_the_generic_dataset(srv: FakeSoda, rows: dict[str, Any]) -> None:
    text = get(srv, GENERIC, "csv", S_order=":id", S_limit=1000).text
    parsed = list(csv.DictReader(io.StringIO(text, newline="")))
    for got, want in zip(parsed, rows[GENERIC], strict=True):
        assert got["active"] == {True: "true", False: "false", None: ""}[want.get("active")]
        if "site" in want:
            lon, lat = want["site"]["coordinates"]
            assert got["site"] == f"POINT ({lon} {lat})"
        assert got["name"] == want.get("name", "")


def test_generic_dataset_checkbox_and_point(srv: FakeSoda, rows: dict[str, Any]) -> None:
    page = query(
        srv,
        GENERIC,
        S_where="active = true",
        S_order=":id",
        S_limit=1000,
        S_select=":id,active,site",
    )
    assert page
    assert all(r["active"] is True for r in page)
    assert len(page) == sum(r.get("active") is True for r in rows[GENERIC])
    site = next(r["site"] for r in page if "site" in r)
    assert site["type"] == "Point"
    assert all(isinstance(c, float) for c in site["coordinates"])
    assert query(srv, GENERIC, S_where="active", S_select="count(*)") == [{"count": str(len(page))}]


def test_metadata(srv: FakeSoda, rows: dict[str, Any]) -> None:
    r = httpx.get(f"{srv.url}/api/views/{CRASHES}.json")
    assert r.status_code == 200
    assert r.text.startswith("{\n")
    meta = r.json()
    cols = meta["columns"]
    assert [c["position"] for c in cols] == list(range(1, 30))
    assert cols[0] == {
        **cols[0],
        "fieldName": "crash_date",
        "name": "CRASH DATE",
        "dataTypeName": "calendar_date",
    }
    assert {c["dataTypeName"] for c in cols} == {"calendar_date", "text", "number", "location"}
    assert [c["fieldName"] for c in cols if c["fieldName"].startswith("vehicle_type")] == [
        "vehicle_type_code1",
        "vehicle_type_code2",
        "vehicle_type_code_3",
        "vehicle_type_code_4",
        "vehicle_type_code_5",
    ]
    newest = max(r[":updated_at"] for r in rows[CRASHES])
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(meta["rowsUpdatedAt"])) == newest[:19]
    assert meta["id"] == CRASHES
    assert meta["viewLastModified"] >= meta["rowsUpdatedAt"]
    persons = httpx.get(f"{srv.url}/api/views/{PERSONS}.json").json()
    assert len(persons["columns"]) == 21
    assert persons["columns"][0]["name"] == "UNIQUE_ID"
    vehicles = httpx.get(f"{srv.url}/api/views/{VEHICLES}.json").json()
    assert len(vehicles["columns"]) == 25


# ----------------------------------------------------------------------------------------------
# Errors and tokens


@pytest.mark.parametrize(
    ("path", "params", "status", "shape"),
    [
        ("/resource/zzzz-9999.json", {}, 404, "not_found"),
        ("/api/views/zzzz-9999.json", {}, 404, "not_found"),
        (f"/resource/{CRASHES}.json", {"$select": "foo"}, 400, "query.soql.no-such-column"),
        (f"/resource/{CRASHES}.json", {"$where": "foo = 1"}, 400, "query.soql.no-such-column"),
        (f"/resource/{CRASHES}.json", {"$order": "bar DESC"}, 400, "query.soql.no-such-column"),
        (f"/resource/{CRASHES}.json", {"$where": "borough = "}, 400, "query.compiler.malformed"),
        (
            f"/resource/{CRASHES}.json",
            {"$where": "(borough = 'X'"},
            400,
            "query.compiler.malformed",
        ),
        (f"/resource/{CRASHES}.json", {"$where": "borough = 5"}, 400, "query.soql.type-mismatch"),
        (f"/resource/{CRASHES}.json", {"$limit": "ten"}, 400, "query.compiler.malformed"),
        (f"/resource/{CRASHES}.json", {"$query": "SELECT *"}, 400, "query.compiler.malformed"),
        (f"/resource/{CRASHES}.json", {"$group": "borough"}, 400, "query.compiler.malformed"),
    ],
    ids=[
        "unknown_dataset",
        "unknown_view",
        "select_column",
        "where_column",
        "order_column",
        "where_incomplete",
        "where_paren",
        "type_mismatch",
        "bad_limit",
        "query",
        "group",
    ],
)
def test_error_shapes(
    srv: FakeSoda, path: str, params: dict[str, str], status: int, shape: str
) -> None:
    r = httpx.get(srv.url + path, params=params)
    assert r.status_code == status
    body = r.json()
    if shape.startswith("query.soql."):  # the query coordinator's shape
        assert body["errorCode"] == shape
        assert "code" not in body
        assert body["message"].startswith(f"Query coordinator error: {shape};")
        assert isinstance(body["data"], dict)
    else:
        assert body["code"] == shape
        assert body["error"] is True
        assert body["message"]


def test_group_and_having_find_a_repeated_value(srv: FakeSoda) -> None:
    """`$group` with `$having` on an aggregate's alias, as the tool asks whether a key repeats."""

    def ask(field: str) -> list[dict[str, str]]:
        params = {"$select": f"{field}, count(*) AS n", "$group": field, "$having": "n > 1"}
        r = httpx.get(f"{srv.url}/resource/{CRASHES}.json", params=params)
        assert r.status_code == 200, r.text
        return list(r.json())

    rows = httpx.get(f"{srv.url}/resource/{CRASHES}.json", params={"$limit": "100000"}).json()
    boroughs = [r.get("borough") for r in rows]
    repeated = {b for b in boroughs if b is not None and boroughs.count(b) > 1}
    assert {g.get("borough") for g in ask("borough")} >= repeated
    assert all(int(g["n"]) == boroughs.count(g.get("borough")) for g in ask("borough"))
    assert ask("collision_id") == []


def test_tokens(srv: FakeSoda) -> None:
    url = f"{srv.url}/resource/{CRASHES}.json"
    assert httpx.get(url, headers={"X-App-Token": "tok-1"}).status_code == 200
    assert httpx.get(url, params={"$$app_token": "tok-2"}).status_code == 200
    assert httpx.get(url).status_code == 200
    bad = httpx.get(url, headers={"X-App-Token": "nope"})
    assert bad.status_code == 403
    assert bad.json() == {
        "code": "permission_denied",
        "error": True,
        "message": "Invalid app_token specified",
    }
    assert httpx.get(url, params={"$$app_token": "nope", "$limit": 1}).status_code == 403
    log = srv.requests()
    assert "tok-2" not in json.dumps(log)
    assert "nope" not in json.dumps(log)
    assert log[-1]["has_token"] is True
    assert log[-1]["status"] == 403
    with FakeSoda(sizes=TINY, tokens=("t",), require_token=True) as strict:
        url = f"{strict.url}/resource/{CRASHES}.json"
        assert httpx.get(url).status_code == 429
        assert httpx.get(url, headers={"X-App-Token": "t"}).status_code == 200


# ----------------------------------------------------------------------------------------------
# Faults


@pytest.mark.parametrize(
    ("kind", "kw", "status"),
    [
        ("429", {"retry_after": 2}, 429),
        ("429", {}, 429),
        ("403_throttle", {}, 403),
        ("500", {}, 500),
        ("502", {}, 502),
        ("503", {"retry_after": 1}, 503),
        ("202", {}, 202),
        ("html", {}, 503),
        ("html", {"status": 200}, 200),
    ],
    ids=[
        "429_retry_after",
        "429_bare",
        "403_throttle",
        "500",
        "502",
        "503",
        "202",
        "html_503",
        "html_200",
    ],
)
def test_immediate_faults(fresh: FakeSoda, kind: str, kw: dict[str, Any], status: int) -> None:
    fresh.add_fault(kind, **kw)
    r = get(fresh, CRASHES)
    assert r.status_code == status
    if "retry_after" in kw:
        assert r.headers["retry-after"] == str(kw["retry_after"])
    else:
        assert "retry-after" not in r.headers
    if kind == "403_throttle":
        assert r.json()["code"] != "permission_denied"
    if kind == "202":
        assert r.json() == {"message": "processing"}
    if kind in ("html", "502"):
        assert r.headers["content-type"].startswith("text/html")
        assert "<html>" in r.text
    assert get(fresh, CRASHES).status_code == 200  # times=1: the next request is fine
    assert fresh.stats()["faults"] == {kind: 1}


def test_reset_is_a_protocol_error_for_the_client(fresh: FakeSoda) -> None:
    fresh.add_fault("reset", after_rows=100)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        get(fresh, CRASHES, S_limit=300)
    assert len(get(fresh, CRASHES, S_limit=300).json()) == 300
    fresh.add_fault("reset", match="/api/views/")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.get(f"{fresh.url}/api/views/{CRASHES}.json")
    assert fresh.stats()["faults"] == {"reset": 2}


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_truncate_rows_is_a_shorter_valid_page(fresh: FakeSoda, fmt: str) -> None:
    fresh.add_fault("truncate_rows")
    r = get(fresh, PERSONS, fmt, S_order=":id", S_limit=200)
    assert r.status_code == 200
    n = len(r.json()) if fmt == "json" else len(list(csv.DictReader(io.StringIO(r.text))))
    assert n == 100
    fresh.add_fault("truncate_rows", after_rows=0)
    assert get(fresh, PERSONS, S_limit=5).text == "[]"


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_truncate_mid_ends_cleanly_inside_a_row(fresh: FakeSoda, fmt: str) -> None:
    fresh.add_fault("truncate_mid", after_rows=10)
    r = get(fresh, PERSONS, fmt, S_order=":id", S_limit=50)
    assert r.status_code == 200  # the body ended cleanly: no transport error
    if fmt == "json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.text)
        assert r.text.count("\n") == 10
    else:
        assert not r.text.endswith("\n")
        assert r.text.count("\n") == 11


def test_stall_exceeds_the_client_read_timeout(fresh: FakeSoda) -> None:
    fresh.add_fault("stall", seconds=1.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{fresh.url}/resource/{CRASHES}.json", timeout=httpx.Timeout(5, read=0.3))
    fresh.add_fault("slow", seconds=0.3)
    t = time.monotonic()
    assert get(fresh, CRASHES).status_code == 200
    assert time.monotonic() - t >= 0.3


def test_fault_match_times_and_counting(fresh: FakeSoda) -> None:
    fresh.add_fault("500", times=2, match="$offset")
    fresh.add_fault("503", match=PERSONS)
    assert get(fresh, CRASHES).status_code == 200
    assert get(fresh, PERSONS).status_code == 503
    assert [get(fresh, CRASHES, S_offset=k).status_code for k in (0, 1, 2)] == [500, 500, 200]
    fresh.add_fault("429", times=None)
    assert [get(fresh, VEHICLES).status_code for _ in range(3)] == [429] * 3
    fresh.clear_faults()
    assert get(fresh, VEHICLES).status_code == 200
    stats = fresh.stats()
    assert stats["faults"] == {"500": 2, "503": 1, "429": 3}
    assert stats["by_status"]["200"] == 3
    assert stats["requests"]["data"] == 9
    assert [e["fault"] for e in fresh.requests()][:3] == [None, "503", "500"]


def test_random_faults_are_seeded(fresh: FakeSoda) -> None:
    def run() -> list[int]:
        fresh.random_faults(0.5, ["500", {"kind": "429", "retry_after": 0}], seed=42)
        out = [get(fresh, GENERIC, S_limit=1).status_code for _ in range(30)]
        fresh.clear_faults()
        return out

    first = run()
    assert first == run()
    assert set(first) == {200, 429, 500}


# ----------------------------------------------------------------------------------------------
# Latency


def test_latency_model() -> None:
    latency = Latency(base=0.1, per_row=1e-3, per_skipped=1e-4, max_concurrent=2, metadata=0)
    with FakeSoda(sizes=TINY, latency=latency) as s:
        t = time.monotonic()
        assert len(get(s, CRASHES, S_limit=100, S_offset=100, S_order=":id").json()) == 100
        single = time.monotonic() - t
        assert 0.21 <= single < 1.5  # 0.1 + 100 * 1e-3 + 100 * 1e-4
        results: list[float] = []

        def one() -> None:
            t0 = time.monotonic()
            get(s, CRASHES, S_limit=1)
            results.append(time.monotonic() - t0)

        threads = [threading.Thread(target=one) for _ in range(4)]
        t = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert time.monotonic() - t >= 0.2  # 4 requests, 2 at a time, 0.1 s each
        assert s.stats()["peak_in_flight"] >= 3  # they waited for a slot, not at the door


# ----------------------------------------------------------------------------------------------
# Admin mutations


def test_admin_mutations_and_clock(fresh: FakeSoda) -> None:
    before = {r[":id"]: r for r in fresh.rows(PERSONS)}
    newest = max(r[":updated_at"] for r in before.values())

    ins = fresh.insert(PERSONS, 7)
    assert ins["updated_at"] > newest
    assert len(ins["ids"]) == 7
    edit = fresh.edit(PERSONS, 5)
    assert edit["updated_at"] > ins["updated_at"]
    gone = fresh.delete(PERSONS, 4)
    after = {r[":id"]: r for r in fresh.rows(PERSONS)}

    assert set(after) == set(before) - set(gone["ids"]) | set(ins["ids"])
    crash_keys = {r["collision_id"] for r in fresh.rows(CRASHES)}
    for i in set(ins["ids"]) - set(edit["ids"]) - set(gone["ids"]):
        assert after[i][":created_at"] == after[i][":updated_at"] == ins["updated_at"]
        assert after[i]["collision_id"] in crash_keys
    for i in set(edit["ids"]) & set(before) - set(gone["ids"]):
        old, new = before[i], after[i]
        assert strip(old) != strip(new)
        assert new[":updated_at"] == edit["updated_at"]
        assert new[":created_at"] == old[":created_at"]
        assert new[":version"] != old[":version"]
        assert new["unique_id"] == old["unique_id"]
    # an incremental read from the old high-water mark sees exactly the new and edited rows
    page = query(
        fresh,
        PERSONS,
        S_select=":id",
        S_order=":updated_at,:id",
        S_limit=1000,
        S_where=f":updated_at > '{newest}'",
    )
    assert {r[":id"] for r in page} == (set(ins["ids"]) | set(edit["ids"])) - set(gone["ids"])
    assert query(fresh, PERSONS, S_select="count(*)") == [{"count": str(len(after))}]

    meta_before = httpx.get(f"{fresh.url}/api/views/{PERSONS}.json").json()["rowsUpdatedAt"]
    rep = fresh.replace(PERSONS)
    assert rep["updated_at"] > edit["updated_at"]
    assert rep["n"] == len(after)
    replaced = fresh.rows(PERSONS)
    assert {r[":updated_at"] for r in replaced} == {rep["updated_at"]}
    assert [strip(r, (":id", ":created_at")) for r in replaced] == [
        strip(after[r[":id"]], (":id", ":created_at")) for r in replaced
    ]
    meta_after = httpx.get(f"{fresh.url}/api/views/{PERSONS}.json").json()["rowsUpdatedAt"]
    assert meta_after >= meta_before
    page = query(
        fresh, PERSONS, S_select="count(*)", S_where=f":updated_at > '{edit['updated_at']}'"
    )
    assert page == [{"count": str(len(after))}]


def test_insert_into_an_empty_dataset_and_bad_admin_calls(fresh: FakeSoda) -> None:
    fresh.delete(GENERIC, 1000)
    assert query(fresh, GENERIC) == []
    fresh.insert(GENERIC, 3)
    assert len(query(fresh, GENERIC, S_order=":id")) == 3
    from tests.fake_soda import AdminError

    with pytest.raises(AdminError):
        fresh.insert("nope-nope", 1)
    with pytest.raises(AdminError):
        fresh.add_fault("teapot")


@pytest.mark.parametrize("over_http", [False, True], ids=["in_process", "admin_client"])
def test_columns_change_at_run_time(fresh: FakeSoda, over_http: bool) -> None:
    """Metadata, `$select=*`, JSON and CSV pages follow an added, dropped, retyped and moved
    column; existing rows keep their `:updated_at`; inserted and edited rows get values."""
    from tests.fake_soda import AdminError

    def meta() -> list[tuple[str, str]]:
        doc = httpx.get(f"{fresh.url}/api/views/{PERSONS}.json").json()
        return [(c["fieldName"], c["dataTypeName"]) for c in doc["columns"]]

    def pages() -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        params = {"S_select": "*,:id,:updated_at", "S_order": ":id", "S_limit": 5000}
        json_rows = query(fresh, PERSONS, **params)
        text = get(fresh, PERSONS, "csv", **params).text
        return json_rows, list(csv.DictReader(io.StringIO(text)))

    admin: Any = FakeSodaClient(fresh.url) if over_http else fresh
    before = {r[":id"]: r for r in fresh.rows(PERSONS)}
    admin.add_column(PERSONS, "weather", "text", 3)
    admin.drop_column(PERSONS, "ped_location")
    admin.retype_column(PERSONS, "person_age", "text")
    done = admin.move_column(PERSONS, "person_sex", 1)
    fields = [f for f, _ in meta()]
    assert [f for f, _ in done["columns"]] == fields
    assert fields[:4] == ["person_sex", "unique_id", "collision_id", "weather"]
    assert "ped_location" not in fields
    assert dict(meta())["person_age"] == "text"
    json_rows, csv_rows = pages()
    assert list(csv_rows[0]) == [*fields, ":id", ":updated_at"]
    for row, line in zip(json_rows, csv_rows, strict=True):
        old = before[row[":id"]]
        assert row[":updated_at"] == old[":updated_at"]
        assert "weather" not in row
        assert line["weather"] == ""
        assert "ped_location" not in row
        assert row.get("person_age") == old.get("person_age")
        assert (line["person_sex"] or None) == old.get("person_sex")
    ins = admin.insert(PERSONS, 30)
    edit = admin.edit(PERSONS, 30)
    after = {r[":id"]: r for r in fresh.rows(PERSONS)}
    touched = [after[i] for i in {*ins["ids"], *edit["ids"]}]
    assert all("ped_location" not in r for r in after.values())
    assert sum("weather" in r for r in touched) > len(touched) // 2
    assert any(not r["person_age"].isdigit() for r in touched if "person_age" in r)
    json_rows, csv_rows = pages()
    for row, line in zip(json_rows, csv_rows, strict=True):
        assert row.get("weather") == (line["weather"] or None)
    with pytest.raises(AdminError, match="not number"):
        admin.retype_column(PERSONS, "person_type", "number")
    with pytest.raises(AdminError, match="key"):
        admin.drop_column(PERSONS, "unique_id")
    with pytest.raises(AdminError, match="already has"):
        admin.add_column(PERSONS, "weather", "text")
    if over_http:
        admin.close()


# ----------------------------------------------------------------------------------------------
# Generated data


def test_generated_data_looks_real(rows: dict[str, Any]) -> None:
    crashes, persons = rows[CRASHES], rows[PERSONS]
    no_borough = sum("borough" not in r for r in crashes) / len(crashes)
    assert 0.25 < no_borough < 0.42
    assert any(re.fullmatch(r"[1-9]:\d\d", r["crash_time"]) for r in crashes)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT00:00:00\.000", r["crash_date"]) for r in crashes)
    with_loc = [r for r in crashes if "location" in r]
    assert all(r["location"]["latitude"] == r["latitude"] for r in with_loc)
    assert all(("latitude" in r) == ("location" in r) for r in crashes)
    streets = {r.get("on_street_name", "") for r in crashes}
    assert any("  " in s for s in streets)
    assert any(not s.isascii() for s in streets)
    assert all(re.fullmatch(r"row-[2-9a-z]{4}~[2-9a-z]{4}\.[2-9a-z]{4}", r[":id"]) for r in crashes)
    assert all(re.fullmatch(r"rv-[2-9a-z]{4}~[2-9a-z]{4}", r[":version"]) for r in crashes)
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r[":updated_at"]) for r in crashes
    )
    assert all(r[":created_at"] <= r[":updated_at"] for r in crashes)
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    assert all(uuid.fullmatch(r["person_id"]) for r in persons)
    keys = {r["collision_id"]: r for r in crashes}
    linked = [p for p in persons if p["collision_id"] in keys]
    assert len(linked) / len(persons) > 0.99
    assert all(p["crash_date"] == keys[p["collision_id"]]["crash_date"] for p in linked)
    per_crash = Counter(p["collision_id"] for p in persons)
    assert per_crash.most_common(1)[0][1] > 3


def test_same_seed_same_data() -> None:
    with FakeSoda(sizes=TINY, seed=3) as a, FakeSoda(sizes=TINY, seed=3) as b:
        assert a.rows(VEHICLES) == b.rows(VEHICLES)
    with FakeSoda(sizes=TINY, seed=4) as c:
        assert c.rows(VEHICLES) != a.rows(VEHICLES)


# ----------------------------------------------------------------------------------------------
# Subprocess mode


def test_subprocess_mode_and_admin_client(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "tests.fake_soda",
        "--port",
        "0",
        "--seed",
        "2",
        "--sizes",
        f"{CRASHES}=200,{PERSONS}=300,{VEHICLES}=100",
        "--token",
        "sub-token",
        "--cache",
        str(tmp_path / "cache"),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY http://127.0.0.1:"), line
        url = line.split()[1]
        r = httpx.get(
            f"{url}/resource/{CRASHES}.json",
            params={"$select": "count(*)"},
            headers={"X-App-Token": "sub-token"},
        )
        assert r.json() == [{"count": "200"}]
        with FakeSodaClient(url) as client:
            assert client.insert(CRASHES, 2)["n"] == 2
            client.add_fault("500", match=PERSONS)
            assert httpx.get(f"{url}/resource/{PERSONS}.json").status_code == 500
            assert len(client.rows(CRASHES)) == 202
            assert client.stats()["faults"] == {"500": 1}
            assert client.requests()[-1]["status"] == 500
            client.reset_stats()
            assert client.stats()["requests_total"] == 0
            with pytest.raises(Exception, match="unknown dataset"):
                client.edit("nope-nope", 1)
        assert list((tmp_path / "cache").iterdir())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0


def _rendered(
    dataset: str, n: int, select: str, patch: dict[int, dict[str, Any]]
) -> tuple[Any, Any]:
    """A page of `n` generated rows (some fields replaced per slot) and the server's renderer."""
    import random
    from dataclasses import replace

    import numpy as np
    import orjson

    from tests.fake_soda.engine import Renderer, execute, parse_query
    from tests.fake_soda.store import Registry

    sizes = {CRASHES: 200, PERSONS: 10, VEHICLES: 10, GENERIC: 10} | {dataset: n}
    snap = Registry(sizes, seed=7).snapshot(dataset)
    patched = dict(snap.patched)
    for slot, fields in patch.items():
        row = orjson.loads(b"{" + bytes(snap.inners(np.array([slot]))[0]) + b"}")
        patched[slot] = orjson.dumps(row | fields)[1:-1]
    snap = replace(snap, patched=patched)
    query = parse_query([("$select", select), ("$order", ":id"), ("$limit", "1000")], snap.schema)
    page = execute(query, snap, random.Random(1))
    return page, Renderer(snap, query, page.columns)


@pytest.mark.parametrize("dataset", [PERSONS, VEHICLES])
@pytest.mark.parametrize("select", ["*,:id,:created_at,:updated_at", ":*,*", ":id,unique_id"])
def test_csv_written_by_arrow_is_the_python_renderers_byte_for_byte(
    dataset: str, select: str
) -> None:
    """The server's Arrow CSV path (fast enough not to bound a CSV benchmark) against its
    cell-by-cell Python renderer, on generated rows and on rows with quotes, newlines, empty
    strings, non-ASCII text and numbers that `BigDecimal.toString` writes as `1E-7`."""
    from tests.fake_soda.schema import SCHEMAS

    columns = SCHEMAS[dataset].columns
    text = next(c.field for c in columns if c.soda_type == "text")
    number = next(c.field for c in columns if c.soda_type == "number" and c.field != "unique_id")
    tricky = ['say "hi", then\nleave', "", "  ÉLAN — 東京 ", '"', "a\r\nb"]
    tiny = ["0.0000001", "-0.00000010", "0.000001", "12"]
    patch = {
        slot: {text: tricky[slot % len(tricky)], number: tiny[slot % len(tiny)]}
        for slot in range(0, 40, 2)
    }
    page, renderer = _rendered(dataset, 500, select, patch)
    assert renderer.csv_fast
    assert page.slots is not None
    fast = renderer._csv_arrow(page.slots)  # None would mean the Python renderer is used
    renderer.csv_fast = False
    slow = renderer.csv_rows(page, 0, len(page))
    assert len(slow) == len(page) > 400
    assert fast == slow
    assert any(b"1E-7" in line for line in slow) == (select != ":id,unique_id")


def test_csv_of_a_value_arrow_cannot_take_falls_back_to_the_python_renderer() -> None:
    """A stored value that is not a JSON string (Arrow's reader refuses it) makes the server
    write the page cell by cell, the same bytes as ever."""
    page, renderer = _rendered(PERSONS, 300, "*,:id", {5: {"person_age": 41}})  # a JSON number
    lines = [line for a in range(0, len(page), 100) for line in renderer.csv_rows(page, a, a + 100)]
    assert not renderer.csv_fast  # Arrow gave up on the page
    _, python = _rendered(PERSONS, 300, "*,:id", {5: {"person_age": 41}})
    python.csv_fast = False
    assert lines == python.csv_rows(page, 0, len(page))
    assert len(lines) == len(page) == 300
