"""`python -m bench --capacity 1,2,3,4,6,8,12 --scales 0.1,0.3`: our backfill with default flags
against sources that serve different numbers of requests at once.

For each scale and each capacity, one fake SODA server with the latency model and
`--max-concurrent CAPACITY`; for each dataset, `nyc-collisions backfill` with its defaults as a
child process (wall, peak RSS, CPU measured from outside), then `export` and the exactness check.
Each cell prints wall / model limit, wall / the model's limit at the polite ceiling (a capacity
above the ceiling, 8 by default, is left unused by design), the concurrency the run settled on,
how many ranges it split,
the fake server's CPU during the run (it shares the machine: with many slots it can become the
limit) and the load average before and after (other processes share the machine too).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from nyc_collisions.socrata.setup import max_concurrency

from .check import load_truth
from .report import MIB, MethodResult
from .servers import FakeSodaServer, LatencyModel

if TYPE_CHECKING:
    from .__main__ import Bench

HEAD = (
    "scale",
    "capacity",
    "dataset",
    "rows",
    "wall s",
    "limit s",
    "x limit",
    "x ceiling limit",
    "peak RSS MiB",
    "CPU s",
    "srv CPU s",
    "settled",
    "splits",
    "requests",
    "load",
    "exact?",
)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"bench: {what} needs positive whole numbers, not {text!r}")
    return values


def capacities(text: str) -> list[int]:
    return _ints(text, "--capacity")


SUMMARY = re.compile(r"concurrency: settled at (\d+) requests? in flight.*?; (\d+) ranges? split")


def _settled(stdout: str) -> tuple[str, str]:
    m = SUMMARY.search(stdout)
    return (m.group(1), m.group(2)) if m else ("-", "-")


def run_matrix(
    args: argparse.Namespace,
    make_bench: Any,
    root: Path,
    work: Path,
    log: Any,
    results: list[MethodResult],
) -> None:
    """Every (scale, capacity, dataset) cell into `results`; `make_bench(server)` gives a
    `Bench`."""
    for scale in args.scales:
        for capacity in args.capacity:
            latency = LatencyModel(args.base, args.per_row, args.per_skipped, capacity)
            server = FakeSodaServer(
                root, work / "logs", scale, latency, args.seed, args.server_cache
            )
            log(f"scale {scale:g}, capacity {capacity}: starting the fake SODA server ...")
            server.start()
            try:
                args.scale = scale
                bench: Bench = make_bench(server)
                for ds in args.dataset_specs:
                    truth = load_truth(server, ds.dataset_id, ds.key)
                    before = os.getloadavg()[0]
                    r, _, _ = bench.ours(ds, truth, f"ours capacity={capacity}", [])
                    r.phases.update(capacity=capacity, load=(before, os.getloadavg()[0]))
                    # what a client that keeps to the polite ceiling can do at best
                    polite = replace(latency, max_concurrent=min(capacity, max_concurrency()))
                    r.phases["ceiling_limit"] = polite.limit(r.rows) if r.ok else None
                    if r.measurement is not None:
                        r.phases["settled"], r.phases["splits"] = _settled(r.measurement.stdout)
                    results.append(r)
            finally:
                server.stop()


def _cells(r: MethodResult) -> list[str]:
    m = r.measurement
    ok = r.ok and m is not None
    wall = m.wall if ok and m else None
    load = r.phases.get("load", (0.0, 0.0))
    polite = r.phases.get("ceiling_limit")
    return [
        f"{r.scale:g}",
        str(r.phases.get("capacity", "?")),
        r.dataset,
        f"{r.rows:,}" if ok else "-",
        f"{wall:.1f}" if wall else "-",
        f"{r.limit:.1f}" if r.limit else "-",
        f"{wall / r.limit:.2f}" if wall and r.limit else "-",
        f"{wall / polite:.2f}" if wall and polite else "-",
        f"{m.peak_rss / MIB:.0f}" if ok and m else "-",
        f"{m.cpu:.1f}" if ok and m else "-",
        f"{r.server_cpu:.1f}",
        str(r.phases.get("settled", "-")),
        str(r.phases.get("splits", "-")),
        f"{r.stats.get('requests_total', 0):,}",
        f"{load[0]:.1f}/{load[1]:.1f}",
        r.exactness.label() if r.exactness else (r.error or "failed")[:50],
    ]


def matrix_table(results: list[MethodResult], markdown: bool) -> str:
    rows = [list(HEAD)] + [_cells(r) for r in results]
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---:|" * (len(HEAD) - 1) + "---|"]
        out += ["| " + " | ".join(c) + " |" for c in rows[1:]]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    text = ["  ".join(c.rjust(widths[i]) for i, c in enumerate(cells)) for cells in rows]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def write_matrix(
    args: argparse.Namespace, run_id: str, results: list[MethodResult], interrupted: bool
) -> tuple[str, Path]:
    worst = [
        r.measurement.wall / r.limit
        for r in results
        if r.ok and r.measurement is not None and r.limit
    ]
    rss = [r.measurement.peak_rss / MIB for r in results if r.ok and r.measurement is not None]
    notes = []
    if worst:
        notes.append(f"worst wall / model limit: {max(worst):.2f} (target <= 1.10)")
    if rss:
        notes.append(f"highest peak RSS: {max(rss):.0f} MiB (target <= 300)")
    if interrupted:
        notes.append("interrupted: partial results")
    command = shlex.join(["python", "-m", "bench", *sys.argv[1:]])
    lines = [f"# Capacity matrix {run_id}", "", f"Command: `{command}`", ""]
    lines += [matrix_table(results, True), ""] + [f"- {n}" for n in notes]
    args.results.mkdir(parents=True, exist_ok=True)
    md = args.results / f"{run_id}-capacity.md"
    md.write_text("\n".join(lines) + "\n")
    doc = {"run_id": run_id, "argv": sys.argv[1:], "results": [r.to_dict() for r in results]}
    md.with_suffix(".json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return "\n".join([matrix_table(results, False), *notes]), md
