"""The commands that read: export, status, verify."""

from __future__ import annotations

import sys
import time

import click
import orjson

from ..connect import SourceSettings
from ..current import open_landed
from ..datasets import resolve, resolve_many
from ..report import dataset_status, orphans
from ..sink.storage import open_storage
from ..source import DatasetSource
from ..verify import columns_changed, verify
from .app import echo, handle_errors, main, setup_logging
from .options import (
    LANDED_KEY_HELP,
    common,
    concurrency_options,
    dest_option,
    key_option,
    verbose_option,
)
from .summary import print_mismatch, print_status


@main.command("export")
@click.argument("dataset")
@click.option(
    "--output", "-o", required=True, metavar="FILE", help="The file to write: .csv or .parquet."
)
@dest_option("Where the data landed.")
@verbose_option
@handle_errors
def export_cmd(dataset: str, output: str, dest: str, verbose: int) -> None:
    """Write the landed current state of DATASET as one file (.csv or .parquet by suffix).

    \b
    Example: nyc-collisions export crashes --output crashes.parquet
    """
    from ..api import export

    setup_logging(verbose)
    started = time.monotonic()
    rows = export(dataset, output, dest)
    echo(
        f"{resolve(dataset).name}: exported {rows:,} rows to {output} "
        f"in {time.monotonic() - started:,.1f}s"
    )


@main.command("status")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@common
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@handle_errors
def status_cmd(
    datasets: tuple[str, ...], source: SourceSettings, dest: str, verbose: int, as_json: bool
) -> None:
    """Per dataset: rows landed, files, last run, the source's count, and whether they agree.

    \b
    Example: nyc-collisions status --json
    """
    setup_logging(verbose)
    storage = open_storage(dest)
    with source.client(retries=min(source.retries, 3)) as client:
        out = [dataset_status(storage, client, ds) for ds in resolve_many(list(datasets))]
    if as_json:
        echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return
    print_status(out)


@main.command("verify")
@click.argument("datasets", nargs=-1, metavar="[DATASET]...")
@common
@key_option(LANDED_KEY_HELP)
@concurrency_options("Requests in flight for the key scan, fixed; default: found at run time.")
@handle_errors
def verify_cmd(
    datasets: tuple[str, ...],
    source: SourceSettings,
    dest: str,
    verbose: int,
    key: str | None,
    workers: int | None,
    max_concurrency: int | None,
) -> None:
    """Compare what landed with the source now: row count and the full set of unique keys.

    Exit 0 only when every dataset matches; otherwise print what is missing or extra.

    \b
    Example: nyc-collisions verify crashes persons
    """
    setup_logging(verbose)
    storage = open_storage(dest)
    ok = True
    opened = {}
    with source.client(workers, max_concurrency) as client:
        for ds in resolve_many(list(datasets), key):
            landed = opened[ds.name] = open_landed(storage, ds)
            where = f"{storage.url}/{ds.name}/"
            remote = DatasetSource(client, ds.keyed_as_landed(landed.manifest.key, where))
            changed = columns_changed(remote, landed)
            if changed:
                ok = False
                echo(changed)
                continue
            diff = verify(remote, landed, workers)
            if diff.ok:
                echo(f"{ds.name}: OK: {diff.landed_rows:,} rows, keys match the source")
                continue
            ok = False
            print_mismatch(ds.name, landed.dataset.key, diff)
        if "crashes" in opened:
            for child in sorted(opened.keys() & {"persons", "vehicles"}):
                o = orphans(opened["crashes"], opened[child])
                echo(
                    f"{child}: {o.rows:,} rows refer to {o.collision_ids:,} "
                    f"collision_ids that are not in crashes (not an error: the source "
                    f"has some)" + (f"; e.g. {', '.join(o.sample)}" if o.rows else "")
                )
    if not ok:
        sys.exit(1)
