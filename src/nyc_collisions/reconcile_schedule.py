"""When the Lambda's daily run reconciles: the instant a dataset must have been reconciled since.

A dataset is reconciled when it last matched the source's keys at or before that instant
(`Manifest.last_reconciled`: the start of its last finished reconcile's key scan, or of its
last snapshot from the source; `daily.DailyRun.reconcile_since`). Weekly, it is the start of
the last `RECONCILE_WEEKDAY` in the schedule's time zone: that day's run reconciles every
dataset, and a reconcile that did not end that day (the deadline, a failure) goes on the next
days until it does, without redoing the datasets already reconciled. An event's `"reconcile":
true` asks for every dataset now; the loop that carries an unfinished update on passes the
instant on as `"reconcile_since"` (a loop started with `"reconcile": true` takes its own start,
which the state machine passes on).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import UsageError

WEEKDAY_ENV = "NYC_COLLISIONS_RECONCILE_WEEKDAY"
ZONE_ENV = "NYC_COLLISIONS_TIMEZONE"
WEEKDAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
_FULL = ("MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY")
_STAMP = "%Y-%m-%dT%H:%M:%SZ"  # as `manifest.utc_now`, which the manifest's times are
SKEW = timedelta(minutes=5)  # a reconcile_since this far ahead of the clock is still taken


def weekday_from_env() -> int | None:
    """`NYC_COLLISIONS_RECONCILE_WEEKDAY` (a day's English name or its first three letters, any
    case) as 0 = Monday .. 6 = Sunday; None when unset."""
    raw = os.environ.get(WEEKDAY_ENV, "").strip()
    day = raw.upper()
    if not day:
        return None
    if day in _FULL:
        return _FULL.index(day)
    if day in WEEKDAYS:
        return WEEKDAYS.index(day)
    raise UsageError(f"{WEEKDAY_ENV}={raw!r}: must be a day of the week, like SUN")


def zone_from_env() -> tzinfo:
    """`NYC_COLLISIONS_TIMEZONE`: the IANA time zone the weekday is taken in (the schedule's);
    UTC when unset."""
    raw = os.environ.get(ZONE_ENV, "").strip()
    if not raw:
        return UTC
    try:
        return ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise UsageError(
            f"{ZONE_ENV}={raw!r}: not an IANA time zone, like America/New_York"
        ) from exc


def weekly_since(weekday: int, zone: tzinfo, now: datetime) -> str:
    """The start (midnight in `zone`) of the last `weekday` at or before `now`, in UTC."""
    local = now.astimezone(zone)
    day = (local - timedelta(days=(local.weekday() - weekday) % 7)).date()
    midnight = datetime(day.year, day.month, day.day, tzinfo=zone)
    return midnight.astimezone(UTC).strftime(_STAMP)


def since_from_event(event: dict[str, Any], now: datetime) -> str | None:
    """What the event asks: `"reconcile_since"` (as the loop passes it on), or `"reconcile":
    true` (every dataset, now: in the loop, as of the loop's start, `"loop_started"`, the same
    in each of its invocations); None for neither. A bad value is a ValueError."""
    given = event.get("reconcile_since")
    if given is not None:
        text = str(given)
        try:
            at: datetime | None = datetime.strptime(text, _STAMP).replace(tzinfo=UTC)
        except ValueError:
            at = None
        # compared as text with the manifest's times: only their very form will do, and a time
        # to come would make each run reconcile again
        if at is None or at.strftime(_STAMP) != text or at > now + SKEW:
            raise ValueError(
                f"reconcile_since {given!r}: must be a UTC time like 2026-01-04T05:00:00Z,"
                " not later than now"
            )
        return text
    if not event.get("reconcile"):
        return None
    started = event.get("loop_started") if event.get("loop") else None
    if started:  # Step Functions' ISO 8601, with milliseconds
        try:
            now = datetime.fromisoformat(str(started).replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"loop_started {started!r}: not an ISO 8601 time") from None
    return now.astimezone(UTC).strftime(_STAMP)


def latest(*instants: str | None) -> str | None:
    """The latest of the instants given (they compare as strings); None when none is."""
    given = [i for i in instants if i]
    return max(given) if given else None
