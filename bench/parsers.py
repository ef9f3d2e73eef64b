"""`python -m bench.parsers`: CPU seconds per million rows of each JSON reader on crash pages.

Crashes must come as JSON (CSV loses their `location`'s `human_address`), so their CPU per
million rows is bounded below by what it costs to inflate and read SODA's JSON. This fetches
one 50,000-row keyset page of crashes (and, to compare, of persons as JSON and as CSV) from a
fake SODA server started here, then times every reader that is installed on the same bytes:
the best of `--repeat` runs of `time.process_time()` (all threads), per million rows.

Readers: gzip inflate (ISA-L, as the client does; zlib), Arrow's JSON reader (with and without
threads, as `pages.parse_rows_fast` calls it), orjson, and, when installed (they are not
dependencies of the project), polars' `read_ndjson`, DuckDB's `read_json`, arro3-io's
`read_json` and msgspec; and this tool's native converter (`_jsoncsv`), which goes from the JSON
straight to the landed CSV. Arrow's CSV reader on the persons page shows what the CSV wire costs.
Last, the tool's own page parsers on the same crashes page, with their checks: the Arrow path
(`pages.parse_page_fast`) and the page stream to landed CSV rows (`pages.PageStream`, native).

    pip install polars duckdb arro3-io msgspec   # optional, to compare them too
    python -m bench.parsers
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
from isal import isal_zlib

from .servers import FakeSodaServer

ROWS = 50_000
CRASHES, PERSONS = "h9gi-nx95", "f55k-p6yu"
SELECT = "*,:id,:created_at,:updated_at"


def metadata(url: str, dataset: str) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=600, trust_env=False) as client:
        response = client.get(f"/api/views/{dataset}.json")
        response.raise_for_status()
        doc: dict[str, Any] = response.json()
        return doc


def fetch(url: str, dataset: str, fmt: str) -> bytes:
    """One page's body as sent (gzip), read raw."""
    params = {"$select": SELECT, "$order": ":id", "$limit": str(ROWS)}
    headers = {"Accept-Encoding": "gzip"}
    with (
        httpx.Client(base_url=url, headers=headers, timeout=600, trust_env=False) as client,
        client.stream("GET", f"/resource/{dataset}.{fmt}", params=params) as response,
    ):
        response.raise_for_status()
        return b"".join(response.iter_raw())


def ndjson(body: bytes) -> bytes:
    """SODA's `[{..}\\n,{..}\\n]` as one object per line (what the client hands Arrow)."""
    inner = bytearray(body[body.find(b"[") + 1 : body.rfind(b"]")])
    view = np.frombuffer(inner, np.uint8)
    commas = np.flatnonzero(view[1:] == ord(","))
    view[commas[view[commas] == ord("\n")] + 1] = ord(" ")
    return bytes(inner)


def arrow_schema(lines: bytes) -> pa.Schema:
    keys: set[str] = set()
    for line in lines.splitlines()[:5000]:
        if line.strip():
            keys |= set(orjson.loads(line))
    location = pa.struct([(m, pa.string()) for m in ("human_address", "latitude", "longitude")])
    return pa.schema(
        [pa.field(k, location if k == "location" else pa.string()) for k in sorted(keys)]
    )


