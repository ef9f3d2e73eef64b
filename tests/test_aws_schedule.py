"""The Lambda's weekly reconcile, the loop that carries an unfinished update on, and the alarm of
a table that fails to sync: against the fake SODA server and moto (S3, Step Functions).

The days are simulated: the handler's and the manifest's clocks are set to the test's, days
after the backfill (which ran at the real time)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import zoneinfo
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from nyc_collisions import aws, daily, manifest, scanrecord, snapshot
from nyc_collisions.reconcile_schedule import ZONE_ENV, zone_from_env
from tests.cfn import load_template
from tests.conftest import GOOD_TOKEN
from tests.fake_soda import FakeSoda
from tests.helpers import NAMES, Context, cli, deadline_past_for, exact

NEW_YORK = "America/New_York"
DAY_NAMES = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")


class Clock:
    """The time the handler and the manifest's commits see: `at`, set by the test."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def at_local(self, day: datetime, hour: int, minute: int = 0) -> None:
        """`day`'s date at hour:minute in New York."""
        local = datetime(
            day.year, day.month, day.day, hour, minute, tzinfo=zoneinfo.ZoneInfo(NEW_YORK)
        )
        self.at = local.astimezone(UTC)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock(datetime.now(UTC))

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return clock.at.astimezone(tz) if tz else clock.at.replace(tzinfo=None)

    monkeypatch.setattr(aws, "datetime", Frozen)
    monkeypatch.setattr(manifest, "datetime", Frozen)  # commit times, a snapshot's start
    monkeypatch.setattr(scanrecord, "datetime", Frozen)  # a key scan's age
    return clock


def _backfill(soda: FakeSoda, dest: str, *names: str) -> None:
    res = cli("backfill", *names, "--source", soda.url, "--dest", dest)
    assert res.code == 0, res.text


def _weekly_on_sunday(
    soda: FakeSoda, dest: str, monkeypatch: pytest.MonkeyPatch, *names: str, backfill: bool = True
) -> None:
    """The Lambda's environment with a reconcile on Sundays in New York for `names`, which are
    backfilled unless `backfill` is false."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", ",".join(names))
    monkeypatch.setenv("NYC_COLLISIONS_RECONCILE_WEEKDAY", "SUN")
    monkeypatch.setenv(ZONE_ENV, NEW_YORK)
    if backfill:
        _backfill(soda, dest, *names)


def _kinds(summary: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["command"], r["dataset"]) for r in summary["results"]]


def _next(weekday: str) -> datetime:
    """The next `weekday` in New York after today: it begins after the backfill, the week
    before it began before."""
    day = datetime.now(zoneinfo.ZoneInfo(NEW_YORK)) + timedelta(days=1)
    while DAY_NAMES[day.weekday()] != weekday:
        day += timedelta(days=1)
    return day


def test_the_weekly_reconcile_is_taken_in_the_schedules_time_zone(
    soda: FakeSoda, lambda_env: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saturday 9 pm in New York is Sunday in UTC: a SUN reconcile waits for New York's Sunday."""
    _weekly_on_sunday(soda, lambda_env, monkeypatch, "vehicles")
    soda.delete(NAMES["vehicles"], 3)
    sunday = _next("SUN")
    clock.at_local(sunday - timedelta(days=1), 21)  # Saturday 21:00 EST/EDT: Sunday in UTC
    assert clock.at.strftime("%a") == "Sun"
    assert _kinds(aws.handler({"command": "update"}, Context(60))) == [("update", "vehicles")]
    clock.at_local(sunday, 6, 30)
    summary = aws.handler({"command": "update"}, Context(60))
    assert _kinds(summary) == [("update", "vehicles"), ("reconcile", "vehicles")]
    assert summary["results"][1]["vanished"] == 3


