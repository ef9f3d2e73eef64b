"""`python -m bench.table`: Delta Lake (delta-rs) against Apache Iceberg (pyiceberg) on the same
work, for the query-ready table of issue 19 (docs/design-table.md).

For each dataset: land it at full size from the fake SODA server (no latency model: the table
work is local), then time, each in its own child process measured from outside (wall, peak RSS):

1. write: the whole current state into a new table (streamed);
2. merge: one day's changes (inserts and edits, and deletions that `reconcile` lands as
   tombstones), landed by `update` and `reconcile`, merged by key into the full-size table;
3. replace: the publisher replaces every row; `update` lands a fresh snapshot, which
   overwrites the table.

Delta goes through `nyc_collisions.table.sync_table`, the code the commands run; Iceberg through
pyiceberg with a SQLite catalog, the same change set applied as one transaction (a delete of
the changed keys, then an append: pyiceberg's `upsert` is the slow path the issue warns of).

    python -m bench.table --scale 1.0 --datasets crashes,persons
    python -m bench.table --scale 0.05          # a quick look
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from .measure import run_measured
from .servers import FakeSodaServer

ROOT = Path(__file__).resolve().parent.parent
DAILY = {"crashes": 1000, "persons": 2600, "vehicles": 2000}  # rows changed a day at scale 1.0
IDS = {"crashes": "h9gi-nx95", "persons": "f55k-p6yu", "vehicles": "bm4k-52h4"}
ICEBERG_MARK = "iceberg-bench-mark.json"
CHUNK_ROWS = 500_000


# -- children: one table operation each ------------------------------------------------------


def _landed(dest: str, name: str) -> Any:
    from nyc_collisions.current import open_landed
    from nyc_collisions.datasets import resolve
    from nyc_collisions.sink.storage import open_storage

    return open_landed(open_storage(dest), resolve(name))


def child_delta(dest: str, name: str) -> None:
    from nyc_collisions.datasets import resolve
    from nyc_collisions.sink.storage import open_storage
    from nyc_collisions.table import sync_table

    sync = sync_table(open_storage(dest), resolve(name))
    assert sync is not None
    print(
        orjson.dumps({"action": sync.action, "rows": sync.rows, "deleted": sync.deleted}).decode()
    )


def _iceberg_schema(typed: pa.Schema) -> pa.Schema:
    """Iceberg keeps microseconds: the landed ms timestamps widen."""
    fields = []
    for f in typed:
        t = f.type
        if pa.types.is_timestamp(t):
            t = pa.timestamp("us", tz=t.tz)
        fields.append(pa.field(f.name, t))
    return pa.schema(fields)


def _iceberg_table(dest: str, name: str, create: pa.Schema | None = None) -> Any:
    from pyiceberg.catalog.sql import SqlCatalog

    folder = Path(dest, name, "iceberg-bench")
    folder.mkdir(parents=True, exist_ok=True)
    catalog = SqlCatalog(
        "bench", uri=f"sqlite:///{folder}/catalog.db", warehouse=f"file://{folder}/warehouse"
    )
    catalog.create_namespace_if_not_exists("nyc")
    ident = f"nyc.{name}"
    if create is not None:
        if catalog.table_exists(ident):
            catalog.drop_table(ident)
        return catalog.create_table(ident, schema=create)
    return catalog.load_table(ident)


def child_iceberg(dest: str, name: str, step: str) -> None:
    from pyiceberg.expressions import AlwaysTrue, In

    from nyc_collisions.current import iter_current
    from nyc_collisions.table import Mark, _changes, _pending, table_schema
    from nyc_collisions.table_write import DELETE_FLAG

    landed = _landed(dest, name)
    schema = _iceberg_schema(landed.schema.typed_schema())
    mark_path = Path(dest, name, ICEBERG_MARK)
    if step == "merge":
        table = _iceberg_table(dest, name)
        mark = Mark.from_json(mark_path.read_text())
        assert mark is not None
        pending = _pending(landed, mark)
        assert pending is not None, "the table reflects another snapshot"
        changes = _changes(landed, pending, table_schema(landed))
        key = landed.key_column
        keys = changes.column(key).to_pylist()
        upserts = changes.filter(pa.compute.invert(changes.column(DELETE_FLAG)))
        upserts = upserts.drop_columns([DELETE_FLAG]).cast(schema)
        with table.transaction() as tx:
            tx.delete(In(key, keys))
            tx.append(upserts)
        rows, deleted = upserts.num_rows, changes.num_rows - upserts.num_rows
    else:
        table = _iceberg_table(dest, name, schema if step == "write" else None)
        rows = deleted = 0
        with table.transaction() as tx:
            if step == "replace":
                tx.delete(AlwaysTrue())
            chunk: list[pa.Table] = []
            held = 0
            for text in iter_current(landed):
                chunk.append(landed.schema.to_typed(text).cast(schema))
                held += text.num_rows
                if held >= CHUNK_ROWS:
                    tx.append(pa.concat_tables(chunk))
                    rows, chunk, held = rows + held, [], 0
            if chunk:
                tx.append(pa.concat_tables(chunk))
                rows += held
    mark_path.write_text(Mark.of(landed).to_json())
    print(orjson.dumps({"action": step, "rows": rows, "deleted": deleted}).decode())


# -- the driver ------------------------------------------------------------------------------


def _cli(*args: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "nyc_collisions", *args], check=True, cwd=ROOT)
    return time.monotonic() - started


def _measure(work: Path, name: str, cmd: list[str]) -> dict[str, Any]:
    m = run_measured(
        cmd, cwd=ROOT, env=dict(os.environ), timeout=1800, log_dir=work / "logs", name=name
    )
    if m.returncode != 0:
        raise SystemExit(f"{name} failed: {m.stderr[-2000:]}")
    out = orjson.loads(m.stdout.strip().splitlines()[-1])
    return {"wall": round(m.wall, 2), "peak_mib": round(m.peak_rss / 2**20), **out}


def run_dataset(
    srv: FakeSodaServer,
    work: Path,
    name: str,
    scale: float,
    formats: list[str],
    inserts_only: bool = False,
) -> Any:
    from tests.fake_soda import FakeSodaClient

    dest = str(work / "land")
    admin = FakeSodaClient(srv.url)
    src = ["--source", srv.url, "--dest", dest]
    results: dict[str, Any] = {"backfill_s": round(_cli("backfill", name, *src), 1)}
    changes = max(10, int(DAILY[name] * scale))
    for step in ("write", "merge") if inserts_only else ("write", "merge", "replace"):
        if step == "merge" and inserts_only:  # new rows only: they fall in no file of the table
            admin.insert(IDS[name], changes)
            results["update_s"] = round(_cli("update", name, *src), 1)
        elif step == "merge":
            admin.insert(IDS[name], changes * 8 // 10)
            admin.edit(IDS[name], changes * 2 // 10)
            admin.delete(IDS[name], changes // 10)
            results["update_s"] = round(_cli("update", name, *src), 1)
            results["reconcile_s"] = round(_cli("reconcile", name, *src), 1)
        elif step == "replace":
            admin.replace(IDS[name])
            results["refresh_s"] = round(_cli("update", name, *src), 1)
        for fmt in formats:
            mod = [sys.executable, "-m", "bench.table", "--child", fmt, dest, name, step]
            results[f"{fmt}_{step}"] = r = _measure(work, f"{name}-{fmt}-{step}", mod)
            print(f"{name} {fmt} {step}: {r}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--datasets", default="crashes,persons")
    parser.add_argument("--formats", default="delta,iceberg")
    parser.add_argument("--work", default=None, help="folder to land in (default: a temp one)")
    parser.add_argument(
        "--inserts-only",
        action="store_true",
        help="the day's changes are new rows only (write and merge, no replace)",
    )
    parser.add_argument("--child", nargs=4, metavar=("FORMAT", "DEST", "DATASET", "STEP"))
    args = parser.parse_args()
    if args.child:
        from nyc_collisions.runtime import tune_allocators

        tune_allocators()  # as the command does
        fmt, dest, name, step = args.child
        if fmt == "delta":
            child_delta(dest, name)
        else:
            child_iceberg(dest, name, step)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-table-"))
    formats = args.formats.split(",")
    results = {}
    cache = Path(tempfile.gettempdir(), "nyc-bench-cache")
    srv = FakeSodaServer(ROOT, work / "logs", args.scale, None, cache=cache).start()
    try:
        for name in args.datasets.split(","):
            results[name] = run_dataset(srv, work, name, args.scale, formats, args.inserts_only)
    finally:
        srv.stop()
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
