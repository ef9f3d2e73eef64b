"""Reading landed files back from S3 (export, read(), verify, reconcile, compact): a body that
breaks off is fetched again, and S3's refusals get the one line every other S3 call gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GOOD_TOKEN
from tests.fake_soda import FakeSoda
from tests.helpers import cli, exact
from tests.s3_proxy import S3FaultProxy


def _backfilled(soda: FakeSoda, bucket: str, *args: str) -> str:
    dest = f"s3://{bucket}/collisions_raw_data"
    res = cli("backfill", "crashes", "--source", soda.url, "--dest", dest, *args,
              env={"SOCRATA_APP_TOKEN": GOOD_TOKEN})  # fmt: skip
    assert res.code == 0, res.text
    return dest


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_read_whose_body_breaks_off_is_fetched_again(
    soda_ro: FakeSoda,
    bucket: str,
    s3_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    """boto3 retries a request that fails, not a body that breaks off once its answer began:
    one dropped connection among the many ranged reads of a big export ended it."""
    dest = _backfilled(soda_ro, bucket, "--format", fmt)
    with S3FaultProxy(s3_server, cut_gets=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        exact(soda_ro, dest, "crashes", tmp_path, suffix=f".{fmt}")
        assert proxy.faults["cut_body"] == 1


def test_credentials_that_expire_while_files_are_read_get_the_credentials_line(
    soda_ro: FakeSoda, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temporary credentials expiring during a long export: the line says what to check, as
    every other S3 call does (it said "unexpected ClientError ... please report it")."""
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

    dest = _backfilled(soda_ro, bucket)
    real = BaseClient._make_api_call

    def call(self: Any, operation: str, params: dict[str, Any]) -> Any:
        if operation == "GetObject" and "/data/" in params.get("Key", ""):
            error = {"Code": "ExpiredToken", "Message": "The provided token has expired."}
            raise ClientError({"Error": error}, operation)
        return real(self, operation, params)

    monkeypatch.setattr(BaseClient, "_make_api_call", call)
    res = cli("export", "crashes", "--dest", dest, "-o", str(tmp_path / "out.csv"))
    assert res.code == 1
    assert len(res.err.strip().splitlines()) == 1, res.err
    assert "refused the AWS credentials (ExpiredToken)" in res.err, res.err