def test_a_compaction_is_not_a_reconcile(
    soda: FakeSoda, lambda_env: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot from the source counts as reconciled (it is the source's whole state); a
    compaction, which rewrites what landed, does not: Sunday's run after it reconciles, and
    `status` says when the data last matched the source's keys."""
    _weekly_on_sunday(soda, lambda_env, monkeypatch, "vehicles")
    soda.delete(NAMES["vehicles"], 2)
    sunday = _next("SUN")
    clock.at_local(sunday, 3)
    assert cli("compact", "vehicles", "--dest", lambda_env).code == 0
    clock.at_local(sunday, 6, 30)
    summary = aws.handler({"command": "update"}, Context(60))
    assert _kinds(summary) == [("update", "vehicles"), ("reconcile", "vehicles")]
    assert summary["results"][1]["vanished"] == 2
    res = cli("status", "vehicles", "--json", "--dest", lambda_env, "--source", soda.url)
    (entry,) = json.loads(res.out)
    assert entry["last_reconciled"] == clock.at.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_reconcile_counts_as_of_its_key_scans_start(
    soda: FakeSoda, lambda_env: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconcile begun on Saturday night and ended on Sunday compared keys scanned before
    Sunday began: it counts as of Saturday, so Monday's run reconciles again."""
    _weekly_on_sunday(soda, lambda_env, monkeypatch, "vehicles")
    sunday = _next("SUN")
    clock.at_local(sunday - timedelta(days=1), 23)
    # the key scan begins, then its pages are held past the invocation's time: it stops
    soda.add_fault("stall", times=50, match="select=:id,unique_id", seconds=30)
    saturday = aws.handler({"command": "update", "reconcile": True}, Context(8))
    soda.clear_faults()
    assert saturday["results"][-1]["status"] == "stopped"
    clock.at_local(sunday, 6, 30)
    assert _kinds(aws.handler({"command": "update"}, Context(60)))[-1] == ("reconcile", "vehicles")
    clock.at_local(sunday + timedelta(days=1), 6, 30)
    assert _kinds(aws.handler({"command": "update"}, Context(60)))[-1] == ("reconcile", "vehicles")


def test_a_weekly_reconcile_that_failed_goes_on_the_next_day_once(
    soda: FakeSoda,
    lambda_env: str,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Sunday's run fails (the source is down all day): Monday's run reconciles each dataset,
    and Tuesday's reconciles none (they were reconciled since Sunday began)."""
    _weekly_on_sunday(soda, lambda_env, monkeypatch, "crashes", "vehicles")
    soda.delete(NAMES["crashes"], 4)
    soda.delete(NAMES["vehicles"], 6)
    sunday = _next("SUN")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with monkeypatch.context() as down:
        down.setenv("SOCRATA_BASE_URL", dead)
        down.setenv("NYC_COLLISIONS_RETRIES", "1")
        clock.at_local(sunday, 6, 30)
        with pytest.raises(Exception, match=r"127\.0\.0\.1"):
            aws.handler({"command": "update"}, Context(60))
    clock.at_local(sunday + timedelta(days=1), 6, 30)
    monday = aws.handler({"command": "update"}, Context(60))
    assert [k for k in _kinds(monday) if k[0] == "reconcile"] == [
        ("reconcile", "crashes"),
        ("reconcile", "vehicles"),
    ]
    assert [r.get("vanished") for r in monday["results"] if r["command"] == "reconcile"] == [4, 6]
    clock.at_local(sunday + timedelta(days=2), 6, 30)
    tuesday = aws.handler({"command": "update"}, Context(60))
    assert [k for k in _kinds(tuesday) if k[0] == "reconcile"] == []
    for name in ("crashes", "vehicles"):
        exact(soda, lambda_env, name, tmp_path, token=GOOD_TOKEN)


def test_the_loop_does_not_reconcile_again_what_it_reconciled(
    soda: FakeSoda,
    lambda_env: str,
    state_machine: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """An update asked to reconcile runs out of time and the loop carries it on: one invocation
    reconciles crashes and runs out of time in vehicles'; the next goes on with vehicles only,
    and is done (a loop that reconciled every dataset from the start each time could never end
    once the reconciles take more than one invocation)."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes,vehicles")
    _backfill(soda, lambda_env, "crashes", "vehicles")
    soda.delete(NAMES["crashes"], 4)
    soda.delete(NAMES["vehicles"], 6)
    first = aws.handler({"command": "update", "reconcile": True}, Context(0))
    assert first["done"] is False
    sfn = boto3.client("stepfunctions")
    doc = json.loads(sfn.describe_execution(executionArn=first["carried_on_by"])["input"])
    payload = {**doc, "command": "update", "loop": True}  # as the state machine sends it
    with monkeypatch.context() as late:
        late.setattr(daily, "Reconcile", deadline_past_for({"vehicles"}))
        second = aws.handler(payload, Context(60))
    assert [(r["command"], r["dataset"], r["status"]) for r in second["results"]][2:] == [
        ("reconcile", "crashes", "reconciled"),
        ("reconcile", "vehicles", "stopped"),
    ]
    assert second["done"] is False
    third = aws.handler(payload, Context(60))
    assert _kinds(third) == [
        ("update", "crashes"),
        ("update", "vehicles"),
        ("reconcile", "vehicles"),
    ]
    assert third["done"] is True
    for name in ("crashes", "vehicles"):
        exact(soda, lambda_env, name, tmp_path, token=GOOD_TOKEN)


def _reconciled(summary: dict[str, Any]) -> list[str]:
    return [r["dataset"] for r in summary["results"] if r["command"] == "reconcile"]


def test_a_loop_started_with_reconcile_true_reconciles_each_dataset_once(
    soda: FakeSoda, lambda_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop an operator started with {"command": "update", "reconcile": true}: the state
    machine passes that input to each invocation, with the loop's start (`loop_started`); the
    reconcile is as of then in each, so what one invocation reconciled the next leaves."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes,vehicles")
    _backfill(soda, lambda_env, "crashes", "vehicles")
    started = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    payload = {"command": "update", "reconcile": True, "loop": True, "loop_started": started}
    # the times compared are whole seconds: a reconcile begun within the loop's very second
    # would be done again (safe, and what a loop begun a second before its first run never sees)
    time.sleep(1.1)
    with monkeypatch.context() as late:
        late.setattr(daily, "Reconcile", deadline_past_for({"vehicles"}))
        first = aws.handler(payload, Context(60))
    assert _reconciled(first) == ["crashes", "vehicles"]
    assert first["done"] is False
    second = aws.handler(payload, Context(60))
    assert _reconciled(second) == ["vehicles"]
    assert second["done"] is True


@pytest.mark.parametrize(
    "given", ["2026-1-4T5:0:0Z", "2026-01- 4T05:00:00Z", "2099-01-01T00:00:00Z"]
)
def test_a_reconcile_since_not_in_the_manifests_form_or_to_come_is_refused(
    soda_ro: FakeSoda, lambda_env: str, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    """Times compare as text with the manifest's: an unpadded one ("2026-1-...") sorts after
    any of February to September's, and one to come is never met; each would reconcile every
    dataset at every invocation."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    with pytest.raises(ValueError, match="reconcile_since"):
        aws.handler({"command": "update", "reconcile_since": given}, Context(60))


def test_a_snapshot_counts_as_reconciled_as_of_its_start(
    soda: FakeSoda,
    lambda_env: str,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A backfill begun on Saturday night and committed after Sunday began (resumed after a
    kill) may hold rows deleted in between: Sunday's run reconciles it."""
    _weekly_on_sunday(soda, lambda_env, monkeypatch, "vehicles", backfill=False)
    sunday = _next("SUN")
    clock.at_local(sunday - timedelta(days=1), 23)

    def killed(*_a: object, **_k: object) -> None:
        raise RuntimeError("killed before the commit")

    with monkeypatch.context() as kill:
        kill.setattr(snapshot._Snapshot, "_commit", killed)
        with contextlib.suppress(RuntimeError):
            assert cli("backfill", "vehicles", "--source", soda.url, "--dest", lambda_env).code
    soda.delete(NAMES["vehicles"], 3)  # after the snapshot read them
    clock.at_local(sunday, 0, 30)
    _backfill(soda, lambda_env, "vehicles")  # resumed: committed on Sunday
    clock.at_local(sunday, 6, 30)
    summary = aws.handler({"command": "update"}, Context(60))
    assert _kinds(summary) == [("update", "vehicles"), ("reconcile", "vehicles")]
    exact(soda, lambda_env, "vehicles", tmp_path, token=GOOD_TOKEN)


def test_a_loop_running_another_job_does_not_carry_this_update_on(
    soda_ro: FakeSoda, lambda_env: str, state_machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's backfill loop, or a loop updating other datasets, is running: the update
    that is not done starts its own loop (once, however often the schedule fires)."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    _backfill(soda_ro, lambda_env, "crashes")
    sfn = boto3.client("stepfunctions")
    for other in ({}, {"command": "update", "datasets": ["vehicles"]}):
        sfn.start_execution(stateMachineArn=state_machine, input=json.dumps(other))
    first = aws.handler({"command": "update"}, Context(0))
    doc = json.loads(sfn.describe_execution(executionArn=first["carried_on_by"])["input"])
    assert (doc["command"], doc["datasets"]) == ("update", ["crashes"])
    again = aws.handler({"command": "update"}, Context(0))
    assert again["carried_on_by"] == first["carried_on_by"]
    assert len(sfn.list_executions(stateMachineArn=state_machine)["executions"]) == 3


def test_a_running_loop_counts_by_what_its_invocations_do(
    soda_ro: FakeSoda, lambda_env: str, state_machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running loop whose input says "reconcile": true (as an earlier version's carry-on
    wrote) does this update with its reconcile; one whose input its invocations refuse (a bad
    reconcile_since) does nothing, and the update starts its own loop."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    _backfill(soda_ro, lambda_env, "crashes")
    sfn = boto3.client("stepfunctions")

    def running(doc: dict[str, Any]) -> str:
        return str(
            sfn.start_execution(stateMachineArn=state_machine, input=json.dumps(doc))[
                "executionArn"
            ]
        )

    bad = running({"command": "update", "datasets": ["crashes"], "reconcile_since": "9"})
    first = aws.handler({"command": "update", "reconcile": True}, Context(0))
    assert first["carried_on_by"] != bad
    sfn.stop_execution(executionArn=first["carried_on_by"])
    # the old loop reconciles as of its start, and the update asks as of its own, both to the
    # second: begun at a second's start, the update asks within the same second (a later
    # second's ask is not done by that loop, rightly)
    time.sleep(1.01 - time.time() % 1)
    old = running({"command": "update", "datasets": ["crashes"], "reconcile": True})
    again = aws.handler({"command": "update", "reconcile": True}, Context(0))
    assert again["carried_on_by"] == old


# ------------------------------------------------------------------------------ the table alarm


def _emf(text: str) -> list[dict[str, Any]]:
    docs = []
    for line in text.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            docs.append(json.loads(line))
    return docs


def _fires(alarm: dict[str, Any], docs: list[dict[str, Any]]) -> bool:
    """Whether a single-metric alarm of the template goes to ALARM on the metrics `docs`
    publish within one of its periods (the statistic over every value of its metric)."""
    p = alarm["Properties"]
    wanted = sorted(d["Name"] for d in p.get("Dimensions", []))
    values = []
    for doc in docs:
        for directive in doc["_aws"]["CloudWatchMetrics"]:
            if directive["Namespace"] != p["Namespace"]:
                continue
            names = [m["Name"] for m in directive["Metrics"]]
            if p["MetricName"] in names and wanted in [sorted(d) for d in directive["Dimensions"]]:
                values.append(doc[p["MetricName"]])
    if not values:
        return False
    value = {"Maximum": max, "Sum": sum, "Minimum": min}[p["Statistic"]](values)
    compare = {
        "GreaterThanOrEqualToThreshold": value >= p["Threshold"],
        "GreaterThanThreshold": value > p["Threshold"],
        "LessThanThreshold": value < p["Threshold"],
    }
    return bool(compare[p["ComparisonOperator"]])


def test_a_table_that_fails_to_sync_sets_off_an_alarm(
    soda: FakeSoda,
    lambda_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The landed data is committed and the invocation succeeds, so no error alarm sees a table
    that fails to sync every day: the metrics it publishes set off one of the template's alarms,
    and a run that syncs every table clears it."""
    from nyc_collisions import table as table_module

    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes,vehicles")
    monkeypatch.setenv("NYC_COLLISIONS_TABLE", "delta")
    _backfill(soda, lambda_env, "crashes", "vehicles")
    alarms = [
        r
        for r in load_template()["Resources"].values()
        if r["Type"] == "AWS::CloudWatch::Alarm" and "MetricName" in r["Properties"]
    ]

    def broken(*_args: object, **_kw: object) -> None:
        raise table_module.TableError("the table store went away")

    with monkeypatch.context() as patch:
        patch.setattr(table_module, "sync_table", broken)
        capsys.readouterr()
        failing = aws.handler({"command": "update"}, Context(60))
        published = _emf(capsys.readouterr().out)
    assert failing["table_failed"] == ["crashes", "vehicles"]
    assert [a for a in alarms if _fires(a, published)], "no alarm fires"
    capsys.readouterr()
    healed = aws.handler({"command": "update"}, Context(60))
    assert healed["table_failed"] == []
    assert not [a for a in alarms if _fires(a, _emf(capsys.readouterr().out))]


@pytest.mark.smoke
def test_the_schedules_time_zone_needs_no_system_time_zone_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Lambda image may have no /usr/share/zoneinfo: the zone still resolves (tzdata)."""
    zoneinfo.reset_tzpath(to=[])
    zoneinfo.ZoneInfo.clear_cache()
    try:
        monkeypatch.setenv(ZONE_ENV, NEW_YORK)
        zone = zone_from_env()
        july = datetime(2026, 7, 1, 12, tzinfo=UTC).astimezone(zone)
        assert july.utcoffset() == timedelta(hours=-4)
    finally:
        zoneinfo.reset_tzpath()
        zoneinfo.ZoneInfo.clear_cache()
