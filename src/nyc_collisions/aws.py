"""AWS Lambda entry point: the daily `update` (and a resumable `backfill`) on a schedule.

Configuration comes from the environment:

- `NYC_COLLISIONS_DEST` (`s3://bucket/prefix`), `NYC_COLLISIONS_DATASETS`
  (`crashes,persons,vehicles`), `SOCRATA_BASE_URL`, `NYC_COLLISIONS_FORMAT` (for a backfill),
  `NYC_COLLISIONS_TABLE` (`delta`: keep each dataset's table, as `--table`),
  `NYC_COLLISIONS_RECONCILE_WEEKDAY`
  (`SUN`: that day's run also reconciles deletions, each dataset not reconciled since that
  day's start in `NYC_COLLISIONS_TIMEZONE`, the schedule's, UTC when unset; a reconcile the
  deadline stopped goes on in the next runs until it ends: `reconcile_schedule.py`),
  `NYC_COLLISIONS_WIRE` (`auto`, `json` or
  `csv`: how rows come from the source, as `--wire`), `NYC_COLLISIONS_RETRIES` (as `--retries`),
  `NYC_COLLISIONS_ALLOW_HTTP` (as `--allow-http`); each is checked before anything is done, and
  a bad value is a `UsageError` naming the variable;
- the app token: `SOCRATA_APP_TOKEN`, or the name of a Secrets Manager secret
  (`SOCRATA_APP_TOKEN_SECRET`) or an SSM SecureString parameter (`SOCRATA_APP_TOKEN_PARAMETER`),
  fetched once and cached across warm invocations.

- `NYC_COLLISIONS_STATE_MACHINE`: the ARN of the state machine that invokes the function again
  until it is done (below).

The event may say `{"command": "update" | "backfill", "datasets": [...], "reconcile": true}`
(`"reconcile_since": "<UTC time>"` as the loop passes it on; the loop adds `"loop_started"`).
The handler logs one JSON object per line, prints its metrics as Embedded Metric Format lines
(`metrics`), returns a small summary (never rows) and raises on failure so that Lambda's
retries, the on-failure destination and the alarms see it. A run stops cleanly before the
invocation's time runs out and returns `"done": false`; the next invocation resumes from the
committed files. A backfill is invoked again by the state machine's loop. An `update` that finds
nothing landed backfills that dataset first, so a first deploy needs no manual step; an update
that is not done starts that loop itself (`"command": "update"`), or, with no state machine
configured, fails so that Lambda retries it. Invocations made by the loop say `"loop": true`
and start nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from . import settings
from .connect import SourceSettings
from .daily import DailyRun, update_then_reconcile
from .datasets import Dataset, resolve_many
from .errors import NycCollisionsError, UsageError
from .extract import RunOptions, backfill
from .lambda_token import app_token
from .metrics import (
    DatasetMetrics,
    RetryMeter,
    dataset_line,
    from_result,
    update_line,
    with_lags,
)
from .reconcile_schedule import (
    latest,
    since_from_event,
    weekday_from_env,
    weekly_since,
    zone_from_env,
)
from .redact import redact
from .report import lag_seconds
from .results import DatasetResult
from .runtime import tune_allocators
from .settings import TABLE_ENV, check_table_format
from .sink.formats import FORMATS
from .sink.storage import Storage, open_storage
from .socrata.client import SodaClient, validate_base_url
from .source import DatasetSource
from .state import DatasetState

logger = logging.getLogger("nyc_collisions.aws")
SAFETY_SECONDS = 90.0  # stop this long before Lambda's deadline (a quarter of short budgets)
STATE_MACHINE = "NYC_COLLISIONS_STATE_MACHINE"


class NotFinished(NycCollisionsError):
    """An update ran out of time and nothing carries it on: failing makes Lambda retry it (it
    resumes from the committed files) and the alarms see it."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any known secret value masked."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        super().__init__()
        self.secrets = [s for s in (secrets or []) if s]

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + self.formatException(record.exc_info).splitlines()[-1]
        for secret in self.secrets:
            message = redact(message, secret)  # the token in each form it may take
        message = redact(message, None)  # any URL's user and password
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        return orjson.dumps(doc).decode()


