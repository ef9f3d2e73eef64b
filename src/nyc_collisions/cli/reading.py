"""The commands that read: export, status, verify."""

from __future__ import annotations

import sys
import time

import click
import orjson

from ..current import open_landed
from ..datasets import resolve, resolve_many
from ..drift import summary_text
from ..report import dataset_status, orphans
from ..sink.storage import open_storage
from ..socrata.source import DatasetSource
from ..verify import columns_changed, verify
from .app import handle_errors, main, setup_logging
from .options import LANDED_KEY_HELP, SourceOptions, common, dest_option, key_option


@main.command("export")
@click.argument("dataset")
@click.option(
    "--output", "-o", required=True, metavar="FILE", help="The file to write: .csv or .parquet."
)
@dest_option("Where the data landed.")
@handle_errors
def export_cmd(dataset: str, output: str, dest: str) -> None:
    """Write the landed current state of DATASET as one file (.csv or .parquet by suffix).

    Example: nyc-collisions export crashes --output crashes.parquet
    """
    from ..api import export

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
    datasets: tuple[str, ...], source: SourceOptions, dest: str, verbose: int, as_json: bool
) -> None:
    """Per dataset: rows landed, files, last run, the source's count, and whether they agree.

    Example: nyc-collisions status --json
    """
    setup_logging(verbose)
    storage = open_storage(dest)
    with source.client(retries=min(source.retries, 3)) as client:
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
    datasets: tuple[str, ...], source: SourceOptions, dest: str, verbose: int, key: str | None
) -> None:
    """Compare what landed with the source now: row count and the full set of unique keys.

    Exit 0 only when every dataset matches; otherwise print what is missing or extra.

    Example: nyc-collisions verify crashes persons
    """
    setup_logging(verbose)
    storage = open_storage(dest)
    ok = True
    with source.client() as client:
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
