"""Land one snapshot of a dataset: plan -> partitions fetched at once -> files -> one commit.

The one way a snapshot is landed: a backfill calls `land_snapshot`, and so do an update or a
reconcile that land a fresh snapshot instead (a full replace, 100 batches since the last one, new
columns), under their lease.

1. an unfinished run that fits (format, columns, key) is resumed from its committed files,
   unless rows were removed since it began (a reconcile's tombstones, a compaction: its rows
   would bring them back); otherwise the source's count and latest `:updated_at` (the
   watermark the next `update` starts from, so rows changed meanwhile are picked up), asked
   beside the metadata when no run is unfinished, give a new plan, recorded before any page;
2. partition boundaries are probed from both ends (`chain.py`) as the workers fetch the first
   partitions (`workers.py`), each partition by keyset pages into files, every file recorded
   under `runs/<batch>/parts/` (the unit a rerun resumes from);
3. when every partition has reached its end (its upper row landed, or a count that finds no
   rows after its last, never just a short page), one manifest write commits the snapshot
   batch and its watermark, and the snapshot's columns become the manifest's.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import replace

from tqdm import tqdm

from .chain import plan_partitions
from .daemon import DaemonCalls
from .drift import column_specs
from .errors import StateError
from .job import DatasetJob
from .manifest import EPOCH, Batch, Manifest, Retired, Watermark, new_batch_id, utc_now
from .partition import FetchContext, PlanBook
from .plan import (
    ResumePoint,
    SnapshotPlan,
    partition_count,
    partition_step,
    resume_points,
)
from .results import DatasetResult
from .schema import Schema
from .sink.files import FileEntry
from .state import PartRecord
from .tidy import DEFAULT_GRACE_HOURS, retire_after
from .workers import BarProgress, fetch_partitions

logger = logging.getLogger(__name__)


def land_snapshot(
    job: DatasetJob,
    stop: threading.Event,
    result: DatasetResult,
    fmt: str,
    *,
    retire: bool = False,
) -> Manifest | None:
    """Land a snapshot of `job`'s dataset in `fmt` under `job`'s lease, into `result` (status
    "stopped" when it stopped before the end: a rerun resumes it); the manifest as it stands
    after (as read when it stopped). `retire`: its commit also retires every batch before it
    (their files deleted `DEFAULT_GRACE_HOURS` later), as `compact --prune` does."""
    return _Snapshot(job, fmt, retire).land(stop, result)


def _latest(parts: list[PartRecord]) -> str | None:
    """The latest `:updated_at` the run's files hold (as their records say), or None when a
    record does not say (an older version's: the source is asked instead)."""
    if any(r.latest is None for r in parts):
        return None
    return max((r.latest or "" for r in parts), default="") or None


class _Snapshot:
    def __init__(self, job: DatasetJob, fmt: str, retire: bool = False) -> None:
        self.job = job
        self.opts = replace(job.opts, fmt=fmt)
        self.state = job.state
        self.retire = retire

    def land(self, stop: threading.Event, result: DatasetResult) -> Manifest | None:
        manifest = self.state.load()
        runs = self.state.unfinished_runs(manifest)
        # a new plan needs the count: asked beside the metadata (one round trip less)
        counted = None if runs else DaemonCalls().submit(self.job.source.count_and_latest)
        schema = self.job.source.schema()
        # a run begun before rows were removed, or before the newest snapshot from the source
        # began (which may have retired the batches that removed them), is not resumed
        removed = "" if manifest is None else max(manifest.last_removal(), manifest.last_fetched())
        plan = self._plan(schema, result, runs, counted, removed)
        plan, parts = self._fetch(schema, plan, result, stop)
        if result.status == "stopped":
            result.batch_id = plan.batch_id
            return manifest
        return self._commit(manifest, schema, plan, parts, result)

    def _plan(
        self,
        schema: Schema,
        result: DatasetResult,
        runs: list[str],
        counted: Future[tuple[int, str | None]] | None,
        removed: str = "",
    ) -> SnapshotPlan:
        """Resume the last of the unfinished `runs` if it fits and began after `removed` (the
        manifest's last removal of rows), or record a new plan from the count (`counted`, or
        asked now)."""
        job, state = self.job, self.state
        columns = tuple((c.field_name, c.data_type) for c in schema.columns)
        for batch_id in reversed(runs):
            key = f"{state.run_prefix(batch_id)}/plan.json"
            doc = state.get_json(key)
            plan = None
            if doc is not None and doc.get("kind") == "snapshot":
                try:
                    plan = SnapshotPlan.from_dict(doc, f"{job.storage.url}/{key}")
                except StateError as exc:  # nothing of it is committed: a new run replaces it
                    logger.warning("%s", exc)
            wanted = job.dataset.key if job.dataset.key_given else None
            if plan is not None and plan.started <= removed:
                # its rows were fetched before rows were removed (tombstones): committed as the
                # newest snapshot it would bring them back. Rows changed meanwhile need no
                # drop: its watermark is where it began, so the next update fetches them again
                logger.info(
                    "%s: dropping unfinished run %s (begun before rows were removed)",
                    job.dataset.name,
                    batch_id,
                )
                state.drop_run(batch_id)
                continue
            if plan is not None and plan.fits(self.opts.fmt, columns, wanted):
                job.keyed_as_landed(plan.key)  # a rerun without --key keeps the run's key
                logger.info("%s: resuming run %s", job.dataset.name, batch_id)
                result.resumed = batch_id
                return plan
            logger.info(
                "%s: dropping unfinished run %s (different format or columns)",
                job.dataset.name,
                batch_id,
            )
            state.drop_run(batch_id)
        info = job.source.info(
            counted.result() if counted is not None else job.source.count_and_latest()
        )
        n = partition_count(info.count, job.client.limit.ceiling, self.opts.page_size)
        plan = SnapshotPlan(
            batch_id=new_batch_id("backfill"),
            dataset_id=job.dataset.dataset_id,
            key=job.dataset.key,
            format=self.opts.fmt,
            columns=columns,
            started=utc_now(),
            source_count=info.count,
            max_updated_at=info.max_updated_at,
            rows_updated_at=info.rows_updated_at,
            page_size=self.opts.page_size,
            # partitions are added as their boundaries are found (see `_planner`), then split
            planned=n,
            step=partition_step(info.count, n),
        )
        state.put_run_json(f"{state.run_prefix(plan.batch_id)}/plan.json", plan.to_dict())
        return plan

    def _resume_points(self, plan: SnapshotPlan) -> dict[int, ResumePoint]:
        return resume_points(self.state.part_records(plan.batch_id))

    def _fetch(
        self, schema: Schema, plan: SnapshotPlan, result: DatasetResult, stop: threading.Event
    ) -> tuple[SnapshotPlan, list[PartRecord]]:
        """Fetch the plan's partitions; the plan as it is at the end (partitions added, split)
        and the run's part records."""
        job = self.job
        name = job.dataset.name
        points = self._resume_points(plan)
        book = PlanBook(self.state, plan)
        bar = tqdm(
            total=plan.source_count,
            initial=sum(p.rows for p in points.values()),
            unit=" rows",
            desc=name,
            disable=not self.opts.progress,
            unit_scale=True,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        limit = job.client.limit
        limit.reset_usage()

        def go_on() -> bool:
            return not stop.is_set() and not self.opts.out_of_time()

        ctx = FetchContext(
            job.source, self.state, schema, self.opts, plan.batch_id, stop, BarProgress(bar)
        )
        try:
            planner = plan_partitions(book, job.source, DaemonCalls(), go_on)
            done = fetch_partitions(ctx, book, points, limit, planner, name)
        finally:
            bar.close()
        result.files, result.rows, result.bytes = done.files, done.rows, done.bytes
        usage = limit.usage()
        result.concurrency = usage
        result.splits = done.splits
        logger.info(
            "%s: concurrency settled at %d requests in flight (%s %d; peak %d), %d splits",
            name,
            usage.settled,
            "ceiling" if usage.adaptive else "fixed at",
            usage.ceiling,
            usage.peak,
            done.splits,
        )
        plan = book.plan
        parts = self.state.part_records(plan.batch_id)
        points_after = resume_points(parts)
        if not plan.complete or not all(
            points_after.get(p.index, ResumePoint()).done for p in plan.partitions
        ):
            result.status = "stopped"
            result.message = (
                f"stopped before the end ({'time budget' if not stop.is_set() else 'stop'}); "
                "a rerun resumes from the committed files"
            )
        return plan, parts

    def _commit(
        self,
        manifest: Manifest | None,
        schema: Schema,
        plan: SnapshotPlan,
        parts: list[PartRecord],
        result: DatasetResult,
    ) -> Manifest:
        job = self.job
        dataset = job.dataset
        files = [FileEntry(r.path, r.rows, r.bytes) for r in parts if r.path]
        total = sum(f.rows for f in files)
        batch = Batch(
            batch_id=plan.batch_id,
            kind="snapshot",
            format=self.opts.fmt,
            committed_at=utc_now(),
            files=files,
            rows=total,
            source_count=plan.source_count,
            watermark=Watermark(plan.max_updated_at or EPOCH, None),
            info={
                "started": plan.started,
                "rows_updated_at": plan.rows_updated_at,
                "partitions": len(plan.partitions),
                "planned": plan.planned,
                "splits": plan.splits,
                # no row of the snapshot was created after this (see counts.py)
                "ahead_until": _latest(parts) or job.source.max_updated_at(),
            },
        )
        columns = column_specs(schema.columns)
        if manifest is None:
            manifest = Manifest(
                dataset=dataset.name,
                dataset_id=dataset.dataset_id,
                key=dataset.key,
                columns=columns,
            )
        elif manifest.dataset_id != dataset.dataset_id:
            raise StateError(
                f"{result.location} holds dataset {manifest.dataset_id}, not {dataset.dataset_id}"
            )
        manifest.key = dataset.key
        if manifest.reconciled > plan.started:  # its rows are older than that match
            manifest.reconciled = ""
        change = manifest.change_columns(columns, batch.batch_id)
        if change is not None:
            result.schema_change = change
            logger.info("%s: snapshot %s lands the new columns", dataset.name, batch.batch_id)
        if self.retire and manifest.batches:
            old = manifest.batches
            for b in old:
                self.state.drop_run(b.batch_id)  # no record of them may look resumable
            until = retire_after(DEFAULT_GRACE_HOURS)
            manifest.retired += [Retired(f.path, until) for b in old for f in b.files]
            manifest.batches = []
            result.pruned_batches = len(old)
        manifest.batches.append(batch)
        self.state.commit(manifest)
        job.snapshot_committed = True
        result.batch_id = batch.batch_id
        result.source_count = plan.source_count
        result.total_rows = total
        return manifest
