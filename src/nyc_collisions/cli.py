"""The command line: parse options, call the orchestrator, print. Errors become one clear line."""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click
import orjson
from click.core import ParameterSource

from . import __version__, settings
from .current import open_landed
from .datasets import resolve, resolve_many
from .drift import summary_text
from .errors import CTRL_C_LINE, Interrupted, NycCollisionsError, UsageError
from .extract import (
    DEFAULT_FILE_ROWS,
    DEFAULT_PAGE_SIZE,
    DEFAULT_WORKERS,
    DatasetResult,
    RunOptions,
    backfill,
)
from .report import dataset_status, orphans
from .runtime import tune_allocators
from .sink.s3 import UploadStats
from .sink.storage import DEFAULT_LOCAL_DEST, Storage, open_storage
from .socrata.client import DEFAULT_BASE_URL, WIRES, RetryPolicy, SodaClient
from .socrata.source import DatasetSource
from .verify import columns_changed, verify

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger("nyc_collisions")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} TiB"


class _EnvError(click.ClickException):
    """A bad environment variable found while the options are read: one line, exit 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"nyc-collisions: error: {self.message}", err=True)


def _or_env(read: Callable[[], Any], meta: str | None = None) -> Callable[..., Any]:
    """Option callback: the value given, else `read()` (a checked environment variable, or the
    default); also kept in `ctx.meta[meta]` for options the commands do not take as arguments."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if param.name and ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT:
            try:
                value = read()
            except UsageError as exc:
                raise _EnvError(str(exc)) from None
        if meta:
            ctx.meta[meta] = value
        return value

    return callback


def common(f: F) -> F:
    """Options every command takes: where the source and the destination are, how loud to be."""
    f = click.option(
        "--source",
        envvar="SOCRATA_BASE_URL",
        default=DEFAULT_BASE_URL,
        show_default=True,
        metavar="URL",
        help="Socrata base URL (env SOCRATA_BASE_URL). The app token is read from "
        "the environment variable SOCRATA_APP_TOKEN.",
    )(f)
    f = click.option(
        "--allow-http",
        is_flag=True,
        expose_value=False,
        callback=_or_env(lambda: settings.env_flag(settings.ALLOW_HTTP), "allow_http"),
        help="Allow a plain http:// --source on another machine (env "
        "NYC_COLLISIONS_ALLOW_HTTP=1): the app token and the data would travel unencrypted.",
    )(f)
    f = click.option(
        "--dest",
        envvar="NYC_COLLISIONS_DEST",
        default=DEFAULT_LOCAL_DEST,
        show_default=True,
        metavar="DEST",
        help="s3://bucket/prefix or a local folder (env NYC_COLLISIONS_DEST).",
    )(f)
    f = click.option(
        "-v",
        "--verbose",
        count=True,
        help="Log each request and file (-v), or debug (-vv), to stderr.",
    )(f)
    f = click.option(
        "--retries",
        type=click.IntRange(1, 100),
        default=10,
        show_default=True,
        callback=_or_env(lambda: settings.env_int(settings.RETRIES, 10, 1, 100)),
        help="Attempts per request before giving up (env NYC_COLLISIONS_RETRIES).",
    )(f)
    f = click.option(
        "--timeout",
        type=click.FloatRange(min=0.1),
        default=120.0,
        show_default=True,
        expose_value=False,
        callback=lambda ctx, _param, value: ctx.meta.__setitem__("timeout", value),
        help="Seconds the source may stay silent before the request is retried.",
    )(f)
    f = click.option(
        "--wire",
        type=click.Choice(list(WIRES), case_sensitive=False),
        default="auto",
        show_default=True,
        expose_value=False,
        callback=_or_env(lambda: settings.env_choice(settings.WIRE, "auto", WIRES), "wire"),
        help="How rows come from the source: auto = CSV for datasets whose columns CSV "
        "carries exactly (persons, vehicles), JSON otherwise (crashes' location); env "
        "NYC_COLLISIONS_WIRE.",
    )(f)
    return f


def key_option(help_text: str) -> Callable[[F], F]:
    """`--key FIELD`: the unique key of a dataset given by id (the manifest's key once landed)."""
    return click.option("--key", default=None, metavar="FIELD", help=help_text)


