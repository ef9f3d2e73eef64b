"""Two reference extractors the bench times next to ours (run as children of the bench).

`offset`: a generic offset-paging extractor, as dlt's rest_api or ingestr configure one for a
Socrata endpoint: 50,000-row pages by `$offset`, ordered by `:id`, one request at a time; each page
is parsed (orjson) and appended to one CSV file (csv module, columns from the metadata), so memory
is bounded by one page. It stops at the first page shorter than the limit.

`keyset`: the "bare copying client" of the performance issue: keyset pages (`$select=:*,*`,
`$order=:id`, `$where=:id > 'last'`, 50,000 rows) over 3 concurrent streams, partitioned by probing
the `:id` at 1/3 and 2/3 of the count. Each page body is copied to its own file as received
(decompressed, unparsed); the only things read from it are the number of rows (one per line in
SODA's JSON) and the last `:id` (found from the end of the body).

    python -m bench.clients offset --url URL --dataset ID --out DIR
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

PAGE_SIZE = 50_000
STREAMS = 3
ATTEMPTS = 5
T = TypeVar("T")


def _client(url: str, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=url,
        headers={"X-App-Token": token, "Accept-Encoding": "gzip"},
        timeout=httpx.Timeout(600.0, connect=10.0),
        trust_env=False,
    )


def _retry(fn: Callable[[], T]) -> T:
    for attempt in range(ATTEMPTS):
        try:
            return fn()
        except (httpx.TransportError, httpx.HTTPStatusError):
            if attempt == ATTEMPTS - 1:
                raise
            time.sleep(min(30.0, 2.0**attempt))
    raise AssertionError("unreachable")


def _get_json(http: httpx.Client, path: str, params: dict[str, Any]) -> Any:
    def once() -> Any:
        resp = http.get(path, params=params)
        resp.raise_for_status()
        return orjson.loads(resp.content)

    return _retry(once)


# -- offset ------------------------------------------------------------------------------------


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value


def offset_extract(url: str, token: str, dataset_id: str, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    requests = rows = 0
    with _client(url, token) as http:
        meta = _get_json(http, f"/api/views/{dataset_id}.json", {})
        fields = [c["fieldName"] for c in meta["columns"]]
        requests += 1
        with (out / f"{dataset_id}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(fields)
            offset = 0
            while True:
                params = {"$order": ":id", "$limit": str(PAGE_SIZE), "$offset": str(offset)}
                page = _get_json(http, f"/resource/{dataset_id}.json", params)
                requests += 1
                writer.writerows([_cell(row.get(name)) for name in fields] for row in page)
                rows += len(page)
                if len(page) < PAGE_SIZE:
                    break
                offset += PAGE_SIZE
    return {"rows": rows, "requests": requests}


# -- bare keyset -------------------------------------------------------------------------------

_ID_MARK = b'":id":"'


def _last_id(tail: bytes) -> str | None:
    i = tail.rfind(_ID_MARK)
    if i < 0:
        return None
    start = i + len(_ID_MARK)
    end = tail.index(b'"', start)
    return tail[start:end].decode()


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _copy_partition(
    url: str,
    token: str,
    dataset_id: str,
    out: Path,
    index: int,
    lower: str | None,
    upper: str | None,
) -> tuple[int, int]:
    rows = requests = seq = 0
    after = lower
    with _client(url, token) as http:
        while True:
            where = []
            if after is not None:
                where.append(f":id > {_quote(after)}")
            if upper is not None:
                where.append(f":id <= {_quote(upper)}")
            params = {"$select": ":*,*", "$order": ":id", "$limit": str(PAGE_SIZE)}
            if where:
                params["$where"] = " AND ".join(where)
            path = out / f"part-{index}-{seq:05d}.json"

            def once(params: dict[str, str] = params, path: Path = path) -> tuple[int, bytes]:
                n = 0
                tail = b""
                with (
                    http.stream("GET", f"/resource/{dataset_id}.json", params=params) as resp,
                    path.open("wb") as f,
                ):
                    resp.raise_for_status()
                    for chunk in resp.iter_bytes():
                        f.write(chunk)
                        n += chunk.count(b"\n")
                        tail = (tail + chunk)[-65536:]
                return n, tail

            n, tail = _retry(once)
            requests += 1
            seq += 1
            rows += n
            if n < PAGE_SIZE:
                break
            after = _last_id(tail)
            if after is None:
                raise RuntimeError(f"no :id at the end of {path}")
    return rows, requests


def keyset_copy(url: str, token: str, dataset_id: str, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    with _client(url, token) as http:
        count = int(
            _get_json(http, f"/resource/{dataset_id}.json", {"$select": "count(*) AS n"})[0]["n"]
        )
        step = -(-count // STREAMS)
        probes = [k * step - 1 for k in range(1, STREAMS) if k * step - 1 < count]

        def probe(offset: int) -> str | None:
            params = {"$select": ":id", "$order": ":id", "$limit": "1", "$offset": str(offset)}
            page = _get_json(http, f"/resource/{dataset_id}.json", params)
            return str(page[0][":id"]) if page else None

        with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
            found = list(pool.map(probe, probes))
    cuts: list[str] = []
    for b in found:
        if b is not None and b not in cuts:
            cuts.append(b)
    edges: list[str | None] = [None, *cuts, None]
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        futures = [
            pool.submit(_copy_partition, url, token, dataset_id, out, i, edges[i], edges[i + 1])
            for i in range(len(edges) - 1)
        ]
        done = [f.result() for f in futures]
    return {
        "rows": sum(r for r, _ in done),
        "requests": 1 + len(probes) + sum(q for _, q in done),
        "partitions": len(edges) - 1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.clients", description=__doc__)
    p.add_argument("method", choices=["offset", "keyset"])
    p.add_argument("--url", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--token", default="good-token")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    started = time.monotonic()
    run = offset_extract if args.method == "offset" else keyset_copy
    result = run(args.url, args.token, args.dataset, args.out)
    result["execution_s"] = time.monotonic() - started
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
