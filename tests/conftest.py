"""Fixtures: the project's fake SODA server, moto's S3 server, destinations, a no-network guard."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fake_soda import FakeSoda

SMALL = {"h9gi-nx95": 2_500, "f55k-p6yu": 6_000, "bm4k-52h4": 4_500}
GOOD_TOKEN = "good-token-3f9a"


@pytest.fixture(autouse=True, scope="session")
def _no_network() -> Iterator[None]:
    """Tests talk to loopback servers only: any other address fails loudly."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if isinstance(address, tuple) and self.family in (socket.AF_INET, socket.AF_INET6):
            host = str(address[0])
            if not (host.startswith("127.") or host in ("::1", "localhost")):
                raise OSError(f"tests must not reach the network: {address!r}")
        return real_connect(self, address)

    socket.socket.connect = guarded  # type: ignore[method-assign]
    yield
    socket.socket.connect = real_connect  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ambient configuration leaks into tests; retries are quick."""
    for var in ("SOCRATA_BASE_URL", "SOCRATA_APP_TOKEN", "NYC_COLLISIONS_DEST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NYC_COLLISIONS_RETRY_BASE", "0.05")


@pytest.fixture(scope="session")
def soda_ro() -> Iterator[FakeSoda]:
    """A read-only fake SODA server shared by tests that do not mutate it or inject faults."""
    with FakeSoda(sizes=SMALL, seed=7, tokens=(GOOD_TOKEN,)) as srv:
        yield srv


@pytest.fixture
def soda() -> Iterator[FakeSoda]:
    """A fresh fake SODA server for tests that mutate its data or inject faults."""
    with FakeSoda(sizes=SMALL, seed=11, tokens=(GOOD_TOKEN,)) as srv:
        yield srv


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server mode on loopback, in a process of its own (in the test's process its
    threads would share one interpreter lock with the tool's and the fake server's); dummy
    credentials made here, never real ones."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "moto's server did not start"
            assert time.monotonic() < deadline, "moto's server did not answer within 60 s"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-" + uuid.uuid4().hex[:12])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-" + uuid.uuid4().hex)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    return s3_server


@pytest.fixture
def bucket(s3_env: str) -> str:
    import boto3

    name = "nyc-test-" + uuid.uuid4().hex[:10]
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def dest(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A destination of each kind: a local folder, and an S3 prefix on moto."""
    if request.param == "local":
        return str(tmp_path / "landing")
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket}/collisions_raw_data"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("NO_COLOR", "1")


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What is logged during the test (the Lambda's JSON lines among it)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


# ------------------------------------------------------------------------------ the Lambda


@pytest.fixture
def lambda_env(bucket: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Environment as the SAM template sets it; the token lives in Secrets Manager."""
    import boto3

    from nyc_collisions import lambda_token

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
    lambda_token._token_cache.clear()
    yield dest
    lambda_token._token_cache.clear()


@pytest.fixture
def state_machine(lambda_env: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The loop's state machine on moto (which records executions but does not run them)."""
    import boto3

    from nyc_collisions import aws

    sfn = boto3.client("stepfunctions")
    iam = boto3.client("iam")
    role = iam.create_role(RoleName="loop-" + uuid.uuid4().hex[:8], AssumeRolePolicyDocument="{}")[
        "Role"
    ]["Arn"]
    definition = json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}})
    arn = sfn.create_state_machine(
        name="nyc-collisions-backfill-" + uuid.uuid4().hex[:6], definition=definition, roleArn=role
    )["stateMachineArn"]
    monkeypatch.setenv(aws.STATE_MACHINE, arn)
    return str(arn)