def _table_format(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from .table import TABLE_ENV, check_table_format

    try:
        if value is not None:
            return check_table_format(value, "--table")
        return check_table_format(os.environ.get(TABLE_ENV), TABLE_ENV)
    except UsageError as exc:
        raise _EnvError(str(exc)) from None


def table_option(f: F) -> F:
    """`--table FORMAT`: keep DEST/<dataset>/table/ equal to the current state (table.py)."""
    return click.option(
        "--table",
        default=None,
        metavar="FORMAT",
        callback=_table_format,
        help="Also keep DEST/<dataset>/table/ equal to the current state as a table of this "
        "format: delta (env NYC_COLLISIONS_TABLE; needs the [table] extra).",
    )(f)


LANDED_KEY_HELP = "The dataset's unique key; if given, it must be the key it was landed with."


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)


def _client(source: str, retries: int, workers: int = DEFAULT_WORKERS) -> SodaClient:
    ctx = click.get_current_context(silent=True)
    timeout = float(ctx.meta.get("timeout", 120.0)) if ctx else 120.0
    wire = str(ctx.meta.get("wire", "auto")) if ctx else "auto"
    return SodaClient(
        source,
        wire=wire,
        app_token=os.environ.get("SOCRATA_APP_TOKEN") or None,
        concurrency=workers,
        retry=RetryPolicy.from_env(attempts=retries),
        timeout=timeout,
        allow_http=bool(ctx.meta.get("allow_http")) if ctx else False,
    )


def _opts(
    *,
    started: float,
    page_size: int = DEFAULT_PAGE_SIZE,
    file_rows: int = DEFAULT_FILE_ROWS,
    max_seconds: float | None = None,
    **kw: Any,
) -> RunOptions:
    if max_seconds is not None and max_seconds <= 0:
        raise UsageError(f"--max-seconds must be positive, not {max_seconds}")
    deadline = started + max_seconds if max_seconds else None
    return RunOptions(page_size=page_size, file_rows=file_rows, deadline=deadline, **kw)


def _say(text: str) -> None:
    """Print to stderr, with the app token masked should any message ever carry it."""
    token = os.environ.get("SOCRATA_APP_TOKEN")
    click.echo(text.replace(token, "***") if token else text, err=True)


def handle_errors(f: F) -> F:
    """Errors -> one clear line on stderr and a non-zero exit; anything unforeseen too, with
    its traceback only under -v."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except Interrupted as exc:
            _say(f"nyc-collisions: {exc}")
            sys.exit(130)
        except KeyboardInterrupt:
            _say(CTRL_C_LINE)
            sys.exit(130)
        except UsageError as exc:
            _say(f"nyc-collisions: error: {exc}")
            sys.exit(2)
        except NycCollisionsError as exc:
            _say(f"nyc-collisions: error: {exc}")
            sys.exit(1)
        except Exception as exc:
            if kwargs.get("verbose"):
                _say(traceback.format_exc().rstrip())
            text = " ".join(str(exc).split()) or "(no message)"
            _say(
                f"nyc-collisions: error: unexpected {type(exc).__name__}: {text} "
                "(nothing partial was committed; rerun with -v for the traceback, and please "
                "report it)"
            )
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


class _NeverRaised(click.UsageError):
    pass


# click >= 8.2 raises this for a group called without a command (8.1 shows its help itself)
_NO_ARGS: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError", _NeverRaised)


class _Commands(click.Group):
    """click's group, with its usage errors (a bad option value, an unknown option) as one line
    like every other error, instead of a usage block."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        def run() -> Any:
            return super(_Commands, self).main(
                args, prog_name, complete_var, standalone_mode=False, **extra
            )

        if not standalone_mode:
            return run()
        try:
            code = run()
        except _NO_ARGS as exc:  # the bare command: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "nyc-collisions"
            _say(f"nyc-collisions: error: {exc.format_message()} (see {where} --help)")
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            _say(CTRL_C_LINE)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="nyc-collisions")
def main() -> None:
    """Land NYC Motor Vehicle Collisions open data (crashes, persons, vehicles) from Socrata
    into S3 or a local folder: a streaming, resumable backfill, then daily updates.

    DATASET is crashes, persons, vehicles, or any Socrata dataset id (xxxx-xxxx).
    """
    tune_allocators()


