"""The Lambda handler against the fake SODA server and moto's S3 + Secrets Manager servers."""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from nyc_collisions import aws, daily, lambda_token
from nyc_collisions.drift import SchemaChange
from nyc_collisions.errors import UsageError
from nyc_collisions.report import _epoch
from nyc_collisions.schema import Column
from tests.cfn import load_template
from tests.conftest import GOOD_TOKEN, SMALL
from tests.fake_soda import FakeSoda, Latency
from tests.helpers import NAMES, Context, cli, deadline_past_for, exact, invoke


@pytest.fixture
def soda_token() -> Iterator[FakeSoda]:
    """A fake SODA server that refuses requests without the app token."""
    with FakeSoda(sizes=SMALL, seed=13, tokens=(GOOD_TOKEN,), require_token=True) as srv:
        yield srv


def test_scheduled_event_lands_the_days_changes(
    soda_token: FakeSoda,
    lambda_env: str,
    monkeypatch: pytest.MonkeyPatch,
    json_log: io.StringIO,
    tmp_path: Path,
) -> None:
    soda = soda_token
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    res = cli(
        "backfill",
        "--source",
        soda.url,
        "--dest",
        lambda_env,
        env={"SOCRATA_APP_TOKEN": GOOD_TOKEN},
    )
    assert res.code == 0, res.text
    for dataset_id in NAMES.values():
        soda.insert(dataset_id, 12)
        soda.edit(dataset_id, 8)
    event: dict[str, Any] = {"command": "update", "source": "aws.scheduler"}
    json_log.seek(0)
    json_log.truncate()
    summary = aws.handler(event, Context(60))
    assert summary["done"] is True
    by_name = {r["dataset"]: r for r in summary["results"]}
    assert {n: by_name[n]["rows"] for n in NAMES} == {n: 20 for n in NAMES}
    assert all(by_name[n]["watermark"]["row_id"] for n in NAMES)
    for name in NAMES:
        exact(soda, lambda_env, name, tmp_path, token=GOOD_TOKEN)
    lines = [line for line in json_log.getvalue().splitlines() if line.strip()]
    assert lines
    docs = []
    for line in lines:
        try:
            docs.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    assert all({"time", "level", "logger", "message"} <= set(d) for d in docs)
    assert GOOD_TOKEN not in json_log.getvalue()
    assert GOOD_TOKEN not in json.dumps(summary)
    again = aws.handler(event, Context(60))
    assert sum(r["rows"] for r in again["results"]) == 0


def test_a_failing_source_makes_it_raise(
    lambda_env: str, monkeypatch: pytest.MonkeyPatch, soda_ro: FakeSoda
) -> None:
    assert cli("backfill", "crashes", "--source", soda_ro.url, "--dest", lambda_env).code == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SOCRATA_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NYC_COLLISIONS_RETRIES", "2")
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    from nyc_collisions.errors import SourceUnavailable

    with pytest.raises(SourceUnavailable):
        aws.handler({"command": "update"}, Context(60))


