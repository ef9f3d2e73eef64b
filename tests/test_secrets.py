"""Secrets stay out of what the tool says: the app token in whatever form a source, a proxy or
a URL spells it, and the user and password of an S3 endpoint's URL (README: "Security")."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from nyc_collisions import aws
from nyc_collisions.errors import NycCollisionsError
from tests.conftest import GOOD_TOKEN
from tests.fake_soda import FakeSoda
from tests.helpers import cli


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_a_token_in_the_source_urls_query_is_not_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Socrata documents `$$app_token=` in the query; a --source carrying it is refused without
    quoting the URL, as one with a user or password is."""
    monkeypatch.delenv("SOCRATA_APP_TOKEN", raising=False)
    secret = "Qx7SeKrItAppToken42"
    res = cli(
        "backfill", "crashes",
        "--source", f"https://data.cityofnewyork.us/?$$app_token={secret}",
        "--dest", str(tmp_path / "land"),
    )  # fmt: skip
    assert res.code == 2, res.text
    assert secret not in res.text


def test_lambda_a_token_in_socrata_base_url_is_not_in_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SOCRATA_BASE_URL with the token in its query is refused before any run: the refusal,
    the invocation's errorMessage, does not carry the token."""
    monkeypatch.setenv("SOCRATA_APP_TOKEN", GOOD_TOKEN)
    monkeypatch.setenv(
        "SOCRATA_BASE_URL", f"https://data.cityofnewyork.us/resource?$$app_token={GOOD_TOKEN}"
    )
    monkeypatch.setenv("NYC_COLLISIONS_DEST", str(tmp_path / "land"))
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    aws._token_cache.clear()
    try:
        with pytest.raises(NycCollisionsError) as caught:
            aws.handler({"command": "update"}, None)
    finally:
        aws._token_cache.clear()
    assert GOOD_TOKEN not in str(caught.value)


def test_credentials_in_the_s3_endpoint_url_are_not_echoed(
    soda_ro: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3-compatible store's endpoint with credentials in it (basic auth in front of MinIO,
    say): when it is unreachable, botocore's message quotes the endpoint; the error line does
    not show its user and password."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://minio:EpS3cretPw@127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", "s3://bkt/x")
    assert res.code == 1, res.text
    assert "EpS3cretPw" not in res.text


def test_status_never_prints_a_token_the_source_echoes_json_escaped(tmp_path: Path) -> None:
    """A source (or a proxy) that echoes the token with JSON's escaped slash (`\\/`, as PHP's
    and some Java encoders write it; a token may hold `/`): `status` prints the source's error
    on stdout, as text and as JSON, without the token."""
    token = "AbC/dEf+gH1="
    escaped = token.replace("/", "\\/")
    body = f'{{"code": "query.soql.invalid", "message": "rejected X-App-Token {escaped}"}}'
    with FakeSoda(sizes={"h9gi-nx95": 50}, seed=5, tokens=(token,)) as srv:
        srv.add_fault("body", times=None, match="count", status=400, body=body)
        for args in (("status", "crashes"), ("status", "crashes", "--json")):
            res = cli(
                *args, "--source", srv.url, "--dest", str(tmp_path / "land"),
                env={"SOCRATA_APP_TOKEN": token, "NYC_COLLISIONS_RETRIES": "1"},
            )  # fmt: skip
            assert "rejected X-App-Token" in res.text, res.text
            assert token not in res.text, res.text
