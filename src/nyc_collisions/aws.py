"""AWS Lambda entry point: the daily `update` (and a resumable `backfill`) on a schedule.

Configuration comes from the environment:

- `NYC_COLLISIONS_DEST` (`s3://bucket/prefix`), `NYC_COLLISIONS_DATASETS`
  (`crashes,persons,vehicles`), `SOCRATA_BASE_URL`, `NYC_COLLISIONS_FORMAT` (for a backfill),
  `NYC_COLLISIONS_RECONCILE_WEEKDAY`
  (`SUN`: that day's run also reconciles deletions; a reconcile the deadline stopped goes on
  in the next runs until it ends), `NYC_COLLISIONS_WIRE` (`auto`, `json` or
  `csv`: how rows come from the source, as `--wire`), `NYC_COLLISIONS_RETRIES` (as `--retries`),
  `NYC_COLLISIONS_ALLOW_HTTP` (as `--allow-http`); each is checked before anything is done, and
  a bad value is a `UsageError` naming the variable;
- the app token: `SOCRATA_APP_TOKEN`, or the name of a Secrets Manager secret
  (`SOCRATA_APP_TOKEN_SECRET`) or an SSM SecureString parameter (`SOCRATA_APP_TOKEN_PARAMETER`),
  fetched once and cached across warm invocations.

The event may say `{"command": "update" | "backfill", "datasets": [...], "reconcile": true}`.
The handler logs one JSON object per line, returns a small summary (never rows) and raises on
failure so that Lambda's retries, the on-failure destination and the alarm see it. A backfill
stops cleanly before the invocation's time runs out and returns `"done": false`: invoke again
and it resumes from its committed files.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from . import settings
from .datasets import resolve_many
from .errors import UsageError
from .extract import DatasetResult, RunOptions, backfill
from .incremental import Update
from .reconcile import Reconcile, scan_pending
from .schema import tune_allocators
from .sink.formats import FORMATS
from .sink.storage import open_storage
from .socrata.client import DEFAULT_BASE_URL, WIRES, RetryPolicy, SodaClient, validate_base_url

logger = logging.getLogger("nyc_collisions.aws")
SAFETY_SECONDS = 90.0  # stop this long before Lambda's deadline (a quarter of short budgets)
WEEKDAYS = ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")
_token_cache: dict[str, str | None] = {}


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
            message = message.replace(secret, "***")
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


def app_token() -> str | None:
    """The Socrata app token: from the environment, Secrets Manager or SSM (cached)."""
    if "token" in _token_cache:
        return _token_cache["token"]
    token = os.environ.get("SOCRATA_APP_TOKEN") or None
    secret = os.environ.get("SOCRATA_APP_TOKEN_SECRET")
    parameter = os.environ.get("SOCRATA_APP_TOKEN_PARAMETER")
    if token is None and secret:
        import boto3

        value = boto3.client("secretsmanager").get_secret_value(SecretId=secret)["SecretString"]
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            doc = value
        if isinstance(doc, dict):
            doc = doc.get("app_token") or doc.get("token") or doc.get("SOCRATA_APP_TOKEN")
        token = str(doc).strip() if doc else None
    elif token is None and parameter:
        import boto3

        got = boto3.client("ssm").get_parameter(Name=parameter, WithDecryption=True)
        token = got["Parameter"]["Value"].strip() or None
    _token_cache["token"] = token
    return token


def _summary(r: DatasetResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "status": r.status,
        "rows": r.rows,
        "files": r.files,
        "batch": r.batch_id,
        "requests": r.requests,
        "seconds": round(r.seconds, 2),
    }
    for k in ("watermark", "missing", "stale", "vanished", "total_rows", "refreshed"):
        if k in r.extra:
            out[k] = r.extra[k]
    return out


def _reconcile_weekday() -> str | None:
    """`NYC_COLLISIONS_RECONCILE_WEEKDAY` as MON..SUN: a day's English name or its first three
    letters, any case; None when unset."""
    raw = os.environ.get("NYC_COLLISIONS_RECONCILE_WEEKDAY", "").strip()
    day = raw.upper()
    if day and day not in WEEKDAYS and day not in [d[:3] for d in WEEKDAYS]:
        raise UsageError(
            f"NYC_COLLISIONS_RECONCILE_WEEKDAY={raw!r}: must be a day of the week, like SUN"
        )
    return day[:3] or None


def handler(event: dict[str, Any] | None, context: Any) -> dict[str, Any]:
    started = time.monotonic()
    event = event or {}
    _configure_logging(None)
    tune_allocators()
    token = app_token()
    _configure_logging(token)
    command = str(event.get("command", "update"))
    if command not in ("update", "backfill"):
        raise ValueError(f"unknown command {command!r}: use update or backfill")
    names = event.get("datasets") or [
        n.strip() for n in os.environ.get("NYC_COLLISIONS_DATASETS", "").split(",") if n.strip()
    ]
    datasets = resolve_many(list(names))
    dest = os.environ.get("NYC_COLLISIONS_DEST")
    if not dest:
        raise UsageError("NYC_COLLISIONS_DEST is not set")
    weekday = _reconcile_weekday()
    allow_http = settings.env_flag(settings.ALLOW_HTTP)
    source = validate_base_url(
        os.environ.get("SOCRATA_BASE_URL") or DEFAULT_BASE_URL,
        allow_http=allow_http,
        name="SOCRATA_BASE_URL",
    )
    retry = RetryPolicy.from_env()
    wire = settings.env_choice(settings.WIRE, "auto", WIRES)
    fmt = settings.env_choice("NYC_COLLISIONS_FORMAT", "csv", FORMATS)
    reconcile = bool(event.get("reconcile")) or (
        bool(weekday) and datetime.now(UTC).strftime("%a").upper() == weekday
    )
    remaining = (
        context.get_remaining_time_in_millis() / 1000.0
        if context is not None and hasattr(context, "get_remaining_time_in_millis")
        else 900.0
    )
    deadline = started + remaining - min(SAFETY_SECONDS, remaining / 4)
    opts = RunOptions(fmt=fmt, deadline=deadline, progress=False)
    storage = open_storage(dest)
    logger.info(
        "start %s %s -> %s (reconcile=%s)",
        command,
        ",".join(d.name for d in datasets),
        storage.url,
        reconcile,
    )
    results: list[DatasetResult] = []
    try:
        with SodaClient(
            source,
            app_token=token,
            concurrency=opts.workers,
            retry=retry,
            wire=wire,
            allow_http=allow_http,
        ) as client:
            if command == "backfill":
                results = backfill(client, storage, datasets, opts)
            else:
                stop = threading.Event()
                storage.check_writable()
                for ds in datasets:
                    results.append(Update(client, storage, ds, opts).run(stop))
                if all(r.status != "stopped" for r in results):
                    for ds in datasets:  # a reconcile stopped by the deadline goes on daily
                        if reconcile or scan_pending(storage, ds):
                            results.append(Reconcile(client, storage, ds, opts).run(stop))
    except Exception:
        logger.exception("%s failed", command)
        raise
    done = all(r.status != "stopped" for r in results) and len({r.dataset for r in results}) == len(
        datasets
    )
    summary = {
        "command": command,
        "done": done,
        "destination": storage.url,
        "results": [{"dataset": r.dataset, **_summary(r)} for r in results],
        "seconds": round(time.monotonic() - started, 2),
    }
    logger.info("done %s", orjson.dumps(summary).decode())
    return summary
