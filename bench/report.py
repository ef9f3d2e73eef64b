"""The results of one bench run: one row per (dataset, method), printed as a table and written to
bench/results/<timestamp>.md and .json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .check import Exactness
from .measure import Measurement

MIB = 1 << 20

COLUMNS = (
    "method",
    "rows",
    "wall s",
    "rows/s",
    "x threaded",
    "x limit",
    "requests",
    "MiB recv",
    "peak RSS MiB",
    "CPU s",
    "CPU s/M rows",
    "srv CPU s",
    "exact?",
)


@dataclass
class MethodResult:
    dataset: str
    method: str
    scale: float
    measurement: Measurement | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    server_cpu: float = 0.0
    exactness: Exactness | None = None
    limit: float | None = None  # the model's limit for the rows landed (None: no latency)
    rows: int = 0
    phases: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.measurement is not None and self.measurement.ok and not self.error

    @property
    def wall(self) -> float | None:
        return self.measurement.wall if self.ok and self.measurement else None

    def cpu_per_million(self) -> float | None:
        if not self.ok or not self.rows or self.measurement is None:
            return None
        return self.measurement.cpu / self.rows * 1e6

    def to_dict(self) -> dict[str, Any]:
        m = self.measurement
        return {
            "dataset": self.dataset,
            "method": self.method,
            "scale": self.scale,
            "ok": self.ok,
            "rows": self.rows,
            "wall_s": m.wall if m else None,
            "peak_rss_bytes": m.peak_rss if m else None,
            "cpu_s": m.cpu if m else None,
            "cpu_s_per_million_rows": self.cpu_per_million(),
            "returncode": m.returncode if m else None,
            "timed_out": m.timed_out if m else None,
            "cmd": m.cmd if m else None,
            "limit_s": self.limit,
            "server_stats": self.stats,
            "server_cpu_s": self.server_cpu,
            "exactness": self.exactness.to_dict() if self.exactness else None,
            "phases": self.phases,
            "note": self.note,
            "error": self.error,
            "stderr_tail": (m.stderr if m and not self.ok else ""),
        }


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def row_cells(r: MethodResult, threaded_wall: float | None) -> list[str]:
    m = r.measurement
    if not r.ok or m is None:
        status = "timeout" if m is not None and m.timed_out else "failed"
        why = r.error or (f"exit {m.returncode}" if m is not None else "not run")
        return [r.method, "-", _f(m.wall) if m else "-", "", "", "", "", "", "", "", "", "",
                f"{status}: {why}"[:60]]  # fmt: skip
    wall = m.wall
    update = r.method.startswith("ours update")  # a few rows: no speedup, no CPU per M rows
    speedup = threaded_wall / wall if threaded_wall and wall and not update else None
    ratio_limit = wall / r.limit if r.limit else None
    return [
        r.method,
        f"{r.rows:,}",
        _f(wall),
        f"{r.rows / wall:,.0f}" if wall else "-",
        _f(speedup, 2),
        _f(ratio_limit, 2),
        f"{r.stats.get('requests_total', 0):,}",
        _f(r.stats.get("bytes_sent", 0) / MIB),
        _f(m.peak_rss / MIB, 0),
        _f(m.cpu),
        _f(None if update else r.cpu_per_million()),
        _f(r.server_cpu),
        r.exactness.label() if r.exactness else "-",
    ]


def table(results: list[MethodResult], markdown: bool) -> str:
    threaded = next((r for r in results if r.method == "original-threaded" and r.ok), None)
    threaded_wall = threaded.wall if threaded else None
    rows = [list(COLUMNS)] + [row_cells(r, threaded_wall) for r in results]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |"]
        last = len(COLUMNS) - 1
        lines.append(
            "|" + "|".join("---" if i in (0, last) else "---:" for i in range(last + 1)) + "|"
        )
        lines += ["| " + " | ".join(cells) + " |" for cells in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    out = []
    for n, cells in enumerate(rows):
        text = "  ".join(
            c.ljust(widths[i]) if i in (0, len(COLUMNS) - 1) else c.rjust(widths[i])
            for i, c in enumerate(cells)
        )
        out.append(text.rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def summary(results: list[MethodResult], latency: bool) -> list[str]:
    """The issue's targets, checked where this run measured them."""
    by = {r.method: r for r in results if r.ok}
    ours = by.get("ours")
    lines: list[str] = []
    if ours is None or ours.measurement is None:
        return ["ours (defaults) did not complete: no target checks"]
    wall = ours.measurement.wall
    for other in ("original-threaded", "original-sequential", "offset-50k", "bare-keyset"):
        ref = by.get(other)
        if ref is not None and ref.measurement is not None:
            lines.append(f"ours vs {other}: {ref.measurement.wall / wall:.2f}x faster")
    if latency and ours.limit:
        ratio = wall / ours.limit
        verdict = "met" if ratio <= 1.15 else "NOT met"
        lines.append(
            f"ours / model limit: {ratio:.2f} (limit {ours.limit:.1f}s; target <= 1.15: {verdict})"
        )
    rss = ours.measurement.peak_rss / MIB
    lines.append(
        f"ours peak RSS: {rss:.0f} MiB (target <= 300 MiB: {'met' if rss <= 300 else 'NOT met'})"
    )
    orig = by.get("original-threaded") or by.get("original-sequential")
    ours_cpm, orig_cpm = ours.cpu_per_million(), orig.cpu_per_million() if orig else None
    if orig is not None and ours_cpm and orig_cpm:
        frac = ours_cpm / orig_cpm
        verdict = "met" if frac <= 0.1 else "NOT met"
        where = "" if not latency else " (measure it with --no-latency)"
        lines.append(
            f"CPU s per M rows: ours {ours_cpm:.1f} vs {orig.method} {orig_cpm:.1f} = "
            f"1/{1 / frac:.1f} (target <= 1/10: {verdict}){where}"
        )
    update = next((r for r in results if r.method.startswith("ours update") and r.ok), None)
    if update is not None and update.measurement is not None:
        u = update.measurement.wall
        lines.append(f"ours update: {u:.1f}s (target < 10s: {'met' if u < 10 else 'NOT met'})")
    s3 = by.get("ours s3")
    if s3 is not None and s3.measurement is not None:
        extra = s3.measurement.wall - wall
        lines.append(
            f"ours to S3 (moto) {s3.measurement.wall:.1f}s vs local {wall:.1f}s: "
            f"{extra:+.1f}s, {max(0.0, extra) / s3.measurement.wall:.0%} of the S3 wall time "
            "not overlapped with fetching"
        )
    for name in ("original-sequential", "original-threaded"):
        r = by.get(name)
        if r is not None and r.phases:
            p = r.phases
            lines.append(
                f"{name} phases: fetch {p.get('fetch_s', 0):.1f}s, DataFrame "
                f"{p.get('dataframe_s', 0):.1f}s, to_csv {p.get('csv_s', 0):.1f}s, "
                f"write/upload {p.get('upload_s', 0):.1f}s"
                + (f", {p['workers']} threads" if "workers" in p else "")
            )
    return lines


def memory_table(results: list[MethodResult], markdown: bool) -> str:
    head = ["scale", "dataset", "rows", "wall s", "peak RSS MiB", "CPU s", "exact?"]
    rows = [head]
    for r in results:
        m = r.measurement
        rows.append(
            [
                f"{r.scale:g}",
                r.dataset,
                f"{r.rows:,}" if r.ok else "-",
                _f(m.wall) if m else "-",
                _f(m.peak_rss / MIB, 0) if m and r.ok else "-",
                _f(m.cpu) if m and r.ok else "-",
                r.exactness.label() if r.exactness else (r.error or "failed")[:40],
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
        lines += ["| " + " | ".join(c) + " |" for c in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = ["  ".join(c.rjust(widths[i]) for i, c in enumerate(cells)) for cells in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