def _print_summary(results: list[DatasetResult], started: float) -> None:
    for r in results:
        if r.status == "skipped":
            click.echo(f"{r.dataset}: skipped: {r.message}")
            continue
        line = (
            f"{r.dataset}: {r.status} {r.rows:,} rows in {r.files} files "
            f"({_human_bytes(r.bytes)}), {r.requests:,} requests "
            f"({_human_bytes(r.wire_bytes)} received), {r.seconds:,.1f}s "
            f"-> {r.location}"
        )
        click.echo(line)
        if r.extra.get("schema_change"):
            said = summary_text(r.extra["schema_change"])
            click.echo(
                f"  columns changed ({said}) since the last snapshot: recorded in the manifest"
            )
        if r.extra.get("resumed"):
            click.echo(
                f"  resumed run {r.extra['resumed']}: "
                f"{r.extra.get('total_rows', r.rows):,} rows in the committed batch"
            )
        if r.status == "landed" and r.source_count is not None:
            total = r.extra.get("total_rows", r.rows)
            if total != r.source_count:
                click.echo(
                    f"  note: the source counted {r.source_count:,} rows at the start; "
                    f"{total:,} landed (it changed meanwhile: `update` catches up)"
                )
        if r.message and r.status != "landed":
            click.echo(f"  {r.message}")
    total_rows = sum(r.rows for r in results)
    click.echo(
        f"total: {total_rows:,} rows, {sum(r.requests for r in results):,} requests, "
        f"{_human_bytes(sum(r.wire_bytes for r in results))} received, "
        f"{sum(r.files for r in results)} files, execution time "
        f"{time.monotonic() - started:,.1f}s"
    )


