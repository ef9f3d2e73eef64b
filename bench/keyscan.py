"""`python -m bench --keyscan`: verify, reconcile, status and export of a landed dataset.

For each dataset: a backfill with the defaults, one day's changes (inserts and edits, scaled
like `--update`) landed by `update`, then deletions at the source (1,500 at scale 1.0), then,
each as its own measured child process: `status`, `verify` (which must find the deletions),
`reconcile` (which must tombstone them), `status` again, `export` to CSV and to Parquet. The CSV
export is then checked against the server's rows (keys and sampled rows field by field).

Each step prints wall seconds, peak RSS, CPU and the load average of the machine just before
it (other work on a shared machine disturbs a figure: rerun it). For `verify` and `reconcile`,
`x limit` is wall / the model's limit for the rows their key scan fetches (every source row).

`--keyscan-code DIR` runs every command from the source tree DIR instead (e.g. an export of
another branch: `git archive main src | tar -x -C /tmp/main`, then `--keyscan-code /tmp/main/src`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .check import compare, load_truth, read_csv
from .measure import Measurement, run_measured
from .servers import FakeSodaServer

DELETIONS = 1500  # at scale 1.0, as in issue 17's figures


@dataclass
class Step:
    dataset: str
    name: str
    m: Measurement
    load: float
    fetched: int = 0  # rows the step's key scan fetches (for x limit)
    limit: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.m.wall / self.limit if self.limit else None

    def row(self) -> list[str]:
        ok = "ok" if self.m.ok else f"exit {self.m.returncode}"
        return [
            self.dataset,
            self.name,
            ok,
            f"{self.m.wall:,.1f}",
            f"{self.fetched:,}" if self.fetched else "",
            f"{self.limit:,.1f}" if self.limit else "",
            f"{self.ratio:.2f}" if self.ratio else "",
            f"{self.m.peak_rss / (1 << 20):,.0f}",
            f"{self.m.cpu:,.1f}",
            f"{self.load:.2f}",
            self.note,
        ]


HEADER = ["dataset", "step", "result", "wall s", "rows fetched", "limit s", "x limit",
          "peak RSS MiB", "CPU s", "load1", "note"]  # fmt: skip


def _markdown(steps: list[Step]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(s.row()) + " |" for s in steps]
    return "\n".join(lines)


def _text(steps: list[Step]) -> str:
    rows = [HEADER, *(s.row() for s in steps)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


class KeyscanBench:
    def __init__(
        self, args: argparse.Namespace, server: FakeSodaServer, work: Path, env: dict[str, str]
    ) -> None:
        self.args = args
        self.server = server
        self.work = work
        self.env = dict(env)
        if args.keyscan_code:
            code = str(Path(args.keyscan_code).resolve())
            self.env["PYTHONPATH"] = os.pathsep.join([code, self.env.get("PYTHONPATH", "")])
        self.steps: list[Step] = []
        self.nyc = [sys.executable, "-m", "nyc_collisions"]

    def _log(self, text: str) -> None:
        sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {text}\n")
        sys.stderr.flush()

    def step(self, ds: Any, name: str, args: list[str], fetched: int = 0, note: str = "") -> Step:
        load = os.getloadavg()[0]
        self._log(f"{ds.name}: {name} (load {load:.2f}) ...")
        m = run_measured(
            [*self.nyc, *args],
            cwd=self.work,
            env=self.env,
            timeout=self.args.timeout or 3600.0,
            log_dir=self.work / "logs",
            name=f"{ds.name}-keyscan-{name.replace(' ', '-')}",
        )
        latency = self.server.latency
        limit = latency.limit(fetched) if latency is not None and fetched else None
        s = Step(ds.name, name, m, load, fetched, limit, note)
        self.steps.append(s)
        self._log(
            f"{ds.name}: {name}: {'ok' if m.ok else f'exit {m.returncode}'}, {m.wall:.1f}s, "
            f"{m.peak_rss / (1 << 20):.0f} MiB"
            + (f", x{s.ratio:.2f} limit" if s.ratio else "")
            + (f"\n{m.stderr.strip()[-600:]}" if m.returncode not in (0, 1) else "")
        )
        return s

    def run(self, ds: Any) -> None:
        scale = self.args.scale
        dest = str(self.work / ds.name / "landing")
        where = ["--source", self.server.url, "--dest", dest]
        self.step(ds, "backfill", ["backfill", ds.name, *where, "--no-progress"])
        changes = max(1, round(ds.daily_changes * scale))
        inserts = max(1, round(changes * 0.8))
        self.server.admin("POST", "insert", {"dataset": ds.dataset_id, "n": inserts})
        self.server.admin("POST", "edit", {"dataset": ds.dataset_id, "n": changes - inserts})
        self.step(ds, "update", ["update", ds.name, *where], note=f"{changes:,} rows changed")
        deleted = max(1, round(DELETIONS * scale))
        self.server.admin("POST", "delete", {"dataset": ds.dataset_id, "n": deleted})
        rows = self.server.count(ds.dataset_id)
        self._log(f"{ds.name}: {deleted:,} rows deleted at the source; {rows:,} rows now")
        self.step(ds, "status", ["status", ds.name, "--json", *where])
        verify = self.step(ds, "verify", ["verify", ds.name, *where], rows)
        found = f"extra {deleted:,}," in verify.m.stdout
        verify.note = "found the deletions" if found else "DID NOT find the deletions"
        rec = self.step(ds, "reconcile", ["reconcile", ds.name, *where], rows)
        rec.note = (
            "tombstoned the deletions"
            if f"vanished {deleted:,}" in rec.m.stdout
            else "DID NOT tombstone the deletions"
        )
        status = self.step(ds, "status", ["status", ds.name, "--json", *where])
        try:
            agree = orjson.loads(status.m.stdout)[0]["agree"]
        except (orjson.JSONDecodeError, IndexError, KeyError, TypeError):
            agree = False
        status.note = {True: "agrees with the source", None: "not compared (no source count)"}.get(
            agree, "DIFFERS from the source"
        )
        out = self.work / ds.name
        export = ["export", ds.name, "--dest", dest, "-o"]
        csv = self.step(ds, "export csv", [*export, str(out / "x.csv")])
        self.step(ds, "export parquet", [*export, str(out / "x.parquet")])
        (out / "x.parquet").unlink(missing_ok=True)
        if csv.m.ok:
            self._log(f"{ds.name}: checking the export against the server's rows ...")
            truth = load_truth(self.server, ds.dataset_id, ds.key)
            exact = compare(truth, read_csv(out / "x.csv", ds.key, set(truth.sample)))
            csv.note = f"exact: {exact.label()}"
            (out / "x.csv").unlink(missing_ok=True)


def write(args: argparse.Namespace, run_id: str, steps: list[Step]) -> str:
    text = _text(steps)
    command = shlex.join(["python", "-m", "bench", *sys.argv[1:]])
    md = [f"# Key scan benchmark {run_id}", "", f"Command: `{command}`", "", _markdown(steps)]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{run_id}-keyscan.md").write_text("\n".join(md) + "\n")
    doc = {
        "run_id": run_id,
        "argv": sys.argv[1:],
        "code": args.keyscan_code,
        "steps": [
            {
                "dataset": s.dataset,
                "step": s.name,
                "wall_s": s.m.wall,
                "peak_rss_mib": s.m.peak_rss / (1 << 20),
                "cpu_s": s.m.cpu,
                "returncode": s.m.returncode,
                "load1": s.load,
                "rows_fetched": s.fetched,
                "limit_s": s.limit,
                "x_limit": s.ratio,
                "note": s.note,
                "stdout": s.m.stdout[-2000:],
                "stderr": s.m.stderr[-2000:],
            }
            for s in steps
        ],
    }
    (args.results / f"{run_id}-keyscan.json").write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    )
    return text + f"\nwritten: {args.results / f'{run_id}-keyscan.md'}\n"
