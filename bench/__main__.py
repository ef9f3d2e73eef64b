"""`python -m bench`: time the original design, two reference extractors and `nyc-collisions`
side by side, in one run, on one fake SODA server with the same generated data.

Each method runs as its own child process, measured from outside (wall, peak RSS, CPU), lands
into a fresh temporary folder, and is then checked against the server's own rows. See
bench/README.md for the latency model, the methods and how to read the table.

    python -m bench --scale 0.1
    python -m bench --scale 1.0 --skip original-sequential --update
    python -m bench --scale 0.1 --no-latency
    python -m bench --memory-scales 0.01,0.1
    python -m bench --capacity 1,2,3,4,6,8,12 --scales 0.1,0.3 --datasets crashes,persons
    python -m bench --scale 1.0 --datasets persons --keyscan
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import functools
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import orjson
import psutil

from .capacity import capacities, run_matrix, write_matrix
from .check import Landed, Truth, compare, load_truth, read_csv, read_json_pages
from .keyscan import KeyscanBench
from .keyscan import write as write_keyscan
from .measure import run_measured
from .report import MethodResult, memory_table, summary, table
from .servers import TOKEN, FakeSodaServer, LatencyModel, MotoS3Server

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    dataset_id: str
    key: str
    daily_changes: int  # rows changed on a typical day at scale 1.0


DATASETS = {
    "crashes": DatasetSpec("crashes", "h9gi-nx95", "collision_id", 1000),
    "persons": DatasetSpec("persons", "f55k-p6yu", "unique_id", 2600),
    "vehicles": DatasetSpec("vehicles", "bm4k-52h4", "unique_id", 2000),
}
BASE_METHODS = ("original-sequential", "original-threaded", "offset-50k", "bare-keyset", "ours")
DEFAULT_VARIANTS = "workers=1;workers=3;workers=6;page_size=25000;page_size=100000"
VARIANT_FLAGS = {
    "workers": "--workers",
    "page_size": "--page-size",
    "format": "--format",
    "file_rows": "--file-rows",
    "wire": "--wire",
    "table": "--table",
}
INSERT_SHARE = 0.8  # of a day's changes; the rest are edits of existing rows


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"bench: {message}\n")
    raise SystemExit(2)


def _log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    """`workers=1;workers=6,page_size=100000` -> [("ours workers=1", ["--workers", "1"]), ...]."""
    out: list[tuple[str, list[str]]] = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        flags: list[str] = []
        for item in spec.split(","):
            name, sep, value = item.strip().partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in VARIANT_FLAGS or not value.strip():
                _fail(f"bad variant {item!r}: use {', '.join(VARIANT_FLAGS)} as name=value")
            flags += [VARIANT_FLAGS[name], value.strip()]
        out.append((f"ours {spec.replace(' ', '')}", flags))
    return out


def _scales(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        _fail(f"bad --memory-scales {text!r}")
    if not values or any(v <= 0 for v in values):
        _fail("--memory-scales needs positive numbers")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scale", type=float, default=0.1, help="1.0 = real sizes (default 0.1)")
    p.add_argument(
        "--datasets", default="crashes", help="crashes,persons,vehicles (default crashes)"
    )
    p.add_argument("--no-latency", action="store_true", help="latency model off: CPU cost")
    p.add_argument("--base", type=float, default=0.15, help="s per data request (0.15)")
    p.add_argument("--per-row", type=float, default=1e-4, help="s per row returned (1e-4)")
    p.add_argument(
        "--per-skipped", type=float, default=1.7e-6, help="s per row skipped by $offset (1.7e-6)"
    )
    p.add_argument("--max-concurrent", type=int, default=3, help="requests served at once (3)")
    p.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"extra settings of ours, ';' between runs (default {DEFAULT_VARIANTS!r}; '' = none)",
    )
    p.add_argument("--parquet", action="store_true", help="also time ours with --format parquet")
    p.add_argument(
        "--skip",
        default="",
        help="methods to leave out, comma-separated: names as in the table, or 'variants'",
    )
    p.add_argument("--update", action="store_true", help="then mutate the source, time `update`")
    p.add_argument(
        "--update-scale",
        type=float,
        help="size of the day's changes relative to a real day (default: --scale)",
    )
    p.add_argument("--s3", action="store_true", help="originals upload to moto S3; + ours to S3")
    p.add_argument(
        "--memory-scales", type=_scales, help="only ours, at each scale: peak RSS per scale"
    )
    p.add_argument(
        "--capacity",
        type=capacities,
        help="only ours (defaults), once per server capacity: 1,2,3,4,6,8,12 (bench/capacity.py)",
    )
    p.add_argument("--scales", type=_scales, help="with --capacity: the scales (default --scale)")
    p.add_argument(
        "--keyscan",
        action="store_true",
        help="instead: verify, reconcile, status, export after an update and deletions",
    )
    p.add_argument("--keyscan-code", type=Path, help="with --keyscan: run this source tree's code")
    p.add_argument("--timeout", type=float, help="seconds per child (default max(600, 3ms/row))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-cache", type=Path, help="the fake server's data cache folder")
    p.add_argument("--work-dir", type=Path, help="where temporary landings go (default: /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the landed data and logs")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write .md/.json")
    args = p.parse_args(argv)
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in names if d not in DATASETS]
    if unknown or not names:
        _fail(f"unknown dataset(s) {unknown}: choose from {', '.join(DATASETS)}")
    args.dataset_specs = [DATASETS[d] for d in dict.fromkeys(names)]
    if args.scale <= 0:
        _fail("--scale must be positive")
    variants = parse_variants(args.variants)
    if args.parquet:
        variants.append(("ours format=parquet", ["--format", "parquet"]))
    args.variant_list = variants
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    known = {*BASE_METHODS, "variants", "ours s3", *(name for name, _ in variants)}
    for s in args.skip_set - known:
        _log(f"warning: --skip {s!r} matches no method ({', '.join(sorted(known))})")
    return args


@functools.cache
def _nyc_collisions() -> list[str]:
    """The command that runs the tool, its modules' bytecode compiled first, as `pip install`
    leaves them: run from a checkout where PYTHONDONTWRITEBYTECODE is set, each run would
    compile every module as it starts (0.08 s on this machine, a third of the imports)."""
    import nyc_collisions

    compileall.compile_dir(Path(nyc_collisions.__file__).parent, quiet=1)
    exe = shutil.which("nyc-collisions")
    if exe:
        return [exe]
    return [sys.executable, "-c", "from nyc_collisions.__main__ import main; main()"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The bench's environment minus proxies (traffic stays on 127.0.0.1), plus the app token."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env["SOCRATA_APP_TOKEN"] = TOKEN
    env.pop("NYC_COLLISIONS_DEST", None)
    env.pop("SOCRATA_BASE_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


class Bench:
    """One server, a set of datasets, the methods: run, measure, check, collect."""

    def __init__(
        self,
        args: argparse.Namespace,
        server: FakeSodaServer,
        work: Path,
        moto: MotoS3Server | None,
        run_id: str,
    ) -> None:
        self.args = args
        self.server = server
        self.work = work
        self.logs = work / "logs"
        self.moto = moto
        self.run_id = run_id
        self.latency = server.latency
        self.env = child_env(moto.env() if moto else None)
        self.results: list[MethodResult] = []
        self.sizes: dict[str, int] = {}
        self.nyc = _nyc_collisions()

    # -- helpers ---------------------------------------------------------------------------

    def _timeout(self, rows: int) -> float:
        return float(self.args.timeout or max(600.0, 3e-3 * rows))

    def _skipped(self, method: str) -> bool:
        skip = self.args.skip_set
        if method in skip:
            return True
        return "variants" in skip and method.startswith("ours ") and method != "ours update"

    def _measure(
        self, ds: DatasetSpec, method: str, cmd: list[str], rows: int, tag: str = ""
    ) -> MethodResult:
        self.server.reset_stats()
        cpu0 = self.server.cpu_seconds()
        _log(f"{ds.name}: {method}{tag} ...")
        m = run_measured(
            cmd,
            cwd=ROOT,
            env=self.env,
            timeout=self._timeout(rows),
            log_dir=self.logs,
            name=f"{ds.name}-{_slug(method)}",
        )
        r = MethodResult(
            ds.name,
            method,
            self.args.scale,
            measurement=m,
            stats=self.server.stats(),
            server_cpu=self.server.cpu_seconds() - cpu0,
        )
        for line in reversed(m.stdout.splitlines()):
            if line.startswith("{"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    r.phases = orjson.loads(line)
                break
        if m.timed_out:
            r.error = f"timed out after {self._timeout(rows):.0f}s"
        elif m.returncode != 0:
            last = (m.stderr.strip().splitlines() or [f"exit {m.returncode}"])[-1]
            r.error = f"exit {m.returncode}: {last}"
        return r

    def _check(self, r: MethodResult, truth: Truth, landed: Landed) -> None:
        r.exactness = compare(truth, landed)
        r.rows = r.exactness.rows
        if self.latency is not None:
            r.limit = self.latency.limit(truth.rows)
        ok = "ok" if r.ok else f"FAILED ({r.error})"
        wall = r.measurement.wall if r.measurement else 0.0
        _log(f"{r.dataset}: {r.method}: {ok}, {wall:.1f}s, exact: {r.exactness.label()}")

    def _finish(self, r: MethodResult) -> MethodResult:
        if not r.ok:
            _log(f"{r.dataset}: {r.method}: FAILED: {r.error}")
        self.results.append(r)
        return r

    def _cleanup(self, path: Path) -> None:
        if not self.args.keep:
            shutil.rmtree(path, ignore_errors=True)

    def _export(
        self, ds: DatasetSpec, dest: str, out: Path, r: MethodResult, rows: int
    ) -> Path | None:
        """`nyc-collisions export` of a landing (not part of the timing)."""
        target = out / "export.csv"
        cmd = [*self.nyc, "export", ds.name, "--dest", dest, "--output", str(target)]
        m = run_measured(
            cmd,
            cwd=ROOT,
            env=self.env,
            timeout=self._timeout(rows),
            log_dir=self.logs,
            name=f"{ds.name}-{_slug(r.method)}-export",
        )
        r.phases["export_s"] = round(m.wall, 3)
        if not m.ok:
            r.error = "export failed: " + (m.stderr.strip().splitlines() or ["?"])[-1]
            return None
        return target

    # -- methods ---------------------------------------------------------------------------

    def original(self, ds: DatasetSpec, truth: Truth, mode: str) -> None:
        method = f"original-{mode}"
        if self._skipped(method):
            return
        out = self.work / ds.name / _slug(method)
        out.mkdir(parents=True, exist_ok=True)
        local = out / "landed.csv"
        cmd = [sys.executable, "-m", "bench.original", mode, "--url", self.server.url]
        cmd += ["--dataset", ds.dataset_id, "--token", TOKEN]
        key = f"collisions_raw_data/{self.run_id}/{ds.name}-{method}.csv"
        if self.moto is not None:
            cmd += ["--s3-bucket", self.moto.BUCKET, "--s3-key", key]
        else:
            cmd += ["--out", str(local)]
        r = self._measure(ds, method, cmd, truth.rows)
        if r.ok:
            if self.moto is not None:
                client = self.moto.client()
                client.download_file(self.moto.BUCKET, key, str(local))
                client.delete_object(Bucket=self.moto.BUCKET, Key=key)
            self._check(r, truth, read_csv(local, ds.key, set(truth.sample)))
        self._finish(r)
        self._cleanup(out)

    def reference(self, ds: DatasetSpec, truth: Truth, method: str) -> None:
        if self._skipped(method):
            return
        out = self.work / ds.name / _slug(method)
        kind = "offset" if method == "offset-50k" else "keyset"
        cmd = [sys.executable, "-m", "bench.clients", kind, "--url", self.server.url]
        cmd += ["--dataset", ds.dataset_id, "--token", TOKEN, "--out", str(out)]
        r = self._measure(ds, method, cmd, truth.rows)
        if r.ok:
            sample = set(truth.sample)
            if kind == "offset":
                landed = read_csv(out / f"{ds.dataset_id}.csv", ds.key, sample)
            else:
                landed = read_json_pages(out, ds.key, sample)
            self._check(r, truth, landed)
        self._finish(r)
        self._cleanup(out)

    def ours(
        self, ds: DatasetSpec, truth: Truth, method: str, flags: list[str], keep: bool = False
    ) -> tuple[MethodResult, str, Path]:
        out = self.work / ds.name / _slug(method)
        out.mkdir(parents=True, exist_ok=True)
        if method == "ours s3" and self.moto is not None:
            dest = f"s3://{self.moto.BUCKET}/bench-{self.run_id}/{ds.name}"
        else:
            dest = str(out / "landing")
        cmd = [*self.nyc, "backfill", ds.name, "--source", self.server.url, "--dest", dest]
        cmd += ["--no-progress", *flags]
        r = self._measure(ds, method, cmd, truth.rows)
        if r.ok:
            exported = self._export(ds, dest, out, r, truth.rows)
            if exported is not None:
                self._check(r, truth, read_csv(exported, ds.key, set(truth.sample)))
                exported.unlink()
        self._finish(r)
        if not keep:
            self._cleanup(out)
        return r, dest, out

    def update(self, ds: DatasetSpec, dest: str, out: Path) -> None:
        scale = self.args.update_scale if self.args.update_scale is not None else self.args.scale
        changes = max(1, round(ds.daily_changes * scale))
        inserts = max(1, round(changes * INSERT_SHARE))
        edits = max(0, changes - inserts)
        _log(f"{ds.name}: mutating the source: {inserts:,} inserts, {edits:,} edits")
        added = self.server.admin("POST", "insert", {"dataset": ds.dataset_id, "n": inserts})
        edited = (
            self.server.admin("POST", "edit", {"dataset": ds.dataset_id, "n": edits})
            if edits
            else {"keys": []}
        )
        changed = [int(k) for k in (*added["keys"], *edited["keys"])]
        truth = load_truth(self.server, ds.dataset_id, ds.key, extra_keys=changed)
        method = "ours update"
        cmd = [*self.nyc, "update", ds.name, "--source", self.server.url, "--dest", dest]
        r = self._measure(ds, method, cmd, len(changed), tag=f" (+{inserts:,} new, ~{edits:,})")
        r.note = f"{inserts:,} inserted + {edits:,} edited rows; exact = the whole current state"
        r.phases.update(inserted=inserts, edited=edits)
        if r.ok:
            exported = self._export(ds, dest, out, r, truth.rows)
            if exported is not None:
                r.exactness = compare(truth, read_csv(exported, ds.key, set(truth.sample)))
                _log(f"{ds.name}: {method}: {r.measurement.wall if r.measurement else 0:.1f}s, "
                     f"exact: {r.exactness.label()}")  # fmt: skip
        r.rows = len(changed)
        if self.latency is not None:
            r.limit = self.latency.limit(len(changed))
        self._finish(r)

    # -- a dataset -------------------------------------------------------------------------

    def run_dataset(self, ds: DatasetSpec) -> None:
        _log(f"{ds.name}: reading the server's rows (the truth) ...")
        truth = load_truth(self.server, ds.dataset_id, ds.key)
        _log(f"{ds.name}: {truth.rows:,} rows")
        self.sizes[ds.name] = truth.rows
        self.original(ds, truth, "sequential")
        self.original(ds, truth, "threaded")
        self.reference(ds, truth, "offset-50k")
        self.reference(ds, truth, "bare-keyset")
        default: tuple[MethodResult, str, Path] | None = None
        if not self._skipped("ours") or self.args.update:
            default = self.ours(ds, truth, "ours", [], keep=self.args.update)
        for method, flags in self.args.variant_list:
            if not self._skipped(method):
                self.ours(ds, truth, method, flags)
        if self.moto is not None and not self._skipped("ours s3"):
            self.ours(ds, truth, "ours s3", [])
        if self.args.update and default is not None:
            r, dest, out = default
            if r.ok:
                self.update(ds, dest, out)
            else:
                _log(f"{ds.name}: no update: the default backfill failed")
            self._cleanup(out)


# -- the run -----------------------------------------------------------------------------------


def startup_cost(work: Path) -> dict[str, float]:
    """What starting our CLI costs before any work (`nyc-collisions --version`): it is in every
    `ours` row, and dominates the CPU per million rows at small scales."""
    m = run_measured(
        [*_nyc_collisions(), "--version"],
        cwd=ROOT,
        env=child_env(),
        timeout=60,
        log_dir=work / "logs",
        name="ours-startup",
    )
    return {"wall_s": m.wall, "cpu_s": m.cpu, "peak_rss_mib": m.peak_rss / (1 << 20)}


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_results(
    args: argparse.Namespace,
    run_id: str,
    results: list[MethodResult],
    latency: LatencyModel | None,
    sizes: dict[str, int],
    interrupted: bool,
    startup: dict[str, float],
) -> tuple[str, Path]:
    lines: list[str] = [f"# Benchmark run {run_id}", ""]
    lines.append(f"Command: `{shlex.join(['python', '-m', 'bench', *sys.argv[1:]])}`" + "  ")
    env = environment()
    lines.append(
        f"Machine: {env['cpus']} CPUs, {env['memory_gib']} GiB, Python {env['python']}, "
        f"{env['platform']}" + "  "
    )
    if latency is None:
        lines.append("Latency model: off (CPU cost only)")
    else:
        lines.append(
            f"Latency model: {latency.base}s per data request + {latency.per_row * 1e3:g} ms per "
            f"row returned + {latency.per_skipped * 1e6:g} µs per row skipped by $offset, "
            f"{latency.max_concurrent} requests served at once. "
            f"Limit = rows x {latency.per_row:g} / {latency.max_concurrent} + {latency.base} s."
        )
    if interrupted:
        lines += ["", "**Interrupted: partial results.**"]
    text_parts: list[str] = []
    memory_mode = bool(args.memory_scales)
    if memory_mode:
        lines += ["", "## Peak RSS of ours (defaults) per scale", "", memory_table(results, True)]
        text_parts += [memory_table(results, False)]
        for ds in args.dataset_specs:
            peaks = [
                (r.scale, r.measurement.peak_rss / (1 << 20))
                for r in results
                if r.dataset == ds.name and r.ok and r.measurement is not None
            ]
            if len(peaks) > 1:
                (s0, p0), (s1, p1) = peaks[0], peaks[-1]
                note = (
                    f"{ds.name}: peak RSS {p0:.0f} MiB at scale {s0:g} -> {p1:.0f} MiB at scale "
                    f"{s1:g} (x{p1 / p0:.2f} for x{s1 / s0:g} the rows)"
                )
                lines += ["", f"- {note}"]
                text_parts.append(note)
    for ds in args.dataset_specs:
        if memory_mode:
            break
        part = [r for r in results if r.dataset == ds.name]
        if not part:
            continue
        title = f"{ds.name} ({ds.dataset_id}), scale {args.scale:g}: {sizes.get(ds.name, 0):,} rows"
        lines += ["", f"## {title}", "", table(part, True), ""]
        notes = summary(part, latency is not None)
        if startup:
            notes.append(
                f"ours startup alone (nyc-collisions --version): {startup['wall_s']:.1f}s wall, "
                f"{startup['cpu_s']:.2f} CPU s, {startup['peak_rss_mib']:.0f} MiB"
            )
        lines += [f"- {s}" for s in notes]
        text_parts += [title, table(part, False), *(f"  {s}" for s in notes), ""]
    lines += [
        "",
        "Columns: `x threaded` = original-threaded wall / this wall (speedup); `x limit` = this "
        "wall / the model's limit; MiB recv = bytes the server sent (gzip on the wire); peak RSS "
        "of the child's process tree; CPU = user+sys of the child; srv CPU = the fake server's "
        "CPU during the method (it shares the machine).",
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    md = args.results / f"{run_id}.md"
    md.write_text("\n".join(lines) + "\n")
    doc = {
        "run_id": run_id,
        "argv": sys.argv[1:],
        "interrupted": interrupted,
        "settings": {
            "scale": args.scale,
            "memory_scales": args.memory_scales,
            "datasets": [d.name for d in args.dataset_specs],
            "latency": None if latency is None else latency.__dict__,
            "limit_formula": "rows * per_row / max_concurrent + base",
            "variants": [name for name, _ in args.variant_list],
            "skip": sorted(args.skip_set),
            "update": args.update,
            "s3": args.s3,
        },
        "sizes": sizes,
        "environment": env,
        "ours_startup": startup,
        "results": [r.to_dict() for r in results],
    }
    (args.results / f"{run_id}.json").write_bytes(
        orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    return "\n".join(text_parts), md


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    latency = None
    if not args.no_latency:
        latency = LatencyModel(args.base, args.per_row, args.per_skipped, args.max_concurrent)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"nyc-bench-{run_id}-", dir=args.work_dir))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)  # also when started with SIGINT ignored
    results: list[MethodResult] = []
    sizes: dict[str, int] = {}
    servers: list[FakeSodaServer | MotoS3Server] = []
    interrupted = False
    startup: dict[str, float] = {}
    if args.capacity:
        return _matrix(args, run_id, work)
    try:
        startup = startup_cost(work)
        moto = None
        if args.s3 and not args.memory_scales:
            _log("starting moto's S3 server ...")
            moto = MotoS3Server(work / "logs").start()
            servers.append(moto)
        for scale in args.memory_scales or [args.scale]:
            server = FakeSodaServer(
                ROOT, work / "logs", scale, latency, args.seed, args.server_cache
            )
            _log(f"starting the fake SODA server at scale {scale:g} ...")
            servers.append(server.start())
            _log(f"fake SODA server at {server.url}")
            args.scale = scale
            bench = Bench(args, server, work, moto, run_id)
            if args.keyscan:
                ks = KeyscanBench(args, server, work, child_env())
                try:
                    for ds in args.dataset_specs:
                        ks.run(ds)
                finally:
                    sys.stdout.write("\n" + write_keyscan(args, run_id, ks.steps))
                    server.stop()
                    servers.remove(server)
                continue
            try:
                for ds in args.dataset_specs:
                    if args.memory_scales:
                        truth = load_truth(server, ds.dataset_id, ds.key)
                        bench.sizes[ds.name] = truth.rows
                        r, _, _ = bench.ours(ds, truth, "ours", [])
                        if not r.rows and r.exactness is None:
                            r.rows = truth.rows
                    else:
                        bench.run_dataset(ds)
            finally:
                results += bench.results
                sizes.update(bench.sizes)
                server.stop()
                servers.remove(server)
        if args.memory_scales:
            args.scale = args.memory_scales[0]
    except KeyboardInterrupt:
        interrupted = True
        _log("interrupted: stopping the servers")
    finally:
        for s in servers:
            s.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            _log(f"kept the landings and logs in {work}")
    if args.keyscan:
        return 130 if interrupted else 0
    text, md = write_results(args, run_id, results, latency, sizes, interrupted, startup)
    sys.stdout.write("\n" + text + "\n")
    sys.stdout.write(f"written: {md} and {md.with_suffix('.json')}\n")
    return 130 if interrupted else (0 if results and all(r.ok for r in results) else 1)


def _matrix(args: argparse.Namespace, run_id: str, work: Path) -> int:
    """`--capacity`: the capacity matrix (bench/capacity.py)."""
    if args.no_latency:
        _fail("--capacity needs the latency model")
    args.scales = args.scales or [args.scale]
    results: list[MethodResult] = []
    interrupted = False
    try:
        run_matrix(
            args, lambda server: Bench(args, server, work, None, run_id), ROOT, work, _log, results
        )
    except KeyboardInterrupt:
        interrupted = True
        _log("interrupted")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text, md = write_matrix(args, run_id, results, interrupted)
    sys.stdout.write("\n" + text + "\n" + f"written: {md} and {md.with_suffix('.json')}\n")
    return 130 if interrupted else (0 if results and all(r.ok for r in results) else 1)


if __name__ == "__main__":
    raise SystemExit(main())
