"""The commands that write: backfill, update, reconcile, compact. Each parses, calls the
orchestrator and prints (`summary.py`); exit 3 when a run stopped before its end."""

from __future__ import annotations

import math
import sys
import threading
import time

import click

from ..connect import SourceSettings
from ..datasets import resolve_many
from ..extract import backfill
from ..results import DatasetResult
from ..sink.storage import open_storage
from .app import echo, handle_errors, main, setup_logging
from .options import (
    LANDED_KEY_HELP,
    common,
    concurrency_options,
    dest_option,
    file_rows_option,
    format_option,
    key_option,
    max_seconds_option,
    page_size_option,
    run_options,
    table_option,
    verbose_option,
)
from .summary import print_changes, print_summary, print_upload, say_table_errors


def _exit_if_stopped(results: list[DatasetResult]) -> None:
    failed = say_table_errors(results)
    if any(r.status == "stopped" for r in results):
        sys.exit(3)
    if failed:
        sys.exit(1)


@main.command("backfill")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@common
@format_option("csv", "File format of the landed data.")
@concurrency_options("Requests in flight, fixed (1 = sequential); default: found at run time.")
@page_size_option()
@key_option("Unique key of a dataset given by id (default :id; once landed, the key it has).")
@file_rows_option("Rows per landed file (a rerun resumes from the last whole file).")
@click.option("--force", is_flag=True, help="Land a new snapshot even if one is committed.")
@max_seconds_option("Stop cleanly before this many seconds; a rerun resumes.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@table_option
@handle_errors
def backfill_cmd(
    datasets: tuple[str, ...],
    source: SourceSettings,
    dest: str,
    verbose: int,
    fmt: str,
    workers: int | None,
    max_concurrency: int | None,
    page_size: int,
    key: str | None,
    file_rows: int,
    force: bool,
    max_seconds: float | None,
    no_progress: bool,
    table: str | None,
) -> None:
    """Mass upload: land every row of each DATASET (default: all three) as a snapshot.

    Rows are fetched by keyset pages on :id over partitions, as many at once as the source
    serves (found at run time), and streamed into files under DEST/<dataset>/data/;
    DEST/<dataset>/manifest.json commits them at the end. An interrupted run resumes from its
    committed files when run again. A dataset that already has a committed backfill is skipped
    unless --force.

    \b
    Example: nyc-collisions backfill crashes --dest s3://nyc-application-collisions/collisions_raw_data
    """
    setup_logging(verbose)
    started = time.monotonic()
    opts = run_options(
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
    with source.client(workers, max_concurrency) as client:
        results = backfill(client, storage, chosen, opts)
    print_summary(results, started)
    print_upload(storage, started)
    _exit_if_stopped(results)


@main.command("update")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@common
@format_option(None, "File format of the new batch (default: as landed).")
@page_size_option()
@file_rows_option("Rows per landed file (each file is committed as it is written).")
@concurrency_options(
    "When most rows changed (a full replace), a fresh snapshot is landed over partitions "
    "instead of one stream of changes: fix its requests in flight; 1 = the stream then (100 "
    "batches since the last snapshot land one with any)."
)
@click.option(
    "--reconcile",
    "also_reconcile",
    is_flag=True,
    help="Then reconcile: tombstones for deleted rows, refetch missing ones.",
)
@max_seconds_option("Stop cleanly before this many seconds; the next run goes on.")
@key_option(LANDED_KEY_HELP)
@table_option
@handle_errors
def update_cmd(
    datasets: tuple[str, ...],
    source: SourceSettings,
    dest: str,
    verbose: int,
    key: str | None,
    fmt: str | None,
    page_size: int,
    file_rows: int,
    workers: int | None,
    max_concurrency: int | None,
    also_reconcile: bool,
    max_seconds: float | None,
    table: str | None,
) -> None:
    """Daily update: land every row changed since the watermark as a new batch.

    Rows whose (:updated_at, :id) is past the watermark stored at DEST are fetched in that
    order and committed file by file; the watermark moves with each commit. Running it twice
    lands nothing the second time. Needs a committed backfill. When more rows changed than half
    the last snapshot (a publisher's full replace), when 100 batches were landed since it, or
    when the source's columns changed, a fresh snapshot is landed instead, over partitions as a
    backfill does (a rerun resumes it).

    \b
    Example: nyc-collisions update --dest s3://nyc-application-collisions/collisions_raw_data
    """
    from ..daily import DailyRun, update_then_reconcile
    from ..manifest import utc_now

    setup_logging(verbose)
    started = time.monotonic()
    opts = run_options(
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
    since = utc_now() if also_reconcile else None  # each dataset, once
    daily = DailyRun(reconcile_since=since, fmt=fmt.lower() if fmt else None)
    results: list[DatasetResult] = []
    with source.client(workers, max_concurrency) as client:
        update_then_reconcile(
            client, storage, chosen, opts, daily, lambda _command, r: results.append(r)
        )
    print_changes(results, started)
    _exit_if_stopped(results)


@main.command("reconcile")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@common
@key_option(LANDED_KEY_HELP)
@max_seconds_option(
    "Stop cleanly before this many seconds; the next run goes on from its progress."
)
@concurrency_options("Requests in flight for the key scan, fixed; default: found at run time.")
@table_option
@handle_errors
def reconcile_cmd(
    datasets: tuple[str, ...],
    source: SourceSettings,
    dest: str,
    verbose: int,
    key: str | None,
    max_seconds: float | None,
    workers: int | None,
    max_concurrency: int | None,
    table: str | None,
) -> None:
    """Find deletions and gaps: compare the source's key set with what landed.

    Keys that vanished from the source get tombstones; rows that are missing, or whose
    :updated_at differs, are fetched again (rows changed after the watermark are left to
    `update`). Both are committed as batches. The source's keys are scanned over partitions at
    once and recorded as they come: a run stopped or killed goes on from them the next time. If
    the source's columns changed, a fresh snapshot with them is landed instead (as `update` does).

    \b
    Example: nyc-collisions reconcile persons
    """
    from ..reconcile import Reconcile

    setup_logging(verbose)
    started = time.monotonic()
    storage = open_storage(dest)
    opts = run_options(started=started, max_seconds=max_seconds, workers=workers, table=table)
    stop = threading.Event()
    results: list[DatasetResult] = []
    with source.client(workers, max_concurrency) as client:
        storage.check_writable()
        try:
            for ds in resolve_many(list(datasets), key):
                results.append(Reconcile(client, storage, ds, opts).run(stop))
                if results[-1].status == "stopped":
                    break
        except BaseException:
            storage.discard_if_empty()  # nothing landed to reconcile: leave no folder behind
            raise
    print_changes(results, started)
    _exit_if_stopped(results)


def _a_number(value: float) -> float:
    if math.isnan(value):
        raise click.BadParameter("must be a number of hours")
    return value


@main.command("compact")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@dest_option("Where the data landed.")
@click.option(
    "--prune", is_flag=True, help="Also forget and delete the batches the new snapshot supersedes."
)
@click.option(
    "--grace",
    "grace_hours",
    type=click.FloatRange(min=0, max=24 * 365),
    callback=lambda _ctx, _param, value: _a_number(value),  # FloatRange lets nan through
    default=24.0,
    show_default=True,
    metavar="HOURS",
    help="With --prune: keep the superseded files this long for readers of the previous "
    "manifest (a later run deletes them); 0 deletes them at once.",
)
@file_rows_option("Rows per file of the new snapshot.")
@table_option
@verbose_option
@handle_errors
def compact_cmd(
    datasets: tuple[str, ...],
    dest: str,
    prune: bool,
    grace_hours: float,
    file_rows: int,
    table: str | None,
    verbose: int,
) -> None:
    """Write the current state of each DATASET as one fresh snapshot batch.

    Readers then need not merge years of daily batches. Older batches stay (raw data is never
    silently rewritten) unless --prune.

    \b
    Example: nyc-collisions compact crashes --prune
    """
    from ..compact import compact

    setup_logging(verbose)
    started = time.monotonic()
    storage = open_storage(dest)
    run_options(file_rows=file_rows, started=started)  # checks --file-rows
    results: list[DatasetResult] = []
    try:
        for ds in resolve_many(list(datasets)):
            r = compact(
                storage, ds, prune=prune, file_rows=file_rows, grace_hours=grace_hours, table=table
            )
            pruned = f", pruned {r.pruned_batches} batches" if prune else ""
            echo(
                f"{r.dataset}: compacted {r.rows:,} rows into {r.files} files{pruned} "
                f"({r.seconds:,.1f}s) -> {r.location}"
            )
            results.append(r)
    except BaseException:
        storage.discard_if_empty()  # nothing landed to compact: leave no folder behind
        raise
    _exit_if_stopped(results)
