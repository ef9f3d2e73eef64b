"""S3's `DeleteObjects` answers 200 even for keys it did not delete (a role without
`s3:DeleteObject` gets `AccessDenied` for each, a busy bucket `InternalError` or `SlowDown`):
each key's error counts. The S3 server is moto's; only its answer to `DeleteObjects` is edited,
for the keys a test says, as S3 would answer."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import GOOD_TOKEN
from tests.fake_soda import FakeSoda
from tests.helpers import cli


@pytest.fixture
def refuse(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[Callable[[str], str | None]], None]:
    """`refuse(rule)`: from now on `DeleteObjects` leaves each key for which `rule(key)` gives an
    error code, and answers that code for it."""
    from botocore.client import BaseClient

    real = BaseClient._make_api_call

    def install(rule: Callable[[str], str | None]) -> None:
        def call(self: Any, operation: str, params: dict[str, Any]) -> Any:
            if operation != "DeleteObjects":
                return real(self, operation, params)
            objects = params["Delete"]["Objects"]
            errors = [(o["Key"], rule(o["Key"])) for o in objects]
            kept = [o for o, (_, code) in zip(objects, errors, strict=True) if code is None]
            answer = dict(
                real(self, operation, {**params, "Delete": {**params["Delete"], "Objects": kept}})
                if kept
                else {}
            )
            answer["Errors"] = [
                {"Key": key, "Code": code, "Message": f"{code} (test)"}
                for key, code in errors
                if code is not None
            ]
            return answer

        monkeypatch.setattr(BaseClient, "_make_api_call", call)

    return install


def _keys(bucket: str) -> set[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def test_a_destination_that_cannot_delete_is_refused_before_anything_lands(
    soda_ro: FakeSoda, bucket: str, refuse: Callable[[Callable[[str], str | None]], None]
) -> None:
    refuse(lambda key: "AccessDenied")
    dest = f"s3://{bucket}/collisions_raw_data"
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", dest, "--no-progress",
              env={"SOCRATA_APP_TOKEN": GOOD_TOKEN})  # fmt: skip
    assert res.code == 1, res.text
    assert len(res.err.strip().splitlines()) == 1, res.err
    assert "access denied" in res.err
    assert not any("/data/" in k for k in _keys(bucket))


def landed_with_a_leftover(soda: FakeSoda, bucket: str) -> tuple[tuple[str, ...], str]:
    """Crashes landed, and a data file of a killed run that no manifest names (the next run's
    tidy removes it): the update's arguments, and the leftover's key."""
    import boto3

    args = ("crashes", "--source", soda.url, "--dest", f"s3://{bucket}/collisions_raw_data")
    assert cli("backfill", *args, env={"SOCRATA_APP_TOKEN": GOOD_TOKEN}).code == 0
    key = f"collisions_raw_data/crashes/data/backfill-killed-{uuid.uuid4().hex[:6]}/part-0.csv"
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"a\n1\n")
    return args, key


def test_keys_s3_was_too_busy_to_delete_are_deleted_again(
    soda_ro: FakeSoda, bucket: str, refuse: Callable[[Callable[[str], str | None]], None]
) -> None:
    args, left = landed_with_a_leftover(soda_ro, bucket)
    busy = {left: 2}  # busy for its first two attempts

    def rule(key: str) -> str | None:
        if busy.get(key):
            busy[key] -= 1
            return "SlowDown"
        return None

    refuse(rule)
    res = cli("update", *args, env={"SOCRATA_APP_TOKEN": GOOD_TOKEN})
    assert res.code == 0, res.text
    assert busy[left] == 0
    assert left not in _keys(bucket)


def test_a_cleanup_s3_refused_says_so(
    soda_ro: FakeSoda,
    bucket: str,
    refuse: Callable[[Callable[[str], str | None]], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    args, left = landed_with_a_leftover(soda_ro, bucket)
    refuse(lambda key: "AccessDenied" if key == left else None)
    with caplog.at_level("WARNING"):
        res = cli("update", *args, env={"SOCRATA_APP_TOKEN": GOOD_TOKEN})
    assert res.code == 0, res.text  # the update committed; its cleanup waits for the next run
    said = [r.getMessage() for r in caplog.records if "cleanup stopped" in r.getMessage()]
    assert said, caplog.text
    assert left in said[0]
    assert "access denied" in said[0]
    assert left in _keys(bucket)
