"""What the commands print: after a write, one line per dataset and a total; a status; a
mismatch found by verify."""

from __future__ import annotations

import time
from typing import Any

from ..drift import summary_text
from ..results import DatasetResult
from ..sink.s3 import UploadStats
from ..sink.storage import Storage
from ..verify import KeyDiff
from .app import echo


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} TiB"


def print_summary(results: list[DatasetResult], started: float) -> None:
    """A backfill's: rows, files, bytes and requests per dataset."""
    for r in results:
        if r.status == "skipped":
            echo(f"{r.dataset}: skipped: {r.message}")
            continue
        line = (
            f"{r.dataset}: {r.status} {r.rows:,} rows in {r.files} files "
            f"({human_bytes(r.bytes)}), {r.requests:,} requests "
            f"({human_bytes(r.wire_bytes)} received), {r.seconds:,.1f}s "
            f"-> {r.location}"
        )
        echo(line)
        _print_concurrency(r)
        if r.schema_change is not None:
            said = summary_text(r.schema_change.summary())
            echo(f"  columns changed ({said}) since the last snapshot: recorded in the manifest")
        total = r.rows if r.total_rows is None else r.total_rows
        if r.resumed:
            echo(f"  resumed run {r.resumed}: {total:,} rows in the committed batch")
        if r.status == "landed" and r.source_count is not None and total != r.source_count:
            echo(
                f"  note: the source counted {r.source_count:,} rows at the start; "
                f"{total:,} landed (it changed meanwhile: `update` catches up)"
            )
        if r.message and r.status != "landed":
            echo(f"  {r.message}")
    total_rows = sum(r.rows for r in results)
    echo(
        f"total: {total_rows:,} rows, {sum(r.requests for r in results):,} requests, "
        f"{human_bytes(sum(r.wire_bytes for r in results))} received, "
        f"{sum(r.files for r in results)} files, execution time "
        f"{time.monotonic() - started:,.1f}s"
    )


def say_table_errors(results: list[DatasetResult]) -> bool:
    """The table of a dataset that could not be synced: one line each on stderr (the landed
    data is committed; the next run with the table on heals the table); whether any."""
    from .app import say

    failed = [r for r in results if r.table_error]
    for r in failed:
        say(f"nyc-collisions: error: {r.table_error}")
    return bool(failed)


def _print_concurrency(r: DatasetResult) -> None:
    c = r.concurrency
    if c:
        how = f"found at run time, ceiling {c.ceiling}" if c.adaptive else "--workers"
        requests = "request" if c.settled == 1 else "requests"
        ranges = "range" if r.splits == 1 else "ranges"
        echo(
            f"  concurrency: settled at {c.settled} {requests} in flight, {c.peak} at the "
            f"peak ({how}); {r.splits} {ranges} split"
        )


def print_upload(storage: Storage, started: float) -> None:
    """For S3: how much of the run was uploading, and how much of it was waited for."""
    stats = getattr(storage, "stats", None)
    if not isinstance(stats, UploadStats) or not stats.objects:
        return
    wall = time.monotonic() - started
    echo(
        f"S3: {human_bytes(stats.bytes)} in {stats.objects} objects ({stats.parts} parts); "
        f"{stats.upload_seconds:,.1f}s of uploading ran beside the fetching, workers waited "
        f"{stats.wait_seconds:,.1f}s for it ({stats.wait_seconds / max(wall, 1e-9):.0%} of "
        f"{wall:,.1f}s wall, summed over workers)"
    )


def print_changes(results: list[DatasetResult], started: float) -> None:
    """An update's or a reconcile's: what changed per dataset, and the watermark."""
    for r in results:
        parts = [f"{r.dataset}: {r.status} {r.rows:,} rows in {r.files} files"]
        if r.schema_change is not None:
            parts.append(f"columns changed ({summary_text(r.schema_change.summary())})")
        if r.reconciled is not None:
            c = r.reconciled
            parts += [f"missing {c.missing:,}", f"stale {c.stale:,}", f"vanished {c.vanished:,}"]
        wm = r.watermark
        if wm:
            parts.append(f"watermark {wm.updated_at} {wm.row_id or ''}".rstrip())
        parts.append(f"{r.requests:,} requests, {r.seconds:,.1f}s -> {r.location}")
        echo(", ".join(parts))
        if r.message:
            echo(f"  {r.message}")
        if r.resumed:
            echo(f"  resumed run {r.resumed} from its committed files")
        if r.pruned_batches:
            echo(
                f"  retired the {r.pruned_batches} batches it supersedes: their files are "
                "deleted by a run a day from now"
            )
    echo(
        f"total: {sum(r.rows for r in results):,} rows, execution time "
        f"{time.monotonic() - started:,.1f}s"
    )


def print_status(entries: list[dict[str, Any]]) -> None:
    """`status` without --json: a line per dataset, and what stands out under it."""
    for e in entries:
        if not e["landed"]:
            if e.get("unfinished_backfill"):
                echo(
                    f"{e['dataset']}: a backfill is unfinished "
                    f"({e['unfinished_backfill'][0]}); rerun backfill to complete it"
                )
            echo(
                f"{e['dataset']}: nothing landed at {e['location']}; "
                f"source has {e['source_count'] if e['source_count'] is not None else '?'}"
                " rows"
            )
            if e.get("source_error"):
                echo(f"  source: {e['source_error']}")
            continue
        if e.get("source_count") is None:
            source = "the source's count unavailable: not compared"
        else:
            agree = "agree" if e["agree"] else "DIFFER"
            source = f"source {e['source_count']:,} rows: {agree}"
        echo(
            f"{e['dataset']}: {e['rows']:,} rows in {e['files']} files "
            f"({e['format']}); last run {e['last_run']['kind']} "
            f"{e['last_run']['committed_at']}; {source}"
        )
        if e.get("watermark"):
            wm = e["watermark"]
            lag = e.get("lag_seconds")
            echo(
                f"  watermark {wm['updated_at']} {wm['row_id'] or ''}".rstrip()
                + (f"; {lag / 3600:,.1f} h behind the source's last change" if lag else "")
            )
        if e.get("last_update"):
            u = e["last_update"]
            echo(f"  last update {u['committed_at']}: {u['rows']:,} rows")
        if e.get("last_reconciled"):
            echo(f"  matched the source's keys at {e['last_reconciled']}")
        if e.get("tombstones"):
            echo(f"  tombstones: {e['tombstones']:,}")
        if e.get("schema_changes"):
            c = e["schema_changes"][-1]
            echo(f"  last schema change {c['at']}: {summary_text(c)}")
        if e.get("source_columns_changed"):
            said = summary_text(e["source_columns_changed"])
            echo(f"  the source's columns changed since they were landed ({said}): run update")
        if e.get("source_error"):
            echo(f"  source: {e['source_error']}")


def print_mismatch(name: str, key: str, diff: KeyDiff) -> None:
    """A dataset whose keys differ from the source's: the counts, and samples of each."""
    echo(
        f"{name}: MISMATCH: source {diff.source_rows:,} rows, "
        f"landed {diff.landed_rows:,}; missing {diff.missing:,}, "
        f"extra {diff.extra:,}, duplicated {diff.duplicated:,}"
    )
    for label, sample in (
        ("missing", diff.missing_sample),
        ("extra", diff.extra_sample),
        ("duplicated", diff.duplicated_sample),
    ):
        if sample:
            echo(f"  {label} {key}: {', '.join(sample)}")
