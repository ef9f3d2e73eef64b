"""Bad input the README promises one clear line and a non-zero exit for, losing and writing no
data: destinations, bounds of the run's options, the S3 endpoint, a Lambda event's fields."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from nyc_collisions.errors import NycCollisionsError, UsageError
from nyc_collisions.socrata.setup import validate_base_url
from tests.fake_soda import FakeSoda
from tests.helpers import cli, invoke
from tests.test_bad_input import nothing_committed, one_line_error

ROOT = Path(__file__).resolve().parents[1]


def test_an_s3_bucket_name_with_a_space_is_one_line(s3_env: str, soda_ro: FakeSoda) -> None:
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", "s3://my bucket/x")
    one_line_error(res.err, "bucket")
    assert res.code == 2, res.text


def test_a_page_size_past_64_bits_is_a_usage_error(soda_ro: FakeSoda, tmp_path: Path) -> None:
    res = cli(
        "backfill", "crashes", "--source", soda_ro.url, "--dest", str(tmp_path / "land"),
        "--page-size", "99999999999999999999999",
    )  # fmt: skip
    one_line_error(res.err, "--page-size")
    assert "unexpected" not in res.err
    assert res.code == 2, res.text


def test_an_invalid_aws_endpoint_url_is_a_usage_error_naming_it(
    soda_ro: FakeSoda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: bad environment values are one line naming what failed, exit 2."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "not a url")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", "s3://bkt/x")
    one_line_error(res.err, "AWS_ENDPOINT_URL")
    assert "unexpected" not in res.err
    assert res.code == 2, res.text


def test_workers_past_the_bound_is_a_usage_error(soda_ro: FakeSoda, tmp_path: Path) -> None:
    """--workers N would start N threads at once: a number past the bound --max-concurrency has
    is refused in one line before any, and leaves no run record. (Address space capped at 4 GiB
    so that, were the threads started, the failure came in seconds.)"""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    dest = tmp_path / "land"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("SOCRATA_APP_TOKEN", None)
    proc = subprocess.run(
        [sys.executable, "-m", "nyc_collisions", "backfill", "crashes",
         "--source", soda_ro.url, "--dest", str(dest), "--workers", "100000"],
        capture_output=True, text=True, timeout=300, preexec_fn=cap, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert "unexpected" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    one_line_error(proc.stderr, "--workers")
    assert not dest.exists() or not list(dest.rglob("*.json")), list(dest.rglob("*"))


@pytest.mark.parametrize("dest", ["file://", "file://out"], ids=["empty", "host_dropped"])
def test_a_file_url_dest_never_lands_somewhere_else(
    soda_ro: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dest: str
) -> None:
    """A file URL is file:///absolute/path: `file://` would land in the working folder and
    `file://out` take `out` for a host and drop it (`file://data/land` would land in /land)."""
    monkeypatch.chdir(tmp_path)
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", dest)
    landed_in_cwd = (tmp_path / "crashes").exists()
    assert not landed_in_cwd, (res.code, res.text)
    assert res.code == 2 or (tmp_path / "out" / "crashes" / "manifest.json").exists(), res.text
    nothing_committed(tmp_path / "crashes")


@pytest.mark.parametrize("datasets", [5, [5], {"crashes": 1}], ids=["number", "list", "object"])
def test_lambda_event_datasets_of_the_wrong_type_are_one_clear_error(
    soda_ro: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, datasets: object
) -> None:
    """An operator's invoke payload whose `datasets` is not a list of names (or one string of
    them) is refused in one error naming the field, before anything lands."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    monkeypatch.setenv("NYC_COLLISIONS_DEST", str(tmp_path / "land"))
    monkeypatch.delenv("SOCRATA_APP_TOKEN", raising=False)
    with pytest.raises(NycCollisionsError, match="datasets"):
        invoke({"command": "backfill", "datasets": datasets}, None)
    nothing_committed(tmp_path / "land")


