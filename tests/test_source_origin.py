"""The app token goes only to the source's own origin: a redirect elsewhere is refused before any
request leaves for it, and plain http is refused for any host but this machine's unless allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import nyc_collisions
from nyc_collisions import aws, lambda_token
from nyc_collisions.errors import SourceRejected
from tests.conftest import GOOD_TOKEN
from tests.fake_soda import FakeSoda
from tests.helpers import cli, exact
from tests.test_bad_input import nothing_committed, one_line_error

METADATA = "/api/views/"
DATA_PAGE = "$order"  # the rows pages (and boundary probes), not metadata or aggregates


@pytest.fixture
def elsewhere() -> Iterator[FakeSoda]:
    """A second server (another origin) that would accept the token and records what it gets."""
    with FakeSoda(sizes={"h9gi-nx95": 50}, seed=3, tokens=(GOOD_TOKEN,)) as srv:
        yield srv


def never_saw_the_token(srv: FakeSoda) -> None:
    log = srv.requests()
    assert not [r for r in log if r["has_token"]], log
    assert log == [], "a redirect to another origin is not followed at all"


@pytest.mark.parametrize("match", [METADATA, DATA_PAGE], ids=["metadata", "data_page"])
def test_cli_refuses_a_redirect_to_another_origin(
    soda: FakeSoda, elsewhere: FakeSoda, tmp_path: Path, match: str
) -> None:
    soda.add_fault("redirect", times=None, match=match, location=elsewhere.url)
    dest = tmp_path / "land"
    res = cli(
        "backfill",
        "crashes",
        "--source",
        soda.url,
        "--dest",
        str(dest),
        env={"SOCRATA_APP_TOKEN": GOOD_TOKEN},
    )
    assert res.code == 1, res.text
    one_line_error(res.err, soda.url, elsewhere.url, "redirect")
    assert GOOD_TOKEN not in res.text
    never_saw_the_token(elsewhere)
    nothing_committed(dest)


def test_api_fetch_refuses_a_redirect_to_another_origin(
    soda: FakeSoda, elsewhere: FakeSoda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOCRATA_APP_TOKEN", GOOD_TOKEN)
    soda.add_fault("redirect", times=None, match=DATA_PAGE, location=elsewhere.url)
    with pytest.raises(SourceRejected, match="redirect") as caught:
        nyc_collisions.fetch("crashes", source=soda.url, page_size=100)
    assert GOOD_TOKEN not in str(caught.value)
    never_saw_the_token(elsewhere)


def test_lambda_refuses_a_redirect_to_another_origin(
    soda: FakeSoda, elsewhere: FakeSoda, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dest = tmp_path / "land"
    monkeypatch.setenv("SOCRATA_APP_TOKEN", GOOD_TOKEN)
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DEST", str(dest))
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    lambda_token._token_cache.clear()
    soda.add_fault("redirect", times=None, match=METADATA, location=elsewhere.url)
    try:
        with pytest.raises(SourceRejected, match="redirect"):
            aws.handler({"command": "backfill"}, None)
    finally:
        lambda_token._token_cache.clear()
    never_saw_the_token(elsewhere)
    nothing_committed(dest)


def test_a_redirect_within_the_source_is_followed(soda: FakeSoda, tmp_path: Path) -> None:
    """Same origin, same token: a page moved on the source itself still lands exactly."""
    soda.add_fault("redirect", times=3, match=DATA_PAGE, location=soda.url)
    soda.add_fault("redirect", times=1, match=METADATA, location=soda.url)
    dest = str(tmp_path / "land")
    res = cli(
        "backfill",
        "crashes",
        "--source",
        soda.url,
        "--dest",
        dest,
        env={"SOCRATA_APP_TOKEN": GOOD_TOKEN},
    )
    assert res.code == 0, res.text
    assert soda.stats()["faults"]["redirect"] == 4
    assert all(r["has_token"] for r in soda.requests())
    exact(soda, dest, "crashes", tmp_path, token=GOOD_TOKEN)


def test_a_redirect_loop_is_one_line(soda: FakeSoda, tmp_path: Path) -> None:
    soda.add_fault("redirect", times=None, match=METADATA, location=soda.url)
    res = cli("backfill", "crashes", "--source", soda.url, "--dest", str(tmp_path / "land"))
    assert res.code == 1, res.text
    one_line_error(res.err, "too many redirects")
    nothing_committed(tmp_path / "land")


# TEST-NET-1 (RFC 5737): not this machine, and never routed; the tests' guard blocks it anyway.
REMOTE_HTTP = "http://192.0.2.1"


def test_plain_http_to_another_host_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "land"
    res = cli("backfill", "crashes", "--retries", "1", "--source", REMOTE_HTTP, "--dest", str(dest))
    assert res.code == 2, res.text
    one_line_error(res.err, "--source", REMOTE_HTTP, "--allow-http")
    assert not dest.exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_plain_http_to_another_host_when_allowed(tmp_path: Path, how: str) -> None:
    """Allowed, the request is made (and fails here: the tests reach no network)."""
    args = ["backfill", "crashes", "--retries", "1", "--source", REMOTE_HTTP]
    env = {"NYC_COLLISIONS_ALLOW_HTTP": "1"} if how == "env" else None
    if how == "flag":
        args.append("--allow-http")
    res = cli(*args, "--dest", str(tmp_path / "land"), env=env)
    assert res.code == 1, res.text
    one_line_error(res.err, "gave up after 1 attempt")


def test_api_and_lambda_refuse_plain_http_to_another_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(nyc_collisions.UsageError, match="allow"):
        nyc_collisions.fetch("crashes", source=REMOTE_HTTP)
    monkeypatch.setenv("SOCRATA_BASE_URL", REMOTE_HTTP)
    monkeypatch.setenv("NYC_COLLISIONS_DEST", str(tmp_path / "land"))
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    lambda_token._token_cache.clear()
    with pytest.raises(nyc_collisions.UsageError, match="SOCRATA_BASE_URL"):
        aws.handler({"command": "backfill"}, None)
    assert not (tmp_path / "land").exists()


ECHO = "upstream said: header X-App-Token: {token} is not allowed here"


def test_a_token_echoed_by_a_failing_source_is_not_logged(soda: FakeSoda, tmp_path: Path) -> None:
    """The source (or a proxy in front of it) answers 500 with the request's token in its
    message, four times (the retries from the third on are warnings, shown by default), then
    serves: no line the command prints carries the token."""
    body = json.dumps({"code": "internal", "message": ECHO.format(token=GOOD_TOKEN)})
    soda.add_fault("body", times=4, match=METADATA, status=500, body=body)
    env = dict(os.environ, SOCRATA_APP_TOKEN=GOOD_TOKEN, NYC_COLLISIONS_RETRY_BASE="0.01")
    args = ["backfill", "crashes", "--source", soda.url, "--dest", str(tmp_path / "land")]
    res = subprocess.run(
        [sys.executable, "-m", "nyc_collisions", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "retry 3/" in res.stderr  # the server's message was shown
    assert [line for line in (res.stdout + res.stderr).splitlines() if GOOD_TOKEN in line] == []


def lambda_error(message: str, soda: FakeSoda, tmp_path: Path, mp: pytest.MonkeyPatch) -> str:
    """What Lambda reports of a failed invocation (`str(exc)`, its errorMessage: CloudWatch,
    the failure destination, Step Functions' cause) when the source answers 400 `message`."""
    body = json.dumps({"code": "query.compiler.malformed", "message": message})
    return lambda_failure(soda, tmp_path, mp, 400, body, SourceRejected)


def lambda_failure(
    soda: FakeSoda,
    tmp_path: Path,
    mp: pytest.MonkeyPatch,
    status: int,
    body: str,
    raised: type[Exception] = nyc_collisions.errors.NycCollisionsError,
) -> str:
    """What Lambda reports of an invocation whose metadata request the source answers with
    `status` and `body` (each time)."""
    soda.add_fault("body", times=None, match=METADATA, status=status, body=body)
    mp.setenv("SOCRATA_APP_TOKEN", GOOD_TOKEN)
    mp.setenv("SOCRATA_BASE_URL", soda.url)
    mp.setenv("NYC_COLLISIONS_DEST", str(tmp_path / "land"))
    mp.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    mp.setenv("NYC_COLLISIONS_RETRIES", "2")
    mp.setenv("NYC_COLLISIONS_RETRY_BASE", "0.01")
    lambda_token._token_cache.clear()
    try:
        with pytest.raises(raised) as caught:
            aws.handler({"command": "backfill"}, None)
    finally:
        lambda_token._token_cache.clear()
    return str(caught.value)


def test_a_token_echoed_in_an_error_is_not_in_the_lambdas_error(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said = lambda_error(ECHO.format(token=GOOD_TOKEN), soda, tmp_path, monkeypatch)
    assert "not allowed here" in said
    assert GOOD_TOKEN not in said


def test_a_token_echoed_across_the_messages_clip_is_masked_whole(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source's message is clipped to a few hundred characters: a token echoed across the
    cut is masked before it, not after (its head came through)."""
    message = "x" * 240 + f" header X-App-Token: {GOOD_TOKEN} not allowed"
    said = lambda_error(message, soda, tmp_path, monkeypatch)
    assert GOOD_TOKEN[:8] not in said, said[-60:]


@pytest.fixture
def cli_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The CLI's logging set up (`setup_logging(0)`, the token set), undone after the test."""
    import logging

    from nyc_collisions.cli.app import setup_logging

    monkeypatch.setenv("SOCRATA_APP_TOKEN", GOOD_TOKEN)
    root = logging.getLogger()
    saved = [(h, list(h.filters)) for h in root.handlers]
    try:
        setup_logging(0)
        yield
    finally:
        for h, filters in saved:
            h.filters[:] = filters
        for h in root.handlers[:]:
            if h not in [s for s, _ in saved]:
                root.removeHandler(h)


@pytest.mark.usefixtures("cli_logging")
def test_masking_the_token_never_raises_into_the_code_that_logs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record that does not format is logging's to report, with the token set as without."""
    import logging

    monkeypatch.setattr(logging, "raiseExceptions", False)
    logging.getLogger("some.library").warning("%d rows", "not a number")


@pytest.mark.usefixtures("cli_logging")
def test_a_log_line_quoting_the_source_cannot_drive_the_terminal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Warnings quote the source (a new column's name, its messages): no escape sequence of
    it reaches the terminal, and no token."""
    import logging

    name = "x\x1b]0;owned\x07"
    logging.getLogger("nyc_collisions.refresh").warning(
        "%s: the source's columns changed (added %s; %s)", "crashes", name, GOOD_TOKEN
    )
    assert caplog.messages == ["crashes: the source's columns changed (added x?]0;owned?; ***)"]


def test_a_token_echoed_in_a_200_answer_is_not_in_the_lambdas_error(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy or portal answering 200 with the request's headers echoed and no metadata: the
    run gives up on it, and what Lambda reports of it does not carry the token."""
    body = json.dumps({"headers": {"X-App-Token": GOOD_TOKEN}})
    said = lambda_failure(soda, tmp_path, monkeypatch, 200, body)
    assert "metadata without columns" in said
    assert GOOD_TOKEN not in said


@pytest.mark.parametrize("around", ["\n", "\r\n", " "], ids=["lf", "crlf", "space"])
def test_a_token_read_with_a_line_break_is_sent_without_it(
    soda: FakeSoda, tmp_path: Path, around: str
) -> None:
    """A token from a file or a CRLF .env keeps its line break: it is sent without it (HTTP
    refused the header, and said why with the token in it)."""
    dest = tmp_path / "land"
    res = cli(
        "backfill", "crashes", "--retries", "2", "--source", soda.url, "--dest", str(dest),
        env={"SOCRATA_APP_TOKEN": GOOD_TOKEN + around},
    )  # fmt: skip
    assert res.code == 0, res.text
    assert GOOD_TOKEN not in res.text
    assert all(r["has_token"] for r in soda.requests())
    exact(soda, str(dest), "crashes", tmp_path)


@pytest.mark.parametrize("token", [f"{GOOD_TOKEN[:5]} {GOOD_TOKEN[5:]}", GOOD_TOKEN + "é"])
def test_a_token_no_app_token_looks_like_is_one_line_without_it(
    soda: FakeSoda, tmp_path: Path, token: str
) -> None:
    dest = tmp_path / "land"
    res = cli(
        "backfill", "crashes", "--source", soda.url, "--dest", str(dest),
        env={"SOCRATA_APP_TOKEN": token},
    )  # fmt: skip
    assert res.code == 2, res.text
    one_line_error(res.err, "SOCRATA_APP_TOKEN")
    assert GOOD_TOKEN[:5] not in res.text
    assert soda.requests() == []
    nothing_committed(dest)


def test_a_proxy_from_the_environment_never_sees_the_token_in_plain_http(
    soda: FakeSoda, tmp_path: Path
) -> None:
    """HTTP_PROXY set for the machine: a plain http source (this machine's, or allowed) is
    asked directly; a proxy would read the request, token and all."""
    import socket
    import threading

    seen: list[bytes] = []
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = proxy.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    seen.append(conn.recv(65536))
                    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    dest = tmp_path / "land"
    try:
        res = cli(
            "backfill", "crashes", "--retries", "1", "--source", soda.url, "--dest", str(dest),
            env={"SOCRATA_APP_TOKEN": GOOD_TOKEN, "HTTP_PROXY": url, "ALL_PROXY": url},
        )  # fmt: skip
    finally:
        proxy.close()
    assert seen == []
    assert res.code == 0, res.text
    exact(soda, str(dest), "crashes", tmp_path)


def test_a_password_in_the_source_url_is_refused_without_showing_it(tmp_path: Path) -> None:
    res = cli(
        "backfill", "crashes", "--source", "http://user:s3cret-pw@127.0.0.1:9",
        "--dest", str(tmp_path / "land"),
    )  # fmt: skip
    assert res.code == 2, res.text
    one_line_error(res.err, "--source", "password")
    assert "s3cret-pw" not in res.text


def test_a_token_in_metadata_the_run_quotes_is_not_in_the_lambdas_error(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the source says reaches messages by other ways than its errors (here the columns
    named where the key is missing): the Lambda's errorMessage never carries the token."""
    body = json.dumps(
        {"id": "h9gi-nx95", "columns": [{"fieldName": GOOD_TOKEN, "dataTypeName": "text"}]}
    )
    said = lambda_failure(soda, tmp_path, monkeypatch, 200, body)
    assert "collision_id" in said
    assert GOOD_TOKEN not in said
