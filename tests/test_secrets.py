"""Secrets stay out of what the tool says: the app token in whatever form a source, a proxy or
a URL spells it, and the user and password of an S3 endpoint's URL (README: "Security")."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from nyc_collisions import redact as redact_module
from nyc_collisions.errors import NycCollisionsError
from nyc_collisions.redact import redact, redact_bytes, remember
from tests.conftest import GOOD_TOKEN
from tests.fake_soda import FakeSoda
from tests.helpers import cli, invoke

TOKEN = "Zq8mT3vLx2N9pRk4Wd7Hs1Yc6"  # an app token's shape: 25 letters and digits


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
    with pytest.raises(NycCollisionsError) as caught:
        invoke({"command": "update"})
    assert GOOD_TOKEN not in str(caught.value)


def test_credentials_in_the_s3_endpoint_url_are_not_echoed(
    soda_ro: FakeSoda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3-compatible store's endpoint with credentials in it (basic auth in front of MinIO,
    say; a password with `'` and `@`, which botocore takes as they are): when it is
    unreachable, botocore's message quotes the endpoint; the error line does not show its
    password. (Other passwords: `test_an_endpoints_password_with_a_quote_or_at_sign_is_masked`.)"""
    password = "Ep'S3@cretPw"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://minio:{password}@127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", "s3://bkt/x")
    assert res.code == 1, res.text
    assert not [part for part in ("Ep'S3", "cretPw") if part in res.text], res.text


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


@pytest.mark.parametrize("as_json", [False, True])
def test_status_never_shows_part_of_a_token_the_source_echoes_in_a_count(
    tmp_path: Path, as_json: bool
) -> None:
    """What the source sent for a count is quoted clipped to 60 characters: a token the clip
    would cut is masked whole before, so no part of it goes out on stdout (status) or in
    errors."""
    echoed = "x" * 45 + TOKEN  # the token starts at 45: the clip at 60 keeps 15 of its 25
    body = json.dumps([{"n": echoed}])
    with FakeSoda(sizes={"h9gi-nx95": 50}, seed=5, tokens=(TOKEN,)) as srv:
        srv.add_fault("body", times=None, match="count", status=200, body=body)
        args = ["status", "crashes", "--source", srv.url, "--dest", str(tmp_path / "land")]
        res = cli(
            *args, *(["--json"] if as_json else []),
            env={"SOCRATA_APP_TOKEN": TOKEN, "NYC_COLLISIONS_RETRIES": "1"},
        )  # fmt: skip
    assert "not a count" in res.text, res.text
    assert TOKEN[:12] not in res.text, res.text


def test_an_aggregate_answer_clipped_inside_the_token_leaves_no_part_of_it(
    tmp_path: Path,
) -> None:
    """An unexpected aggregate answer is quoted clipped to 300 characters: a token across the
    clip leaves no part of it."""
    rows = [{"n": "1"}, {"echo": "y" * 265 + TOKEN}]  # str(rows) puts the token at ~287
    prefix = str(rows).index(TOKEN)
    assert prefix < 300 < prefix + len(TOKEN)
    with FakeSoda(sizes={"h9gi-nx95": 50}, seed=5, tokens=(TOKEN,)) as srv:
        srv.add_fault("body", times=None, match="count", status=200, body=json.dumps(rows))
        res = cli(
            "status", "crashes", "--json", "--source", srv.url, "--dest", str(tmp_path / "land"),
            env={"SOCRATA_APP_TOKEN": TOKEN, "NYC_COLLISIONS_RETRIES": "1"},
        )  # fmt: skip
    assert "unexpected aggregate answer" in res.text, res.text
    assert TOKEN[:8] not in res.text, res.text


@pytest.mark.parametrize(
    "password",
    [
        "Ep'S3cretPw",  # `'` is a sub-delim: legal in userinfo unencoded
        "Ep@S3cretPw",  # an unencoded `@`: urllib (and botocore) split at the last one
    ],
)
def test_an_endpoints_password_with_a_quote_or_at_sign_is_masked(password: str) -> None:
    """botocore's 'Could not connect to the endpoint URL: "http://user:pw@host/..."'."""
    said = f'Could not connect to the endpoint URL: "http://minio:{password}@10.0.0.5:9000/bkt"'
    shown = redact(said, None)
    assert "S3cretPw" not in shown, shown


