"""CloudWatch metrics of the Lambda handler, as Embedded Metric Format (EMF) log lines.

A JSON object printed on its own line to the function's log with an `_aws.CloudWatchMetrics`
directive becomes metrics in CloudWatch, with no API call and no extra permission (the log is
the transport). The format is a few keys, so it is written here rather than through a library.

Per dataset and run (dimensions `Function`, `Dataset`): `RowsLanded`, `RowsChanged`,
`LagSeconds` (the source's `rowsUpdatedAt` minus the landed watermark, never negative),
`DurationSeconds`, `Retries`, `Throttles`, `SchemaChanges` and, with a table, `TableErrors` (1
when the dataset's table could not be brought up to its manifest, else 0: the landed data is
committed, so the run itself succeeds). `LagSeconds` and `TableErrors` are also published under
`Function` alone, whose Maximum (the worst dataset) the alarms watch. Per run (dimension
`Function`): `UpdateCompleted`, 1 when an update brought every dataset up to date, else 0: the
freshness alarm watches it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from .results import DatasetResult

NAMESPACE = "NycCollisions"
THROTTLE_CAUSES = frozenset({"429", "403 throttle"})  # as `SodaClient` counts its retries

_DATASET_METRICS = (
    ("RowsLanded", "Count"),
    ("RowsChanged", "Count"),
    ("DurationSeconds", "Seconds"),
    ("Retries", "Count"),
    ("Throttles", "Count"),
    ("SchemaChanges", "Count"),
)


@dataclass(frozen=True)
class DatasetMetrics:
    """What one command did to one dataset in one invocation."""

    dataset: str
    command: str
    status: str
    rows_landed: int
    rows_changed: int | None  # None: not a change count (a backfill)
    duration_seconds: float
    retries: int
    throttles: int
    schema_changes: int
    lag_seconds: float | None = None  # None: unknown (no watermark, or no rowsUpdatedAt)
    table_errors: int | None = None  # 1: its table's sync failed; None: no table kept


def rows_changed(command: str, r: DatasetResult) -> int | None:
    """Rows the source changed since the last run, as this run saw them: an update's rows past
    the watermark (counted by the source when it landed a fresh snapshot instead), a
    reconcile's missing + stale + vanished."""
    if command == "update":
        return r.rows if r.changed is None else r.changed
    if command == "reconcile":
        return 0 if r.reconciled is None else r.reconciled.changed
    return None


def from_result(
    command: str, r: DatasetResult, retries: int, throttles: int, table: bool = False
) -> DatasetMetrics:
    """A dataset's metrics from what the command returned (lag comes later: `with_lags`);
    `table`: the run keeps the dataset's table."""
    return DatasetMetrics(
        r.dataset,
        command,
        r.status,
        r.rows,
        rows_changed(command, r),
        r.seconds,
        retries,
        throttles,
        int(r.schema_change is not None),
        table_errors=int(bool(r.table_error)) if table else None,
    )


def with_lags(measured: list[DatasetMetrics], lags: dict[str, float]) -> list[DatasetMetrics]:
    """The lag of each dataset on its first line (one value per dataset and run)."""
    out, seen = [], set()
    for m in measured:
        if m.dataset in lags and m.dataset not in seen:
            m = replace(m, lag_seconds=lags[m.dataset])
            seen.add(m.dataset)
        out.append(m)
    return out


class RetryMeter:
    """Retries and throttles since the last `take`, from a client's cumulative counters."""

    def __init__(self, counts: Callable[[], Counter[str]]) -> None:
        self._counts = counts
        self._last = Counter(counts())

    def take(self) -> tuple[int, int]:
        now = Counter(self._counts())
        delta = now - self._last
        self._last = now
        return sum(delta.values()), sum(n for c, n in delta.items() if c in THROTTLE_CAUSES)


def _directive(dimensions: list[list[str]], metrics: Iterable[tuple[str, str]]) -> dict[str, Any]:
    return {
        "Namespace": NAMESPACE,
        "Dimensions": dimensions,
        "Metrics": [{"Name": name, "Unit": unit} for name, unit in metrics],
    }


def dataset_line(function: str, m: DatasetMetrics, now_ms: int | None = None) -> str:
    """One EMF line with a dataset's metrics (a metric with no value is left out)."""
    values: dict[str, float | int | None] = {
        "RowsLanded": m.rows_landed,
        "RowsChanged": m.rows_changed,
        "DurationSeconds": round(m.duration_seconds, 3),
        "Retries": m.retries,
        "Throttles": m.throttles,
        "SchemaChanges": m.schema_changes,
    }
    present = [(n, u) for n, u in _DATASET_METRICS if values[n] is not None]
    directives = [_directive([["Function", "Dataset"]], present)]
    # also under `Function` alone: its Maximum is the worst dataset's, which an alarm watches
    worst: list[tuple[str, str]] = []
    if m.lag_seconds is not None:
        values["LagSeconds"] = round(m.lag_seconds, 3)
        worst.append(("LagSeconds", "Seconds"))
    if m.table_errors is not None:
        values["TableErrors"] = m.table_errors
        worst.append(("TableErrors", "Count"))
    if worst:
        directives.append(_directive([["Function", "Dataset"], ["Function"]], worst))
    doc: dict[str, Any] = {
        "_aws": {"Timestamp": now_ms or int(time.time() * 1000), "CloudWatchMetrics": directives},
        "Function": function,
        "Dataset": m.dataset,
        "Command": m.command,
        "Status": m.status,
    }
    doc.update({k: v for k, v in values.items() if v is not None})
    return orjson.dumps(doc).decode()


def update_line(function: str, done: bool, now_ms: int | None = None) -> str:
    """One EMF line for a whole `update` invocation: `UpdateCompleted`, 1 when it is done."""
    doc = {
        "_aws": {
            "Timestamp": now_ms or int(time.time() * 1000),
            "CloudWatchMetrics": [_directive([["Function"]], [("UpdateCompleted", "Count")])],
        },
        "Function": function,
        "Command": "update",
        "UpdateCompleted": int(done),
    }
    return orjson.dumps(doc).decode()