def test_response_stays_small_with_100k_changed_rows(
    lambda_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = {"h9gi-nx95": 100_000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    with FakeSoda(sizes=sizes, seed=4, tokens=(GOOD_TOKEN,)) as srv:
        monkeypatch.setenv("SOCRATA_BASE_URL", srv.url)
        monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
        assert cli("backfill", "crashes", "--source", srv.url, "--dest", lambda_env).code == 0
        srv.replace("h9gi-nx95")
        summary = aws.handler({"command": "update"}, Context(300))
        assert summary["results"][0]["rows"] == 100_000
        assert len(json.dumps(summary)) < 4096


def test_backfill_under_a_tiny_budget_invoked_repeatedly_ends_exact(
    lambda_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sizes = {"h9gi-nx95": 3000, "f55k-p6yu": 6000, "bm4k-52h4": 10}
    # 90 pages of 100 rows, each held 0.1 s, 3 at a time: 3 s of serving at the least, more
    # than one invocation's 2.25 s (a quarter of its 3 s kept back) on any machine; each
    # invocation's setup on moto (S3 checks, the lease) takes well under that even when loaded
    latency = Latency(base=0.1, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=8, tokens=(GOOD_TOKEN,), latency=latency) as srv:
        monkeypatch.setenv("SOCRATA_BASE_URL", srv.url)
        monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes,persons")
        import nyc_collisions.extract as extract

        # the handler makes its own RunOptions: small pages and files come through them
        monkeypatch.setattr(extract.RunOptions, "__init__", _small_files(extract.RunOptions))
        invocations = 0
        while True:
            invocations += 1
            summary = aws.handler({"command": "backfill"}, Context(3.0))
            if summary["done"]:
                break
            assert invocations < 60
        assert invocations > 1
        exact(srv, lambda_env, "crashes", tmp_path, token=GOOD_TOKEN)
        exact(srv, lambda_env, "persons", tmp_path, token=GOOD_TOKEN)


def by_dataset(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["dataset"]: r for r in summary["results"]}


def _small_files(cls: Any) -> Any:
    """RunOptions with small pages and files, as a tiny budget needs to make progress."""
    original = cls.__init__

    def init(self: Any, *args: Any, **kw: Any) -> None:
        kw.setdefault("page_size", 100)
        kw.setdefault("file_rows", 200)
        original(self, *args, **kw)

    return init


# ------------------------------------------------------------------------------ metrics (EMF)


def _emf(text: str) -> list[dict[str, Any]]:
    """The Embedded Metric Format documents among log lines, each checked against the format:
    every metric a directive names has a number at the top level, every dimension a string."""
    docs = []
    for line in text.splitlines():
        if '"_aws"' not in line:
            continue
        doc = json.loads(line)
        meta = doc["_aws"]
        assert isinstance(meta["Timestamp"], int)
        assert meta["Timestamp"] > 1_600_000_000_000
        for directive in meta["CloudWatchMetrics"]:
            assert directive["Namespace"] == "NycCollisions"
            for dims in directive["Dimensions"]:
                assert dims
                assert all(isinstance(doc[d], str) for d in dims), dims
            for metric in directive["Metrics"]:
                assert isinstance(doc[metric["Name"]], int | float), metric
                assert metric["Unit"] in ("Count", "Seconds")
        docs.append(doc)
    return docs


def _metrics_of(docs: list[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    per_dataset = {d["Dataset"]: d for d in docs if "Dataset" in d and d["Command"] == "update"}
    (run,) = [d for d in docs if "UpdateCompleted" in d]
    return per_dataset, run


def test_rows_changed_on_the_day_an_update_lands_a_fresh_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`RowsChanged` is the rows the source changed since the last run, also on the day the
    update lands a fresh snapshot because `REFRESH_BATCHES` were landed (its bound made small:
    the same path as 100): a day's changes, not the dataset's size."""
    from nyc_collisions import incremental

    monkeypatch.setattr(incremental, "REFRESH_BATCHES", 3)
    dest = str(tmp_path / "land")
    crashes = NAMES["crashes"]
    with FakeSoda(sizes={crashes: 3000}, seed=5, tokens=(GOOD_TOKEN,)) as soda:
        monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
        monkeypatch.setenv("SOCRATA_APP_TOKEN", GOOD_TOKEN)
        monkeypatch.setenv("NYC_COLLISIONS_DEST", dest)
        monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
        assert cli("backfill", "crashes", "--source", soda.url, "--dest", dest).code == 0
        seen = []
        for _day in range(4):
            soda.insert(crashes, 3)
            soda.edit(crashes, 3)
            capsys.readouterr()
            (result,) = invoke({"command": "update"}, Context(300))["results"]
            per_dataset, _ = _metrics_of(_emf(capsys.readouterr().out))
            seen.append((result.get("refreshed", False), per_dataset["crashes"]["RowsChanged"]))
    assert seen == [(False, 6), (False, 6), (False, 6), (True, 6)]


def test_rows_changed_of_a_fresh_snapshot_the_deadline_stops_count_once_over_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every row replaced: the update lands a fresh snapshot, which the deadline stops and the
    loop's invocations resume. A stopped one has committed nothing, so the rows it changed are
    counted once, by the invocation that commits the snapshot."""
    import nyc_collisions.extract as extract

    monkeypatch.setattr(extract.RunOptions, "__init__", _small_files(extract.RunOptions))
    dest = str(tmp_path / "land")
    crashes = NAMES["crashes"]
    latency = Latency(base=0.2, per_row=0.0, per_skipped=0.0, max_concurrent=3, metadata=0.0)
    with FakeSoda(sizes={crashes: 3000}, seed=5, tokens=(GOOD_TOKEN,), latency=latency) as soda:
        monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
        monkeypatch.setenv("SOCRATA_APP_TOKEN", GOOD_TOKEN)
        monkeypatch.setenv("NYC_COLLISIONS_DEST", dest)
        monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
        monkeypatch.delenv(aws.STATE_MACHINE, raising=False)
        assert cli("backfill", "crashes", "--source", soda.url, "--dest", dest).code == 0
        soda.replace(crashes)
        changed, event = [], {"command": "update"}
        for _ in range(30):
            capsys.readouterr()
            try:
                done = invoke(event, Context(2.0))["done"]
            except aws.NotFinished:
                done = False
            per_dataset, _ = _metrics_of(_emf(capsys.readouterr().out))
            changed.append(per_dataset["crashes"]["RowsChanged"])
            if done:
                break
            event = {"command": "update", "loop": True}
    assert len(changed) > 1, changed  # the deadline stopped the snapshot at least once
    assert sum(changed) == 3000, changed


@pytest.mark.smoke
def test_metrics_of_a_scheduled_update(
    soda: FakeSoda,
    lambda_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "nyc-collisions-test")
    assert cli("backfill", "--source", soda.url, "--dest", lambda_env).code == 0
    for dataset_id in NAMES.values():
        soda.insert(dataset_id, 7)
        soda.edit(dataset_id, 5)
    soda.add_fault("429", times=2, match="bm4k-52h4")
    capsys.readouterr()
    summary = aws.handler({"command": "update"}, Context(60))
    assert summary["done"] is True
    per_dataset, run = _metrics_of(_emf(capsys.readouterr().out))
    assert set(per_dataset) == set(NAMES)
    assert run["UpdateCompleted"] == 1
    assert run["Function"] == "nyc-collisions-test"
    for name, dataset_id in NAMES.items():
        m = per_dataset[name]
        assert m["Function"] == "nyc-collisions-test"
        assert m["RowsLanded"] == m["RowsChanged"] == 12
        assert m["SchemaChanges"] == 0
        assert m["DurationSeconds"] > 0
        assert m["Retries"] >= m["Throttles"]
        # up to date: the source's last change is no later than the landed watermark
        meta = httpx.get(f"{soda.url}/api/views/{dataset_id}.json").json()
        mark = by_dataset(summary)[name]["watermark"]["updated_at"]
        expected = max(0.0, meta["rowsUpdatedAt"] - _epoch(mark))
        assert m["LagSeconds"] == pytest.approx(expected, abs=1)
        lag_directive = [
            d for d in m["_aws"]["CloudWatchMetrics"] if d["Metrics"][0]["Name"] == "LagSeconds"
        ]
        assert ["Function"] in lag_directive[0]["Dimensions"]  # the alarm's dimension
    assert per_dataset["vehicles"]["Throttles"] == 2
    assert per_dataset["crashes"]["Throttles"] == per_dataset["persons"]["Throttles"] == 0


def test_lag_counts_what_the_source_changed_since_the_landed_watermark(
    soda: FakeSoda,
    lambda_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run that lands nothing new while the source moved on reports the gap."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    assert cli("backfill", "crashes", "--source", soda.url, "--dest", lambda_env).code == 0
    before = httpx.get(f"{soda.url}/api/views/h9gi-nx95.json").json()["rowsUpdatedAt"]
    soda.edit("h9gi-nx95", 3)
    after = httpx.get(f"{soda.url}/api/views/h9gi-nx95.json").json()["rowsUpdatedAt"]
    assert after > before
    # the update is cut off before it fetches anything (no time left): the watermark stays
    capsys.readouterr()
    monkeypatch.delenv(aws.STATE_MACHINE, raising=False)
    with pytest.raises(aws.NotFinished):
        aws.handler({"command": "update"}, Context(0))
    docs = _emf(capsys.readouterr().out)
    per_dataset, run = _metrics_of(docs)
    assert run["UpdateCompleted"] == 0
    assert per_dataset["crashes"]["Status"] == "stopped"
    # the watermark is the source's last change at the backfill (rowsUpdatedAt has whole seconds)
    assert per_dataset["crashes"]["LagSeconds"] == pytest.approx(after - before, abs=1)


def test_a_schema_change_is_counted(
    soda_ro: FakeSoda,
    lambda_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`SchemaChanges` is 1 for a dataset whose result records a schema change (set by the
    update when the source's columns changed), 0 for the others."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes,vehicles")
    assert (
        cli("backfill", "crashes", "vehicles", "--source", soda_ro.url, "--dest", lambda_env).code
        == 0
    )

    from nyc_collisions import daily

    class Drifting(daily.Update):
        def run(self, stop: Any) -> Any:
            result = super().run(stop)
            if result.dataset == "crashes":
                result.schema_change = SchemaChange.between((), (Column("x", "text"),))
            return result

    monkeypatch.setattr(daily, "Update", Drifting)
    capsys.readouterr()
    aws.handler({"command": "update"}, Context(60))
    per_dataset, _ = _metrics_of(_emf(capsys.readouterr().out))
    assert per_dataset["crashes"]["SchemaChanges"] == 1
    assert per_dataset["vehicles"]["SchemaChanges"] == 0


def test_what_the_source_named_comes_back_without_the_token(
    soda_ro: FakeSoda,
    lambda_env: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The invocation's response quotes the source (a new column's name, here one that echoes
    the token): the token is masked there as in the logs."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    monkeypatch.setenv("SOCRATA_APP_TOKEN", GOOD_TOKEN)
    assert cli("backfill", "crashes", "--source", soda_ro.url, "--dest", lambda_env).code == 0

    from nyc_collisions import daily

    class Drifting(daily.Update):
        def run(self, stop: Any) -> Any:
            result = super().run(stop)
            result.schema_change = SchemaChange.between((), (Column(GOOD_TOKEN, "text"),))
            return result

    monkeypatch.setattr(daily, "Update", Drifting)
    lambda_token._token_cache.clear()
    try:
        response = aws.handler({"command": "update"}, Context(60))
    finally:
        lambda_token._token_cache.clear()
    text = json.dumps(response)
    assert "***" in text
    assert GOOD_TOKEN not in text


# ------------------------------------------------------------------------------ first deploy


BUDGET = 4.0  # seconds an invocation has here (it stops a quarter before)


@pytest.mark.smoke
def test_first_scheduled_update_backfills_and_the_loop_finishes_it(
    lambda_env: str,
    state_machine: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Deployed with nothing landed: the scheduled update backfills, starts the loop when its
    time is up (once, however often the schedule fires meanwhile), and the loop's invocations
    finish it; the data is then exact and the update counts as completed."""
    # 5,000 rows at 2 ms a row, 3 at a time: over 3.3 s of serving, more than one invocation
    sizes = {"h9gi-nx95": 1000, "f55k-p6yu": 4000, "bm4k-52h4": 10}
    latency = Latency(base=0.05, per_row=0.002, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=9, tokens=(GOOD_TOKEN,), latency=latency) as srv:
        monkeypatch.setenv("SOCRATA_BASE_URL", srv.url)
        monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes,persons")
        import nyc_collisions.extract as extract

        monkeypatch.setattr(extract.RunOptions, "__init__", _small_files(extract.RunOptions))
        sfn = boto3.client("stepfunctions")
        scheduled = {"command": "update", "source": "aws.scheduler"}
        first = aws.handler(scheduled, Context(BUDGET))
        assert first["done"] is False
        assert {r["command"] for r in first["results"]} == {"backfill"}
        (execution,) = sfn.list_executions(stateMachineArn=state_machine)["executions"]
        assert first["carried_on_by"] == execution["executionArn"]
        doc = json.loads(sfn.describe_execution(executionArn=execution["executionArn"])["input"])
        assert doc["command"] == "update"
        assert doc["datasets"] == ["crashes", "persons"]
        # the schedule fires again while the loop runs (here with no time to do anything, so
        # that it cannot be done): the loop goes on, and no second one starts
        again = aws.handler(scheduled, Context(0))
        assert again["carried_on_by"] == execution["executionArn"]
        assert len(sfn.list_executions(stateMachineArn=state_machine)["executions"]) == 1
        # the loop's invocations, as the state machine sends them
        payload = {**doc, "command": "update", "loop": True}
        capsys.readouterr()
        for _ in range(40):
            summary = aws.handler(payload, Context(BUDGET))
            if summary["done"]:
                break
            assert summary["carried_on_by"] == "loop"
        assert summary["done"] is True
        completed = [
            d["UpdateCompleted"] for d in _emf(capsys.readouterr().out) if "UpdateCompleted" in d
        ]
        assert completed == [0] * (len(completed) - 1) + [1]  # only the last one is done
        assert len(sfn.list_executions(stateMachineArn=state_machine)["executions"]) == 1
        exact(srv, lambda_env, "crashes", tmp_path, token=GOOD_TOKEN)
        exact(srv, lambda_env, "persons", tmp_path, token=GOOD_TOKEN)
        # the next day's update is an update
        srv.insert("h9gi-nx95", 4)
        nxt = aws.handler(scheduled, Context(60))
        assert nxt["done"] is True
        assert [(r["command"], r["rows"]) for r in nxt["results"]] == [
            ("update", 4),
            ("update", 0),
        ]


def test_an_unfinished_update_without_a_loop_fails(
    lambda_env: str, monkeypatch: pytest.MonkeyPatch, soda_ro: FakeSoda
) -> None:
    """With no state machine to carry it on, an update that ran out of time is a failure (so
    Lambda retries it and the alarms see it), not a silent success."""
    assert cli("backfill", "crashes", "--source", soda_ro.url, "--dest", lambda_env).code == 0
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    monkeypatch.delenv(aws.STATE_MACHINE, raising=False)
    with pytest.raises(aws.NotFinished, match="NYC_COLLISIONS_STATE_MACHINE"):
        aws.handler({"command": "update"}, Context(0))


def test_a_bad_state_machine_arn_is_refused_before_anything_runs(
    lambda_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(aws.STATE_MACHINE, "backfill-loop")
    with pytest.raises(UsageError, match="NYC_COLLISIONS_STATE_MACHINE"):
        aws.handler({"command": "update"}, Context(60))


# ------------------------------------------------------------------------------ the template


def test_the_handler_reads_every_variable_the_template_sets(
    soda_ro: FakeSoda, lambda_env: str, state_machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each environment variable the function gets from the template is one a run reads."""
    env = load_template()["Resources"]["CollisionsFunction"]["Properties"]["Environment"]
    wanted = set(env["Variables"])
    assert cli("backfill", "vehicles", "--source", soda_ro.url, "--dest", lambda_env).code == 0
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "vehicles")

    read: set[str] = set()

    class Recording(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            read.add(key)
            return super().get(key, default)

        def __getitem__(self, key: str) -> str:
            read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key: object) -> bool:
            read.add(str(key))
            return super().__contains__(key)

    recording = Recording(os.environ)
    monkeypatch.setattr(os, "environ", recording)
    assert aws.handler({"command": "update"}, Context(60))["done"] is True
    assert wanted - read == set()


@pytest.mark.parametrize("reconcile", ["stopped", "failed"])
def test_a_reconcile_that_stops_or_fails_after_the_updates_still_counts_the_update_completed(
    soda: FakeSoda,
    lambda_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    reconcile: str,
) -> None:
    """Sunday: every dataset is updated and the reconcile, not fitting, goes on tomorrow (its
    scan is recorded), or fails (and is tried again by each daily run until it passes). The
    data is fresh: UpdateCompleted is 1, or the freshness alarm (26 hourly periods under 1)
    would fire for fresh data."""
    from nyc_collisions.errors import SourceRejected

    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "vehicles")
    assert cli("backfill", "vehicles", "--source", soda.url, "--dest", lambda_env).code == 0
    soda.insert("bm4k-52h4", 4)
    capsys.readouterr()
    event = {"command": "update", "reconcile": True}
    if reconcile == "stopped":
        monkeypatch.setattr(daily, "Reconcile", deadline_past_for({"vehicles"}))
        summary = aws.handler(event, Context(60))
        kinds = [(r["command"], r["status"]) for r in summary["results"]]
        assert kinds == [("update", "updated"), ("reconcile", "stopped")]
        assert "carried_on_by" not in summary  # the next daily run goes on with it
    else:

        class Refused(daily.Reconcile):
            def run(self, stop: Any) -> Any:
                raise SourceRejected("the key scan's query was refused (400)")

        monkeypatch.setattr(daily, "Reconcile", Refused)
        with pytest.raises(SourceRejected):
            aws.handler(event, Context(60))
    docs = _emf(capsys.readouterr().out)
    (update,) = [d for d in docs if d.get("Command") == "update" and "Dataset" in d]
    assert (update["Status"], update["RowsLanded"]) == ("updated", 4)
    (run,) = [d for d in docs if "UpdateCompleted" in d]
    assert run["UpdateCompleted"] == 1


def test_the_lag_step_after_the_runs_keeps_to_the_invocations_time(
    soda: FakeSoda, lambda_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its runs the handler asks each dataset's metadata for the lag metric; a source that
    holds that request (the very case in which runs stop while the source is failing) must not
    keep the handler past its invocation's time, or Lambda kills it before its metrics and its
    carry-on."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    assert cli("backfill", "crashes", "--source", soda.url, "--dest", lambda_env).code == 0
    lags = aws._lags

    def source_holds_now(client: Any, storage: Any, names: set[str]) -> dict[str, float]:
        soda.add_fault("stall", times=1, match="h9gi-nx95", seconds=20)
        return lags(client, storage, names)

    monkeypatch.setattr(aws, "_lags", source_holds_now)
    budget = 8.0  # the runs stop a quarter of it before its end (SAFETY_SECONDS, short budgets)
    started = time.monotonic()
    aws.handler({"command": "update"}, Context(budget))
    assert time.monotonic() - started < budget


def test_lambda_lag_after_deadline_is_measured_when_cancelled_pages_still_hold_the_slots(
    soda: FakeSoda,
    lambda_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A run the invocation's deadline stops drops its pages in flight, which still count in
    flight a moment; the handler's lag request after it waits for a slot and is sent (it was
    refused while out of time, and LagSeconds went missing from the metrics)."""

    def cancelled_pages(client: Any) -> None:
        limit = client.limit
        for _ in range(limit._core.limit):  # the pages the deadline dropped, lingering
            with limit.request() as ticket:
                ticket.linger(0.5)

    crashes = _metrics_out_of_time(soda, lambda_env, monkeypatch, capsys, cancelled_pages)
    assert "LagSeconds" in crashes, crashes


def _metrics_out_of_time(
    soda: FakeSoda,
    lambda_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    before_lags: Callable[[Any], None],
) -> dict[str, Any]:
    """Crashes landed, then edited; an update invoked with no time left, `before_lags(client)`
    just before the handler measures the lag: the crashes metrics it printed."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    assert cli("backfill", "crashes", "--source", soda.url, "--dest", lambda_env).code == 0
    soda.edit("h9gi-nx95", 3)
    lags = aws._lags

    def hooked(client: Any, storage: Any, names: set[str]) -> dict[str, float]:
        before_lags(client)
        return lags(client, storage, names)

    monkeypatch.setattr(aws, "_lags", hooked)
    monkeypatch.delenv(aws.STATE_MACHINE, raising=False)
    capsys.readouterr()
    with pytest.raises(aws.NotFinished):
        aws.handler({"command": "update"}, Context(0))
    docs = _emf(capsys.readouterr().out)
    (crashes,) = [d for d in docs if d.get("Dataset") == "crashes"]
    return dict(crashes)


def test_taking_over_a_killed_runs_lease_keeps_to_the_invocations_time(
    soda_ro: FakeSoda, lambda_env: str, state_machine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease a killed invocation left is watched for a whole TTL before it is taken over; a
    dataset whose turn comes near the deadline stops at it instead (a stopped update: carried
    on), or Lambda kills the invocation before its metrics and its carry-on. Scaled down: an
    invocation of 12 s (the runs stop at 9 s), crashes' update ending at 7 s, then vehicles'
    lease, left by a killed run with a TTL of 6 s (its watch would end at 13 s)."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes,vehicles")
    res = cli("backfill", "crashes", "vehicles", "--source", soda_ro.url, "--dest", lambda_env)
    assert res.code == 0, res.text
    bucket, prefix = lambda_env.removeprefix("s3://").split("/", 1)
    killed = {
        "token": "0" * 32,
        "command": "update",
        "host": "169.254.10.99",  # another sandbox's
        "boot": "",
        "pid": 8,
        "started": "",
        "user": "sbx_user1051",
        "since": "2026-01-04T11:30:00Z",
        "ttl": 6.0,
        "beat": 3,
    }
    boto3.client("s3").put_object(
        Bucket=bucket, Key=f"{prefix}/vehicles/lock.json", Body=json.dumps(killed).encode()
    )
    budget = 12.0
    started = time.monotonic()

    class TakesMostOfTheBudget(daily.Update):  # as a long update or backfill of crashes would
        def run(self, stop: Any) -> Any:
            result = super().run(stop)
            if result.dataset == "crashes":
                time.sleep(max(0.0, started + 7.0 - time.monotonic()))
            return result

    monkeypatch.setattr(daily, "Update", TakesMostOfTheBudget)
    summary = aws.handler({"command": "update"}, Context(budget))
    took = time.monotonic() - started
    assert took < budget, f"the handler took {took:.1f}s of an invocation of {budget:.0f}s"
    statuses = [(r["dataset"], r["status"]) for r in summary["results"]]
    assert statuses == [("crashes", "updated"), ("vehicles", "stopped")], summary
    assert summary["carried_on_by"].startswith(
        state_machine.replace(":stateMachine:", ":execution:")
    )


def test_lag_is_measured_when_asking_for_rows_past_the_watermark_fails(
    soda: FakeSoda,
    lambda_env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Out of time each request is tried once: a 500 on the question whether rows are past
    the watermark (asked when a reconcile or snapshot began after it) leaves the lag counted
    from the watermark, not missing."""

    def failing_once(_client: Any) -> None:
        soda.add_fault("500", times=1, match="$limit=1")

    crashes = _metrics_out_of_time(soda, lambda_env, monkeypatch, capsys, failing_once)
    assert crashes["LagSeconds"] > 0, crashes
    asked = [r for r in soda.requests() if r["params"].get("$select") == ":id"]
    assert [r["fault"] for r in asked] == ["500"], asked  # asked, and failed


@pytest.mark.parametrize(
    ("stored", "token"),
    [
        ("tok-3f9a", "tok-3f9a"),
        ('{"app_token": "tok-3f9a"}', "tok-3f9a"),
        ('{"socrata_app_token": " tok-3f9a "}', "tok-3f9a"),  # the console's form, a key of its own
        ('"tok-3f9a"', "tok-3f9a"),
        ("12345", "12345"),
        ('{"app_token": null, "token": "tok-3f9a"}', "tok-3f9a"),
        ('{"app_token": ""}', None),
        ('{"Zq8mT3vLx2N9pQ7rW4sY6uA1b": ""}', None),  # the token typed as the key
        ("null", None),
        ('["tok-3f9a"]', None),
        ("true", None),
        ('{app_token: "Zq8mT3vLx2N9pQ7rW4sY6uA1b"}', None),  # JSON that does not parse
        ('{"app_token": "Zq8mT3vLx2N9pQ7rW4sY6uA1b",}', None),
        ('\ufeff{"app_token": "Zq8mT3vLx2N9pQ7rW4sY6uA1b"}', None),
        ('{"a": "val-one", "b": "val-two"}', None),
        ('{"app_token": 5}', None),
        ("   ", None),
    ],
)
def test_the_token_secret_in_each_form_an_operator_stores(
    lambda_env: str, monkeypatch: pytest.MonkeyPatch, stored: str, token: str | None
) -> None:
    """deploy/README.md: the secret holds the bare token or JSON. One that holds no token is
    an error naming the secret, never a run without the token (Socrata then throttles, and
    nothing would say why)."""
    name = os.environ["SOCRATA_APP_TOKEN_SECRET"]
    boto3.client("secretsmanager").put_secret_value(SecretId=name, SecretString=stored)
    assert "val-" not in _read_token(token, f"the secret {name}")


def _read_token(token: str | None, where: str) -> str:
    """The Lambda reads the token afresh: `token`, or (None) a refusal naming `where` and
    quoting nothing it holds, returned."""
    lambda_token._token_cache.clear()
    if token is not None:
        assert aws.app_token() == token
        return ""
    with pytest.raises(UsageError, match=f"{where} holds") as caught:
        aws.app_token()
    assert "Zq8mT3vL" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize(
    ("stored", "token"),
    [
        (" Zq8mT3vLx2N9pQ7rW4sY6uA1b\n", "Zq8mT3vLx2N9pQ7rW4sY6uA1b"),
        ("   ", None),
        ('{"app_token": "Zq8mT3vLx2N9pQ7rW4sY6uA1b"}', None),  # a parameter holds the bare token
        ("Zq8mT3vL x2N9pQ7rW4sY6uA1b", None),
    ],
)
def test_the_token_parameter_holds_the_bare_token(
    lambda_env: str, monkeypatch: pytest.MonkeyPatch, stored: str, token: str | None
) -> None:
    """An SSM parameter that holds no token, or text no token is made of, is an error naming
    the parameter (not SOCRATA_APP_TOKEN, which the function does not set), never quoting it."""
    name = "/nyc-collisions/socrata-app-token"
    boto3.client("ssm").put_parameter(Name=name, Value=stored, Type="SecureString", Overwrite=True)
    monkeypatch.delenv("SOCRATA_APP_TOKEN_SECRET", raising=False)
    monkeypatch.setenv("SOCRATA_APP_TOKEN_PARAMETER", name)
    assert "JSON" not in _read_token(token, f"the SSM parameter {name}")  # read as the bare token