@main.command("backfill")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@common
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "parquet"], case_sensitive=False),
    default="csv",
    show_default=True,
    help="File format of the landed data.",
)
@click.option(
    "--workers",
    type=int,
    default=DEFAULT_WORKERS,
    show_default=True,
    help="Partitions fetched at once (1 = sequential).",
)
@click.option(
    "--page-size", type=int, default=DEFAULT_PAGE_SIZE, show_default=True, help="Rows per request."
)
@key_option("Unique key of a dataset given by id (default :id; once landed, the key it has).")
@click.option(
    "--file-rows",
    type=int,
    default=DEFAULT_FILE_ROWS,
    show_default=True,
    help="Rows per landed file (a rerun resumes from the last whole file).",
)
@click.option("--force", is_flag=True, help="Land a new snapshot even if one is committed.")
@click.option(
    "--max-seconds",
    type=float,
    default=None,
    help="Stop cleanly before this many seconds; a rerun resumes.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@table_option
@handle_errors
def backfill_cmd(
    datasets: tuple[str, ...],
    source: str,
    dest: str,
    verbose: int,
    retries: int,
    fmt: str,
    workers: int,
    page_size: int,
    key: str | None,
    file_rows: int,
    force: bool,
    max_seconds: float | None,
    no_progress: bool,
    table: str | None,
) -> None:
    """Mass upload: land every row of each DATASET (default: all three) as a snapshot.

    Rows are fetched by keyset pages on :id over --workers partitions and streamed into files
    under DEST/<dataset>/data/; DEST/<dataset>/manifest.json commits them at the end. An
    interrupted run resumes from its committed files when run again. A dataset that already has
    a committed backfill is skipped unless --force.

    Example: nyc-collisions backfill crashes --dest s3://nyc-application-collisions/collisions_raw_data
    """
    _setup_logging(verbose)
    started = time.monotonic()
    opts = _opts(
        started=started,
        page_size=page_size,
        file_rows=file_rows,
        max_seconds=max_seconds,
        fmt=fmt.lower(),
        workers=workers,
        force=force,
        progress=not no_progress and sys.stderr.isatty(),
        table=table,
    )
    chosen = resolve_many(list(datasets), key)
    storage = open_storage(dest)
    with _client(source, retries, workers) as client:
        results = backfill(client, storage, chosen, opts)
    _print_summary(results, started)
    _print_upload(storage, started)
    if any(r.status == "stopped" for r in results):
        sys.exit(3)


def _run_each(
    datasets: list[Any],
    run: Callable[[Any, threading.Event], DatasetResult],
) -> list[DatasetResult]:
    stop = threading.Event()
    results = []
    for ds in datasets:
        result = run(ds, stop)
        results.append(result)
        if result.status == "stopped":
            break
    return results


def _print_upload(storage: Storage, started: float) -> None:
    """For S3: how much of the run was uploading, and how much of it was waited for."""
    stats = getattr(storage, "stats", None)
    if not isinstance(stats, UploadStats) or not stats.objects:
        return
    wall = time.monotonic() - started
    click.echo(
        f"S3: {_human_bytes(stats.bytes)} in {stats.objects} objects ({stats.parts} parts); "
        f"{stats.upload_seconds:,.1f}s of uploading ran beside the fetching, workers waited "
        f"{stats.wait_seconds:,.1f}s for it ({stats.wait_seconds / max(wall, 1e-9):.0%} of "
        f"{wall:,.1f}s wall, summed over workers)"
    )


def _print_changes(results: list[DatasetResult], started: float) -> None:
    for r in results:
        parts = [f"{r.dataset}: {r.status} {r.rows:,} rows in {r.files} files"]
        if r.extra.get("schema_change"):
            parts.append(f"columns changed ({summary_text(r.extra['schema_change'])})")
        for k in ("missing", "stale", "vanished"):
            if k in r.extra:
                parts.append(f"{k} {r.extra[k]:,}")
        wm = r.extra.get("watermark")
        if wm:
            parts.append(f"watermark {wm['updated_at']} {wm['row_id'] or ''}".rstrip())
        parts.append(f"{r.requests:,} requests, {r.seconds:,.1f}s -> {r.location}")
        click.echo(", ".join(parts))
        if r.message:
            click.echo(f"  {r.message}")
        if r.extra.get("resumed"):
            click.echo(f"  resumed run {r.extra['resumed']} from its committed files")
    click.echo(
        f"total: {sum(r.rows for r in results):,} rows, execution time "
        f"{time.monotonic() - started:,.1f}s"
    )


@main.command("update")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@common
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "parquet"], case_sensitive=False),
    default=None,
    help="File format of the new batch (default: as landed).",
)
@click.option(
    "--page-size", type=int, default=DEFAULT_PAGE_SIZE, show_default=True, help="Rows per request."
)
@click.option(
    "--file-rows",
    type=int,
    default=DEFAULT_FILE_ROWS,
    show_default=True,
    help="Rows per landed file (each file is committed as it is written).",
)
@click.option(
    "--workers",
    type=int,
    default=DEFAULT_WORKERS,
    show_default=True,
    help="When most rows changed (a full replace), land a fresh snapshot over this many "
    "partitions instead of one stream of changes; 1 = always the stream.",
)
@click.option(
    "--reconcile",
    "also_reconcile",
    is_flag=True,
    help="Then reconcile: tombstones for deleted rows, refetch missing ones.",
)
@click.option(
    "--max-seconds",
    type=float,
    default=None,
    help="Stop cleanly before this many seconds; the next run goes on.",
)
@key_option(LANDED_KEY_HELP)
@table_option
@handle_errors
def update_cmd(
    datasets: tuple[str, ...],
    source: str,
    dest: str,
    verbose: int,
    retries: int,
    key: str | None,
    fmt: str | None,
    page_size: int,
    file_rows: int,
    workers: int,
    also_reconcile: bool,
    max_seconds: float | None,
    table: str | None,
) -> None:
    """Daily update: land every row changed since the watermark as a new batch.

    Rows whose (:updated_at, :id) is past the watermark stored at DEST are fetched in that
    order and committed file by file; the watermark moves with each commit. Running it twice
    lands nothing the second time. Needs a committed backfill. When more rows changed than half
    the last snapshot (a publisher's full replace), or when the source's columns changed, a
    fresh snapshot is landed instead, over --workers partitions as a backfill does (a rerun
    resumes it).

    Example: nyc-collisions update --dest s3://nyc-application-collisions/collisions_raw_data
    """
    from .incremental import Update
    from .reconcile import Reconcile

    _setup_logging(verbose)
    started = time.monotonic()
    opts = _opts(
        page_size=page_size,
        file_rows=file_rows,
        max_seconds=max_seconds,
        started=started,
        workers=workers,
        progress=sys.stderr.isatty(),
        table=table,
    )
    storage = open_storage(dest)
    chosen = resolve_many(list(datasets), key)
    with _client(source, retries, workers) as client:
        storage.check_writable()
        try:
            results = _run_each(
                chosen,
                lambda ds, stop: Update(
                    client, storage, ds, opts, fmt.lower() if fmt else None
                ).run(stop),
            )
        except BaseException:
            storage.discard_if_empty()
            raise
        if also_reconcile and not any(r.status == "stopped" for r in results):
            results += _run_each(
                chosen, lambda ds, stop: Reconcile(client, storage, ds, opts).run(stop)
            )
    _print_changes(results, started)
    if any(r.status == "stopped" for r in results):
        sys.exit(3)