def _configure_logging(token: str | None) -> None:
    root = logging.getLogger()
    formatter = JsonFormatter([token] if token else [])
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for h in root.handlers:
        h.setFormatter(formatter)
    root.setLevel(logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _mask(exc: BaseException, token: str | None) -> None:
    """The token masked in `exc`'s message, whatever part of what the source said it holds,
    and any URL's user and password (an endpoint's, as botocore quotes it)."""
    exc.args = tuple(redact(a, token) if isinstance(a, str) else a for a in exc.args)


def _summary(command: str, r: DatasetResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dataset": r.dataset,
        "command": command,
        "status": r.status,
        "rows": r.rows,
        "files": r.files,
        "batch": r.batch_id,
        "requests": r.requests,
        "seconds": round(r.seconds, 2),
    }
    if command == "update" or r.refreshed:
        out["watermark"] = r.watermark_dict()
    if r.reconciled is not None:
        c = r.reconciled
        out.update(missing=c.missing, stale=c.stale, vanished=c.vanished)
    if r.total_rows is not None:
        out["total_rows"] = r.total_rows
    if r.refreshed:
        out["refreshed"] = True
    if r.schema_change is not None:  # {added, removed, retyped}: the source's columns changed
        out["schema_change"] = r.schema_change.summary()
    if r.table_error:  # the table's sync failed (the landed data is committed)
        out["table_error"] = r.table_error
    return out


def _env_datasets() -> list[str]:
    """`NYC_COLLISIONS_DATASETS`: the datasets an event that names none runs."""
    raw = os.environ.get("NYC_COLLISIONS_DATASETS", "")
    return [n.strip() for n in raw.split(",") if n.strip()]


def _event_datasets(value: object) -> list[str]:
    """An event's `datasets`: a list of names or ids, or one string of them comma-separated
    (as `NYC_COLLISIONS_DATASETS`); anything else is refused, naming the field."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(
            f"the event's datasets must be a list of dataset names or ids, not {value!r}"[:200]
        )
    return [v.strip() for v in value if v.strip()]


def _state_machine() -> str | None:
    """`NYC_COLLISIONS_STATE_MACHINE`: the loop that carries on an update that is not done."""
    raw = os.environ.get(STATE_MACHINE, "").strip()
    if not raw:
        return None
    if not (raw.startswith("arn:") and ":stateMachine:" in raw):
        raise UsageError(f"{STATE_MACHINE}={raw!r}: must be a state machine ARN")
    return raw


def _lags(client: SodaClient, storage: Storage, names: set[str]) -> dict[str, float]:
    """Seconds the landed state is behind the source's `rowsUpdatedAt`, per dataset."""
    lags: dict[str, float] = {}
    for ds in resolve_many(sorted(names)):
        try:
            manifest = DatasetState(storage, ds.name).load()
            source = DatasetSource(client, ds)
            updated = source.metadata().get("rowsUpdatedAt")
        except NycCollisionsError as exc:
            logger.warning("%s: lag behind the source unknown: %s", ds.name, exc)
            continue
        lag = None if manifest is None else lag_seconds(manifest, updated, source)
        if lag is not None:
            lags[ds.name] = lag
    return lags


def _up_to_date(datasets: list[Dataset], results: list[tuple[str, DatasetResult]]) -> bool:
    """Whether every dataset was updated (or backfilled) to its end: what a reconcile after
    them did not change."""
    ran = [r for kind, r in results if kind != "reconcile"]
    names = {r.dataset for r in ran}
    return names >= {d.name for d in datasets} and all(r.status != "stopped" for r in ran)


def _carry_on(datasets: list[Dataset], asked: str | None, loop: bool, machine: str | None) -> str:
    """An update that is not done is not a success: have the state machine's loop invoke the
    function again until it is (each invocation resumes where the last one stopped), unless a
    loop already running does that update."""
    if loop:
        return "loop"  # the loop that invoked this one invokes the next
    if machine is None:
        raise NotFinished(
            f"the update stopped before the end and {STATE_MACHINE} is not set to carry it on;"
            " the next invocation resumes it"
        )
    import boto3

    sfn = boto3.client("stepfunctions")
    doc: dict[str, Any] = {"command": "update", "datasets": [d.name for d in datasets]}
    if asked is not None:
        doc["reconcile_since"] = asked
    running = _running_loop(sfn, machine, doc)
    if running is not None:
        logger.warning("update not done in this invocation; the running %s goes on", running)
        return running
    arn = str(
        sfn.start_execution(stateMachineArn=machine, input=orjson.dumps(doc).decode())[
            "executionArn"
        ]
    )
    logger.warning("update not done in this invocation; started %s to carry it on", arn)
    return arn


def _running_loop(sfn: Any, machine: str, wanted: dict[str, Any]) -> str | None:
    """A running execution of the loop that does the update `wanted` asks (the same datasets or
    more, a reconcile asked as late or later); another command's loop (an operator's backfill of
    another dataset), or one whose input its invocations refuse, does not."""
    names = set(wanted["datasets"])
    asked = wanted.get("reconcile_since")
    now = datetime.now(UTC)
    pages = sfn.get_paginator("list_executions").paginate(
        stateMachineArn=machine, statusFilter="RUNNING"
    )
    for page in pages:
        for execution in page["executions"]:
            arn = str(execution["executionArn"])
            try:
                doc = orjson.loads(sfn.describe_execution(executionArn=arn).get("input") or "{}")
                if not isinstance(doc, dict) or doc.get("command") != "update":
                    continue
                theirs = {
                    d.name for d in resolve_many(list(doc.get("datasets") or _env_datasets()))
                }
                # as its invocations take it: a reconcile as of the loop's start
                started = execution["startDate"].astimezone(UTC).isoformat()
                since = since_from_event({**doc, "loop": True, "loop_started": started}, now)
            except (NycCollisionsError, orjson.JSONDecodeError, TypeError, ValueError):
                continue  # not an input this function would run: not this update
            if theirs >= names and (asked is None or (since is not None and since >= asked)):
                return arn
    return None


def _emit(function: str, command: str, updated: bool, lines: list[DatasetMetrics]) -> None:
    """The metrics, one EMF line each, on stdout (the function's log: CloudWatch reads them);
    `updated`: every dataset brought up to date (`UpdateCompleted`)."""
    out = [dataset_line(function, m) for m in lines]
    if command == "update":
        out.append(update_line(function, updated))
    sys.stdout.write("".join(line + "\n" for line in out))
    sys.stdout.flush()


def handler(event: dict[str, Any] | None, context: Any) -> dict[str, Any]:
    started = time.monotonic()
    _configure_logging(None)
    tune_allocators()
    token = None
    try:
        token = app_token()
        _configure_logging(token)
        return _handle(event or {}, context, started, token)
    except Exception as exc:
        _mask(exc, token)  # its message is the invocation's errorMessage, outside our logs
        raise


def _handle(
    event: dict[str, Any], context: Any, started: float, token: str | None
) -> dict[str, Any]:
    command = str(event.get("command", "update"))
    if command not in ("update", "backfill"):
        raise ValueError(f"unknown command {command!r}: use update or backfill")
    datasets = resolve_many(_event_datasets(event.get("datasets")) or _env_datasets())
    dest = os.environ.get("NYC_COLLISIONS_DEST")
    if not dest:
        raise UsageError("NYC_COLLISIONS_DEST is not set")
    weekday = weekday_from_env()
    zone = zone_from_env()
    machine = _state_machine()
    source = SourceSettings.from_env()
    validate_base_url(source.url, allow_http=source.allow_http, name="SOCRATA_BASE_URL")
    fmt = settings.env_choice("NYC_COLLISIONS_FORMAT", "csv", FORMATS)
    table = check_table_format(os.environ.get(TABLE_ENV))
    now = datetime.now(UTC)
    asked = since_from_event(event, now)  # carried on by the loop
    since = latest(asked, None if weekday is None else weekly_since(weekday, zone, now))
    remaining = (
        context.get_remaining_time_in_millis() / 1000.0
        if context is not None and hasattr(context, "get_remaining_time_in_millis")
        else 900.0
    )
    deadline = started + remaining - min(SAFETY_SECONDS, remaining / 4)
    opts = RunOptions(fmt=fmt, deadline=deadline, progress=False, table=table)
    storage = open_storage(dest)
    function = os.environ.get("AWS_LAMBDA_FUNCTION_NAME") or "nyc-collisions"
    logger.info(
        "start %s %s -> %s (reconcile what was not since %s)",
        command,
        ",".join(d.name for d in datasets),
        storage.url,
        since or "never",
    )
    results: list[tuple[str, DatasetResult]] = []
    measured: list[DatasetMetrics] = []
    done = updated = False
    summary: dict[str, Any] = {"command": command, "destination": storage.url}
    try:
        with source.client(app_token=token) as client:
            meter = RetryMeter(lambda: client.stats.retries)

            def record(kind: str, r: DatasetResult) -> None:
                results.append((kind, r))
                measured.append(from_result(kind, r, *meter.take(), table=bool(table)))

            if command == "backfill":
                backfill(client, storage, datasets, opts, lambda r: record("backfill", r))
            else:
                daily = DailyRun(reconcile_since=since, backfill_first=True, resume_scans=True)
                update_then_reconcile(client, storage, datasets, opts, daily, record)
            landed = {r.dataset for _, r in results}
            updated = _up_to_date(datasets, results)
            done = updated and all(r.status != "stopped" for _, r in results)
            # within the invocation's time (the source may be what stopped the runs): past the
            # deadline each request is tried once, and a silent one gives up within a second
            with client.stopping_when(opts.out_of_time, opts.deadline):
                measured[:] = with_lags(measured, _lags(client, storage, landed))
        # a reconcile stopped by the deadline goes on with the next daily run (its scan is
        # recorded): only an unfinished update or backfill is carried on now
        if command == "update" and not updated:
            summary["carried_on_by"] = _carry_on(datasets, asked, bool(event.get("loop")), machine)
    except Exception:
        logger.exception("%s failed", command)
        raise
    finally:
        # completed: every dataset brought up to date (a reconcile the deadline stopped goes on
        # with the next run, and one that failed after the updates: the data is fresh meanwhile)
        _emit(function, command, _up_to_date(datasets, results), measured)
    failed = [r.dataset for _, r in results if r.table_error]
    if failed:  # the landed data is committed; the next run with the table on heals the table
        logger.error("the table of %s could not be brought up to the manifest", ", ".join(failed))
    summary.update(
        done=done,
        table_failed=failed,
        results=[_summary(kind, r) for kind, r in results],
        seconds=round(time.monotonic() - started, 2),
    )
    text = orjson.dumps(summary).decode()
    logger.info("done %s", text)
    masked = redact(text, token)  # column names and table errors come from the source
    if masked != text:
        summary = orjson.loads(masked)
    return summary
