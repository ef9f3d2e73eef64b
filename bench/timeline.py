"""`python -m bench.timeline`: where one backfill's time goes, read from the fake server's side.

Runs `nyc-collisions backfill DATASET` with its defaults (arguments it does not know are passed
on, e.g. `--workers 4`) against a fake SODA server with the latency model and `--capacity`
slots, `--runs` times, and reads the server's request log after each. A request's slot time is
what the model charges it (0.15 s + 0.1 ms a row sent + 1.7 us a row skipped by `$offset`); the
rest of `capacity x` the span from the first request to the last page is idle slots. Per run:
wall / model limit, the time before the first request (process start, imports, setup) and
after the last page (closing requests, the commit), when the ranges' last pages ended, the slot
seconds of small requests (probes, counts, metadata) and of the pages' first bytes, the idle
slot seconds, and when each probe ended.

Needs the `bench` extra. Nothing is checked here: it is a reading aid for bench/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .__main__ import ROOT, _nyc_collisions, child_env
from .servers import FakeSodaServer, LatencyModel


def _kind(entry: dict[str, Any]) -> str:
    params = entry.get("params") or {}
    select = params.get("$select", "")
    if entry.get("kind") != "data":
        return "metadata"
    if "count(" in select:
        return "count"
    if "max(" in select:
        return "max"
    if "$offset" in params:
        return "probe"
    return "page"


def _charge(entry: dict[str, Any], model: LatencyModel) -> float:
    params = entry.get("params") or {}
    skipped = int(params.get("$offset", 0) or 0)
    return model.base + entry.get("rows", 0) * model.per_row + skipped * model.per_skipped


def _upper(entry: dict[str, Any]) -> str:
    where = (entry.get("params") or {}).get("$where", "")
    return where.split("<=")[1].strip() if "<=" in where else ""


def analyse(log: list[dict[str, Any]], began: float, ended: float, model: LatencyModel) -> str:
    """One run's line from the server's request log (wall clock `time` at each answer's end)."""
    reqs = sorted(
        ((float(e["time"]) - float(e["seconds"]), float(e["time"]), _kind(e), e) for e in log),
        key=lambda r: r[0],
    )
    pages = [r for r in reqs if r[2] == "page"]
    if not pages:
        return "no page reached the server"
    wall = ended - began
    limit = model.limit(sum(r[3].get("rows", 0) for r in pages))
    first = reqs[0][0]
    probes = " ".join(f"{r[1] - first:.1f}" for r in reqs if r[2] == "probe")
    ends: dict[str, float] = {}  # a range's last page, by its upper bound
    for r in pages:
        ends[_upper(r[3])] = max(ends.get(_upper(r[3]), 0.0), r[1])
    last = max(ends.values())
    busy = sum(_charge(r[3], model) for r in reqs)
    small = sum(_charge(r[3], model) for r in reqs if r[2] != "page")
    idle = model.max_concurrent * (last - first) - busy
    return (
        f"wall {wall:5.2f} s = {wall / limit:4.2f} x limit {limit:5.2f} s | before the first "
        f"request {first - began:4.2f} s, after the last page {ended - last:4.2f} s | ranges "
        f"ended from {min(ends.values()) - first:.1f} to {last - first:.1f} s | slot s: small "
        f"requests {small:4.2f}, page first bytes {model.base * len(pages):4.2f}, idle "
        f"{max(0.0, idle):5.2f} | {len(pages)} pages; probes ended at {probes}"
    )


def requests_table(log: list[dict[str, Any]]) -> str:
    """Every request of one run, in the order they began: start and end (seconds from the first
    request), kind, rows sent, `$offset`, `$limit`, `$order` and `$where`."""
    reqs = sorted(log, key=lambda e: float(e["time"]) - float(e["seconds"]))
    if not reqs:
        return ""
    first = float(reqs[0]["time"]) - float(reqs[0]["seconds"])
    lines = []
    for e in reqs:
        params = e.get("params") or {}
        end = float(e["time"]) - first
        lines.append(
            f"  {end - float(e['seconds']):6.2f} {end:6.2f} {_kind(e):8} {e.get('rows', 0):7} "
            f"{params.get('$offset', '-'):>7} {params.get('$limit', '-'):>7} "
            f"{params.get('$order', '')} {params.get('$where', '')}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__)
    p.add_argument("--scale", type=float, default=0.3)
    p.add_argument("--capacity", type=int, default=8)
    p.add_argument("--dataset", default="crashes", choices=["crashes", "persons", "vehicles"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--server-cache", type=Path)
    p.add_argument("--requests", action="store_true", help="also print every request")
    args, extra = p.parse_known_args()
    model = LatencyModel(max_concurrent=args.capacity)
    work = Path(tempfile.mkdtemp(prefix="nyc-timeline-"))
    server = FakeSodaServer(ROOT, work / "logs", args.scale, model, cache=args.server_cache)
    server.start()
    try:
        for run in range(args.runs):
            dest = work / f"run{run}"
            server.reset_stats()
            cmd = [*_nyc_collisions(), "backfill", args.dataset, "--source", server.url]
            cmd += ["--dest", str(dest), "--no-progress", *extra]
            began = time.time()
            done = subprocess.run(cmd, env=child_env(), capture_output=True, check=False)
            ended = time.time()
            if done.returncode:
                sys.exit(f"run {run}: exit {done.returncode}: {done.stderr.decode()[-500:]}")
            log = server.admin("GET", "requests")
            print(f"run {run}: {analyse(log, began, ended, model)}", flush=True)
            if args.requests:
                print(requests_table(log), flush=True)
            shutil.rmtree(dest, ignore_errors=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