def test_the_lambdas_response_masks_what_its_logs_mask(
    soda_ro: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The summary the handler returns (the invocation's result, seen by Step Functions and
    whoever invokes it) is masked as its logs are: a table error quoting an S3-compatible
    endpoint with its credentials comes back without them."""
    from nyc_collisions import daily
    from tests.conftest import GOOD_TOKEN
    from tests.helpers import Context

    dest = str(tmp_path / "land")
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    monkeypatch.setenv("NYC_COLLISIONS_DEST", dest)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    monkeypatch.setenv("SOCRATA_APP_TOKEN", GOOD_TOKEN)
    assert cli("backfill", "crashes", "--source", soda_ro.url, "--dest", dest).code == 0
    said = 'Could not connect to the endpoint URL: "http://minio:EpS3cretPw@127.0.0.1:9/bkt/x"'

    class TableFails(daily.Update):
        def run(self, stop: object) -> object:
            result = super().run(stop)
            result.table_error = said
            return result

    monkeypatch.setattr(daily, "Update", TableFails)
    response = invoke({"command": "update"}, Context(60))
    assert redact(said, None) != said  # what the logs show of it
    assert "EpS3cretPw" not in json.dumps(response), response


def test_a_token_inside_another_never_leaves_a_part_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two tokens in one process (the API's fetch with one, then another; tests), one inside
    the other: `redact` masks the longer whole."""
    monkeypatch.setattr(redact_module, "_KNOWN", {})
    leaks = []
    for i in range(40):
        short = f"tok{i}"
        long = f"{short}SECRETPART{i:03d}"
        remember(short)
        text = f"the source said: bad token {long}"
        shown = redact(text, long)
        if "SECRETPART" in shown:
            leaks.append(shown)
        shown_b = redact_bytes(text.encode(), long)
        if b"SECRETPART" in shown_b:
            leaks.append(shown_b.decode())
    assert not leaks, leaks[:3]


def test_a_closed_clients_token_masks_no_later_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token is masked while a client sends it: a later use in the same process (another
    client, without a token) has ordinary text left as it is."""
    from nyc_collisions.socrata.answers import clip
    from nyc_collisions.socrata.client import SodaClient

    monkeypatch.setattr(redact_module, "_KNOWN", {})
    with SodaClient("https://data.cityofnewyork.us", app_token="2025"):
        pass
    with SodaClient("https://data.cityofnewyork.us", app_token=None):
        assert clip("rows updated in 2025: 12") == "rows updated in 2025: 12"


@pytest.mark.parametrize(
    "echoed",
    [
        "Zq8m%2ft3vL%2bx2N9%3D",  # percent-encoded, lowercase hex (a proxy's log line)
        "Zq8m/t3vL%2Bx2N9%3D",  # percent-encoded with `/` left as it is (Python's `quote`)
        "Zq8m&#x2f;t3vL&#x2b;x2N9&#x3d;",  # HTML, every mark in hex (OWASP ESAPI)
        "Zq8m&#x2F;t3vL+x2N9=",  # HTML, `/` alone
        "Zq8m/t3vL&#43;x2N9=",  # HTML, `+` alone in decimal (Go's html/template)
        "Zq8m/t3vL+x2N9&#x3D;",  # HTML, `=` alone (Handlebars)
        "Zq8m\\u002ft3vL\\u002Bx2N9=",  # JSON's \\u escapes
        "Zq8m\\/t3vL+x2N9=",  # JSON's escaped slash
        "Zq8m%252Ft3vL%252Bx2N9%253D",  # a URL inside a URL's query, encoded twice
        "Zq8m\\\\/t3vL+x2N9=",  # JSON quoted in a JSON string
        "Zq8m&sol;t3vL&plus;x2N9&equals;",  # HTML5's names (PHP's htmlentities)
        "Zq8m&amp;#x2F;t3vL+x2N9=",  # HTML escaped twice
    ],
)
def test_a_token_echoed_by_any_escaper_is_masked(
    monkeypatch: pytest.MonkeyPatch, echoed: str
) -> None:
    """Escapers differ in which characters they escape and how: each character of the token
    is matched in any of its spellings, so no mix of them leaves the token to be read."""
    monkeypatch.setattr(redact_module, "_KNOWN", {})
    token = "Zq8m/t3vL+x2N9="  # only characters an app token may hold
    text = f"<p>403 for /resource/h9gi-nx95.json?$$app_token={echoed}</p>"
    for shown in (redact(text, token), redact_bytes(text.encode(), token).decode()):
        assert "t3vL" not in shown, shown


def test_two_tokens_that_overlap_leave_no_part_of_either(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two tokens in one process sharing an end and a start: text holding both overlapped is
    masked whole, whichever is matched first."""
    monkeypatch.setattr(redact_module, "_KNOWN", {})
    remember("FIRSTpartSHARED")
    text = "bad tokens: FIRSTpartSHAREDsecondPART and SHAREDsecondPART"
    for shown in (
        redact(text, "SHAREDsecondPART"),
        redact_bytes(text.encode(), "SHAREDsecondPART").decode(),
    ):
        assert "FIRST" not in shown, shown
        assert "second" not in shown, shown


def test_a_token_of_undecodable_bytes_is_refused_in_one_line(tmp_path: Path) -> None:
    """A SOCRATA_APP_TOKEN of bytes that are not UTF-8 (the environment gives lone surrogates)
    is refused, masked, in one line: not a traceback."""
    res = cli("status", "crashes", "--dest", str(tmp_path), env={"SOCRATA_APP_TOKEN": "ab\udcffcd"})
    assert res.code == 2, res.text
    assert "app token" in res.err, res.err
