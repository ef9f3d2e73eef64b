"""The Lambda handler against the fake SODA server and moto's S3 + Secrets Manager servers."""

from __future__ import annotations

import io
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from nyc_collisions import aws
from tests.conftest import GOOD_TOKEN, SMALL
from tests.fake_soda import FakeSoda, Latency
from tests.helpers import NAMES, cli, exact


class Context:
    """What Lambda hands the handler: here only the time left matters."""

    def __init__(self, seconds: float) -> None:
        import time

        self.deadline = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        import time

        return int((self.deadline - time.monotonic()) * 1000)


@pytest.fixture
def lambda_env(bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Environment as the SAM template sets it; the token lives in Secrets Manager."""
    secret = "nyc-collisions/socrata-app-token"
    sm = boto3.client("secretsmanager")
    try:
        sm.create_secret(Name=secret, SecretString=GOOD_TOKEN)
    except sm.exceptions.ResourceExistsException:
        sm.put_secret_value(SecretId=secret, SecretString=GOOD_TOKEN)
    dest = f"s3://{bucket}/collisions_raw_data"
    monkeypatch.setenv("NYC_COLLISIONS_DEST", dest)
    monkeypatch.setenv("SOCRATA_APP_TOKEN_SECRET", secret)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes,persons,vehicles")
    aws._token_cache.clear()
    yield dest
    aws._token_cache.clear()


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


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


def test_reconcile_on_the_configured_weekday(
    soda: FakeSoda, lambda_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "vehicles")
    assert cli("backfill", "vehicles", "--source", soda.url, "--dest", lambda_env).code == 0
    soda.delete("bm4k-52h4", 6)
    import datetime as dt

    today = dt.datetime.now(dt.UTC).strftime("%a").upper()
    monkeypatch.setenv("NYC_COLLISIONS_RECONCILE_WEEKDAY", today)
    summary = aws.handler({"command": "update"}, Context(60))
    kinds = [r["status"] for r in summary["results"]]
    assert kinds == ["updated", "reconciled"]
    assert summary["results"][1]["vanished"] == 6
    exact(soda, lambda_env, "vehicles", tmp_path, token=GOOD_TOKEN)


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
    sizes = {"h9gi-nx95": 1500, "f55k-p6yu": 3000, "bm4k-52h4": 10}
    latency = Latency(base=0.05, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=8, tokens=(GOOD_TOKEN,), latency=latency) as srv:
        monkeypatch.setenv("SOCRATA_BASE_URL", srv.url)
        monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes,persons")
        monkeypatch.setattr("nyc_collisions.extract.DEFAULT_PAGE_SIZE", 100)
        import nyc_collisions.extract as extract

        monkeypatch.setattr(extract.RunOptions, "__init__", _small_files(extract.RunOptions))
        invocations = 0
        while True:
            invocations += 1
            summary = aws.handler({"command": "backfill"}, Context(1.2))
            if summary["done"]:
                break
            assert invocations < 60
        assert invocations > 2
        exact(srv, lambda_env, "crashes", tmp_path, token=GOOD_TOKEN)
        exact(srv, lambda_env, "persons", tmp_path, token=GOOD_TOKEN)


def _small_files(cls: Any) -> Any:
    """RunOptions with small pages and files, as a tiny budget needs to make progress."""
    original = cls.__init__

    def init(self: Any, *args: Any, **kw: Any) -> None:
        kw.setdefault("page_size", 100)
        kw.setdefault("file_rows", 200)
        original(self, *args, **kw)

    return init