def test_export_to_a_tilde_path_is_not_a_folder_named_tilde(
    soda_ro: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export -o ~/x.csv` given quoted (a script, a Makefile, or
    `nyc_collisions.export("crashes", "~/crashes.csv")`) writes in the home folder, as --dest
    ~/x lands there, not below a folder named `~`."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", str(tmp_path / "land"))
    assert res.code == 0, res.text
    res = cli("export", "crashes", "--dest", str(tmp_path / "land"), "-o", "~/crashes.csv")
    assert not (work / "~").exists(), (res.code, res.text)
    assert res.code == 2 or (home / "crashes.csv").exists(), res.text


@pytest.mark.parametrize("command", ["reconcile", "compact"])
def test_a_refused_run_on_nothing_landed_leaves_no_folder(
    soda_ro: FakeSoda, tmp_path: Path, command: str
) -> None:
    """reconcile and compact refused with 'nothing is landed' remove the folders they made, as
    backfill, update and verify do."""
    dest = tmp_path / "land"
    source = ["--source", soda_ro.url] if command == "reconcile" else []
    res = cli(command, "crashes", *source, "--dest", str(dest))
    assert res.code == 1, res.text
    one_line_error(res.err, "nothing is landed")
    assert not dest.exists(), sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def test_lambda_event_datasets_as_one_string_are_names(
    soda_ro: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`{"datasets": "crashes"}` is the dataset crashes (names comma-separated, as in
    NYC_COLLISIONS_DATASETS), not the letters of it."""
    monkeypatch.setenv("SOCRATA_BASE_URL", soda_ro.url)
    monkeypatch.setenv("NYC_COLLISIONS_DEST", str(tmp_path / "land"))
    monkeypatch.delenv("SOCRATA_APP_TOKEN", raising=False)
    out = invoke({"command": "backfill", "datasets": "crashes"}, None)
    assert [r["dataset"] for r in out["results"]] == ["crashes"]


def test_a_source_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    res = cli(
        "backfill", "crashes", "--source", "https://data.cityofnewyork.us:99999",
        "--dest", str(tmp_path / "land"),
    )  # fmt: skip
    one_line_error(res.err, "--source")
    assert res.code == 2, res.text
    assert not (tmp_path / "land").exists()


def test_a_source_url_with_port_zero_is_refused() -> None:
    """Port 0 is no port a source listens on."""
    with pytest.raises(UsageError):
        validate_base_url("https://data.cityofnewyork.us:0")


@pytest.mark.parametrize(
    "url", ["https://data.cityofnewyork.us?", "https://data.cityofnewyork.us/?"]
)
def test_a_source_url_with_an_empty_query_is_refused(url: str) -> None:
    """A bare `?` is a query too: kept, every request would go to `{url}/api/...`, a query,
    and the source answer 404 for all."""
    with pytest.raises(UsageError):
        validate_base_url(url)


def test_a_file_url_whose_path_decodes_to_a_nul_is_a_usage_error(tmp_path: Path) -> None:
    """A file URL's path is percent-decoded: one that decodes to a NUL names no folder."""
    res = cli("compact", "crashes", "--dest", f"file://{tmp_path}/land%00x")
    assert res.code == 2, res.text
    assert "unexpected" not in res.text, res.text


def test_export_to_the_home_of_a_user_that_does_not_exist_is_a_usage_error(
    tmp_path: Path,
) -> None:
    """`~nosuchuser/...` names no home folder: a usage error, not an unforeseen one."""
    res = cli("export", "crashes", "--output", "~nosuchuser-rev5/x.csv", "--dest", str(tmp_path))
    assert "unexpected" not in res.text, res.text


def test_a_file_url_with_a_query_or_fragment_is_refused_as_an_s3_one_is(tmp_path: Path) -> None:
    """As `s3://bucket/p?x`, a file URL with a query or fragment is refused: dropped, it would
    move the destination (a `#` in a folder name written unencoded)."""
    from nyc_collisions.sink.storage import open_storage

    for dest in (f"file://{tmp_path}/run#2", f"file://{tmp_path}/land?x=1"):
        with pytest.raises(UsageError):
            open_storage(dest)


def test_a_bad_region_is_not_called_a_bad_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped AWS_DEFAULT_REGION (no endpoint set at all) is a usage error that names the
    region, not one blaming the endpoint alone."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    res = cli("status", "crashes", "--dest", "s3://bkt/x")
    one_line_error(res.err, "us east-1")
    assert "REGION" in res.err, res.text
    assert res.code == 2, res.text


def test_a_file_url_with_a_bare_query_mark_is_refused() -> None:
    """A bare `?` or `#` in a file URL is refused too (dropped, the folder would be another
    than written)."""
    from nyc_collisions.sink.storage import open_storage

    for dest in ("file:///tmp/r7-land?", "file:///tmp/r7-land#"):
        with pytest.raises(UsageError):
            open_storage(dest)


def test_a_dest_of_an_unknown_home_is_a_usage_error(tmp_path: Path) -> None:
    """--dest ~nosuchuser/land names no home folder: a usage error, as for --output."""
    res = cli("export", "crashes", "--dest", "~nosuchuser7r/land", "-o", str(tmp_path / "x.csv"))
    assert res.code == 2, res.text
    assert "unexpected" not in res.err, res.err


@pytest.mark.parametrize(
    "dest",
    ["s3://bkt/land?", "s3://bkt/land#", "s3://bkt/la#nd", "s3://bkt/la\tnd", "file:///la\nnd"],
)
def test_an_s3_url_with_a_bare_query_mark_or_hash_is_refused(dest: str) -> None:
    """As a file URL: dropped, a `?` or `#` (or a tab or a line break, which URL parsing drops
    silently) would move the destination."""
    from nyc_collisions.sink.storage import open_storage

    with pytest.raises(UsageError):
        open_storage(dest)


def test_a_plain_path_with_a_hash_or_query_mark_opens(tmp_path: Path) -> None:
    """A folder named with `#` or `?` is no URL: it is the folder."""
    from nyc_collisions.sink.storage import open_storage

    for dest in (tmp_path / "run#2" / "land", tmp_path / "r?x" / "land"):
        assert open_storage(str(dest)).url == str(dest)