@main.command("reconcile")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@common
@key_option(LANDED_KEY_HELP)
@click.option(
    "--max-seconds",
    type=float,
    default=None,
    help="Stop cleanly before this many seconds; the next run goes on from its progress.",
)
@table_option
@handle_errors
def reconcile_cmd(
    datasets: tuple[str, ...],
    source: str,
    dest: str,
    verbose: int,
    retries: int,
    key: str | None,
    max_seconds: float | None,
    table: str | None,
) -> None:
    """Find deletions and gaps: compare the source's key set with what landed.

    Keys that vanished from the source get tombstones; rows that are missing, or whose
    :updated_at differs, are fetched again (rows changed after the watermark are left to
    `update`). Both are committed as batches. The source's keys are scanned over partitions at
    once and recorded as they come: a run stopped or killed goes on from them the next time. If
    the source's columns changed, a fresh snapshot with them is landed instead (as `update` does).

    Example: nyc-collisions reconcile persons
    """
    from .reconcile import Reconcile

    _setup_logging(verbose)
    started = time.monotonic()
    storage = open_storage(dest)
    opts = _opts(started=started, max_seconds=max_seconds, table=table)
    with _client(source, retries) as client:
        storage.check_writable()
        results = _run_each(
            resolve_many(list(datasets), key),
            lambda ds, stop: Reconcile(client, storage, ds, opts).run(stop),
        )
    _print_changes(results, started)
    if any(r.status == "stopped" for r in results):
        sys.exit(3)


@main.command("compact")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@click.option(
    "--dest",
    envvar="NYC_COLLISIONS_DEST",
    default=DEFAULT_LOCAL_DEST,
    show_default=True,
    metavar="DEST",
    help="Where the data landed.",
)
@click.option(
    "--prune", is_flag=True, help="Also forget and delete the batches the new snapshot supersedes."
)
@click.option(
    "--grace",
    "grace_hours",
    type=click.FloatRange(min=0),
    default=24.0,
    show_default=True,
    metavar="HOURS",
    help="With --prune: keep the superseded files this long for readers of the previous "
    "manifest (a later run deletes them); 0 deletes them at once.",
)
@click.option(
    "--file-rows",
    type=int,
    default=DEFAULT_FILE_ROWS,
    show_default=True,
    help="Rows per file of the new snapshot.",
)
@table_option
@handle_errors
def compact_cmd(
    datasets: tuple[str, ...],
    dest: str,
    prune: bool,
    grace_hours: float,
    file_rows: int,
    table: str | None,
) -> None:
    """Write the current state of each DATASET as one fresh snapshot batch.

    Readers then need not merge years of daily batches. Older batches stay (raw data is never
    silently rewritten) unless --prune.

    Example: nyc-collisions compact crashes --prune
    """
    from .incremental import compact

    started = time.monotonic()
    storage = open_storage(dest)
    _opts(file_rows=file_rows, started=started)
    for ds in resolve_many(list(datasets)):
        r = compact(
            storage, ds, prune=prune, file_rows=file_rows, grace_hours=grace_hours, table=table
        )
        pruned = f", pruned {r.extra['pruned_batches']} batches" if prune else ""
        click.echo(
            f"{r.dataset}: compacted {r.rows:,} rows into {r.files} files{pruned} "
            f"({r.seconds:,.1f}s) -> {r.location}"
        )


@main.command("export")
@click.argument("dataset")
@click.option(
    "--output", "-o", required=True, metavar="FILE", help="The file to write: .csv or .parquet."
)
@click.option(
    "--dest",
    envvar="NYC_COLLISIONS_DEST",
    default=DEFAULT_LOCAL_DEST,
    show_default=True,
    metavar="DEST",
    help="Where the data landed.",
)
@handle_errors
def export_cmd(dataset: str, output: str, dest: str) -> None:
    """Write the landed current state of DATASET as one file (.csv or .parquet by suffix).

    Example: nyc-collisions export crashes --output crashes.parquet
    """
    from .api import export

    started = time.monotonic()
    rows = export(dataset, output, dest)
    click.echo(
        f"{resolve(dataset).name}: exported {rows:,} rows to {output} "
        f"in {time.monotonic() - started:,.1f}s"
    )


