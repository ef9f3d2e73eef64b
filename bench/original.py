"""The original design's two mass-upload methods, re-implemented from the seed guide
(shared/reference/seed-ingestion-guide.md, scripts `bruteForce_mass_upload.py` and
`multiThread_mass_upload.py`), pointed at the fake server.

Kept as the guide has them, weaknesses included: sodapy, `COUNT(*)` first, 5,000-row pages by
`$offset` ordered by `collision_id` (not unique in persons/vehicles), every row in one list, one
`pd.DataFrame.from_records`, one `df.to_csv(index=False)` string encoded to bytes, one upload
(`put_object` to S3 with `--s3-bucket`, else the same bytes written to a local file). The threaded
method submits every page at once to a `ThreadPoolExecutor()` with its default worker count.

Run as a child of the bench: `python -m bench.original threaded --url URL --dataset ID --out F`.
Prints one JSON line of phase timings on stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
import pandas as pd
from sodapy import Socrata

CHUNK_SIZE = 5000
CLIENT_TIMEOUT = 100


def socrata_client(url: str, app_token: str) -> Socrata:
    """sodapy builds `https://{domain}{path}`; the fake server speaks plain HTTP on loopback."""
    parts = urlsplit(url)
    client = Socrata(parts.netloc, app_token)
    client.uri_prefix = f"{parts.scheme}://"
    return client


def get_total_record_count(client: Socrata, dataset_name: str) -> int:
    record_count = client.get(dataset_name, select="COUNT(*)")
    return int(record_count[0]["COUNT"])


def fetch_data_chunk(offset: int, chunk_size: int, client: Socrata, dataset_name: str) -> Any:
    return client.get(dataset_name, limit=chunk_size, offset=offset, order="collision_id")


def get_api_records_sequential(client: Socrata, dataset_name: str, phases: dict[str, Any]) -> Any:
    """bruteForce_mass_upload.get_api_records."""
    t0 = time.monotonic()
    start = 0
    chunk_size = CHUNK_SIZE
    client.timeout = CLIENT_TIMEOUT
    results: list[dict[str, Any]] = []
    number_of_requests_sent = 0
    total_records = get_total_record_count(client, dataset_name)
    while True:
        results.extend(
            client.get(dataset_name, offset=start, limit=chunk_size, order="collision_id")
        )
        start += chunk_size
        if start > total_records:
            break
        number_of_requests_sent += 1
    t1 = time.monotonic()
    df = pd.DataFrame.from_records(results)
    phases.update(
        fetch_s=t1 - t0,
        dataframe_s=time.monotonic() - t1,
        total_records=total_records,
        requests=number_of_requests_sent,
    )
    return df


def get_api_records_threaded(client: Socrata, dataset_name: str, phases: dict[str, Any]) -> Any:
    """multiThread_mass_upload.get_api_records."""
    t0 = time.monotonic()
    chunk_size = CHUNK_SIZE
    client.timeout = CLIENT_TIMEOUT
    total_records = get_total_record_count(client, dataset_name)
    with concurrent.futures.ThreadPoolExecutor() as executor:
        futures = []
        start = 0
        number_of_requests_sent = 0
        while start < total_records:
            futures.append(
                executor.submit(fetch_data_chunk, start, chunk_size, client, dataset_name)
            )
            start += chunk_size
            number_of_requests_sent = number_of_requests_sent + 1
        results: list[dict[str, Any]] = []
        for future in concurrent.futures.as_completed(futures):
            chunk = future.result()
            if chunk:
                results.extend(chunk)
        workers = executor._max_workers
    t1 = time.monotonic()
    df = pd.DataFrame.from_records(results)
    phases.update(
        fetch_s=t1 - t0,
        dataframe_s=time.monotonic() - t1,
        total_records=total_records,
        requests=number_of_requests_sent,
        workers=workers,
    )
    return df


def upload_dataframe(df: Any, args: argparse.Namespace, phases: dict[str, Any]) -> None:
    """upload_dataframe_to_s3: one CSV string, encoded, one put_object (or one local write)."""
    t0 = time.monotonic()
    csv_buffer = df.to_csv(index=False)
    body = csv_buffer.encode("utf-8")
    t1 = time.monotonic()
    if args.s3_bucket:
        import boto3

        client = boto3.client("s3")
        client.put_object(Bucket=args.s3_bucket, Key=args.s3_key, Body=body)
    else:
        with open(args.out, "wb") as f:
            f.write(body)
    phases.update(csv_s=t1 - t0, upload_s=time.monotonic() - t1, csv_bytes=len(body))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.original", description=__doc__)
    p.add_argument("method", choices=["sequential", "threaded"])
    p.add_argument("--url", required=True, help="http://127.0.0.1:PORT of the fake server")
    p.add_argument("--dataset", required=True, help="dataset id, e.g. h9gi-nx95")
    p.add_argument("--token", default="good-token")
    p.add_argument("--out", help="local CSV file to write")
    p.add_argument("--s3-bucket")
    p.add_argument("--s3-key")
    args = p.parse_args(argv)
    if not args.out and not args.s3_bucket:
        p.error("give --out or --s3-bucket/--s3-key")

    phases: dict[str, Any] = {"method": args.method}
    started = time.monotonic()
    client = socrata_client(args.url, args.token)
    if args.method == "sequential":
        df = get_api_records_sequential(client, args.dataset, phases)
    else:
        df = get_api_records_threaded(client, args.dataset, phases)
    phases["rows"] = len(df)
    upload_dataframe(df, args, phases)
    phases["execution_s"] = time.monotonic() - started
    sys.stdout.write(orjson.dumps(phases).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