def readers(
    body_gz: bytes, csv_gz: bytes, meta: dict[str, Any], tmp: Path
) -> dict[str, Callable[[], Any]]:
    body = isal_zlib.decompress(body_gz, 16 + isal_zlib.MAX_WBITS)
    lines = ndjson(body)
    schema = arrow_schema(lines)
    path = tmp / "page.ndjson"
    path.write_bytes(lines)

    def arrow_json(threads: bool) -> Callable[[], Any]:
        return lambda: pajson.read_json(
            pa.BufferReader(lines),
            read_options=pajson.ReadOptions(block_size=4 << 20, use_threads=threads),
            parse_options=pajson.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="error"
            ),
        )

    out: dict[str, Callable[[], Any]] = {
        "inflate crashes JSON (isal)": lambda: isal_zlib.decompress(body_gz, 31),
        "inflate crashes JSON (zlib)": lambda: zlib.decompress(body_gz, 31),
        "Arrow read_json, threads": arrow_json(True),
        "Arrow read_json, one thread": arrow_json(False),
        "orjson.loads (Python objects)": lambda: orjson.loads(body),
    }
    if importlib.util.find_spec("polars"):
        import polars as pl

        struct = pl.Struct({m: pl.String for m in ("human_address", "latitude", "longitude")})
        pschema = {f.name: struct if f.name == "location" else pl.String for f in schema}
        out["polars read_ndjson"] = lambda: pl.read_ndjson(io.BytesIO(lines), schema=pschema)
    if importlib.util.find_spec("duckdb"):
        import duckdb

        con = duckdb.connect()
        loc = "STRUCT(human_address VARCHAR, latitude VARCHAR, longitude VARCHAR)"
        cols = ", ".join(
            f"'{f.name}': '{loc if f.name == 'location' else 'VARCHAR'}'" for f in schema
        )
        query = f"SELECT * FROM read_json('{path}', format='newline_delimited', columns={{{cols}}})"
        out["DuckDB read_json"] = lambda: con.sql(query).to_arrow_table()
    if importlib.util.find_spec("arro3") and importlib.util.find_spec("arro3.io"):
        import arro3.io as aio

        out["arro3-io read_json"] = lambda: pa.table(
            pa.RecordBatchReader.from_stream(aio.read_json(io.BytesIO(lines), schema))
        )
    if importlib.util.find_spec("msgspec"):
        import msgspec

        decoder = msgspec.json.Decoder()
        out["msgspec decode (Python objects)"] = lambda: decoder.decode(body)

    if importlib.util.find_spec("nyc_collisions._jsoncsv"):
        from nyc_collisions import _jsoncsv

        fields = tuple(f.name for f in schema if f.name != ":version")
        kinds = bytes(f == "location" for f in fields)
        inner = body[body.find(b"[") + 1 : body.rfind(b"]")]
        ids = fields.index(":id")
        out["native JSON -> landed CSV (this tool's _jsoncsv)"] = lambda: _jsoncsv.convert(
            inner, fields, kinds, (":version",), ids, fields.index(":updated_at")
        )

    csv_body = isal_zlib.decompress(csv_gz, 31)
    header, _, rows = csv_body.partition(b"\n")
    names = [n.strip('"') for n in header.decode().split(",")]

    def arrow_csv(include: list[str] | None) -> Callable[[], Any]:
        options = pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            include_columns=include or [],
        )
        read = pacsv.ReadOptions(column_names=names, block_size=len(rows) + 1)
        parse = pacsv.ParseOptions(newlines_in_values=True)
        return lambda: pacsv.read_csv(
            pa.py_buffer(rows), read_options=read, parse_options=parse, convert_options=options
        )

    out["persons CSV: inflate (isal)"] = lambda: isal_zlib.decompress(csv_gz, 31)
    out["persons CSV: Arrow read_csv, all columns"] = arrow_csv(None)
    out["persons CSV: Arrow read_csv, :id only (pass-through check)"] = arrow_csv([":id"])
    out.update(tool_pages(body, meta))
    return out


def tool_pages(body: bytes, meta: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """This tool's own parsers of the crashes page, checks included."""
    from nyc_collisions import pages
    from nyc_collisions.datasets import KNOWN
    from nyc_collisions.schema import Schema

    schema = Schema.from_metadata(KNOWN["crashes"], meta)

    def stream() -> None:
        page = pages.PageStream(schema, lambda table: None, lambda rows: None)
        for at in range(0, len(body), 1 << 16):
            page.feed(body[at : at + (1 << 16)])
        page.finish()

    return {
        "crashes page, Arrow path (pages.parse_page_fast)": lambda: pages.parse_page_fast(
            body, schema
        ),
        "crashes page -> landed CSV rows (pages.PageStream, native)": stream,
    }


def best_cpu(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.parsers", description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="nyc-parsers-") as tmp:
        with FakeSodaServer(root, Path(tmp) / "logs", scale=0.03, latency=None) as server:
            crashes = fetch(server.url, CRASHES, "json")
            persons_csv = fetch(server.url, PERSONS, "csv")
            meta = metadata(server.url, CRASHES)
        print(f"one page of {ROWS:,} rows; CPU seconds per million rows, best of {args.repeat}")
        for name, fn in readers(crashes, persons_csv, meta, Path(tmp)).items():
            seconds = best_cpu(fn, args.repeat)
            print(f"  {name:58s} {seconds * 1e6 / ROWS:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