@main.command("status")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@common
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def status_cmd(
    datasets: tuple[str, ...], source: str, dest: str, verbose: int, retries: int, as_json: bool
) -> None:
    """Per dataset: rows landed, files, last run, the source's count, and whether they agree.

    Example: nyc-collisions status --json
    """
    _setup_logging(verbose)
    storage = open_storage(dest)
    with _client(source, min(retries, 3)) as client:
        out = [dataset_status(storage, client, ds) for ds in resolve_many(list(datasets))]
    if as_json:
        click.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return
    for e in out:
        if not e["landed"]:
            if e.get("unfinished_backfill"):
                click.echo(
                    f"{e['dataset']}: a backfill is unfinished "
                    f"({e['unfinished_backfill'][0]}); rerun backfill to complete it"
                )
            click.echo(
                f"{e['dataset']}: nothing landed at {e['location']}; "
                f"source has {e['source_count'] if e['source_count'] is not None else '?'}"
                " rows"
            )
            continue
        src = f"{e['source_count']:,}" if e["source_count"] is not None else "unknown"
        agree = "agree" if e["agree"] else "DIFFER"
        click.echo(
            f"{e['dataset']}: {e['rows']:,} rows in {e['files']} files "
            f"({e['format']}); last run {e['last_run']['kind']} "
            f"{e['last_run']['committed_at']}; source {src} rows: {agree}"
        )
        if e.get("watermark"):
            wm = e["watermark"]
            lag = e.get("lag_seconds")
            click.echo(
                f"  watermark {wm['updated_at']} {wm['row_id'] or ''}".rstrip()
                + (f"; source changed {lag / 3600:,.1f} h after it" if lag else "")
            )
        if e.get("last_update"):
            u = e["last_update"]
            click.echo(f"  last update {u['committed_at']}: {u['rows']:,} rows")
        if e.get("tombstones"):
            click.echo(f"  tombstones: {e['tombstones']:,}")
        if e.get("schema_changes"):
            c = e["schema_changes"][-1]
            click.echo(f"  last schema change {c['at']}: {summary_text(c)}")
        if e.get("source_columns_changed"):
            said = summary_text(e["source_columns_changed"])
            click.echo(
                f"  the source's columns changed since they were landed ({said}): run update"
            )
        if e.get("source_error"):
            click.echo(f"  source: {e['source_error']}")


@main.command("verify")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@common
@key_option(LANDED_KEY_HELP)
@handle_errors
def verify_cmd(
    datasets: tuple[str, ...], source: str, dest: str, verbose: int, retries: int, key: str | None
) -> None:
    """Compare what landed with the source now: row count and the full set of unique keys.

    Exit 0 only when every dataset matches; otherwise print what is missing or extra.

    Example: nyc-collisions verify crashes persons
    """
    _setup_logging(verbose)
    storage = open_storage(dest)
    ok = True
    with _client(source, retries) as client:
        for ds in resolve_many(list(datasets), key):
            landed = open_landed(storage, ds)
            where = f"{storage.url}/{ds.name}/"
            remote = DatasetSource(client, ds.keyed_as_landed(landed.manifest.key, where))
            changed = columns_changed(remote, landed)
            if changed:
                ok = False
                click.echo(changed)
                continue
            diff = verify(remote, landed)
            if diff.ok:
                click.echo(f"{ds.name}: OK: {diff.landed_rows:,} rows, keys match the source")
                continue
            ok = False
            click.echo(
                f"{ds.name}: MISMATCH: source {diff.source_rows:,} rows, "
                f"landed {diff.landed_rows:,}; missing {diff.missing:,}, "
                f"extra {diff.extra:,}, duplicated {diff.duplicated:,}"
            )
            for label, sample in (
                ("missing", diff.missing_sample),
                ("extra", diff.extra_sample),
                ("duplicated", diff.duplicated_sample),
            ):
                if sample:
                    click.echo(f"  {label} {landed.dataset.key}: {', '.join(sample)}")
        names = {ds.name for ds in resolve_many(list(datasets))}
        if "crashes" in names and names & {"persons", "vehicles"}:
            crashes = open_landed(storage, resolve("crashes"))
            for child in sorted(names & {"persons", "vehicles"}):
                o = orphans(crashes, open_landed(storage, resolve(child)))
                click.echo(
                    f"{child}: {o['rows']:,} rows refer to {o['collision_ids']:,} "
                    f"collision_ids that are not in crashes (not an error: the source "
                    f"has some)" + (f"; e.g. {', '.join(o['sample'])}" if o["rows"] else "")
                )
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
