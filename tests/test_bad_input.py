"""Bad input gets one clear line, a non-zero exit, and nothing committed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fake_soda import FakeSoda, Latency
from tests.helpers import cli, exact


def one_line_error(text: str, *needles: str) -> None:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("nyc-collisions: "), text
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])


def nothing_committed(dest: Path) -> None:
    assert not list(dest.rglob("manifest.json")) if dest.exists() else True


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["backfill", "collisions"], ["unknown dataset"]),
        (["backfill", "crashes", "--workers", "0"], ["--workers"]),
        (["backfill", "crashes", "--page-size", "-5"], ["--page-size"]),
        (["backfill", "crashes", "--page-size", "0"], ["--page-size"]),
        (["backfill", "crashes", "--max-seconds", "0"], ["--max-seconds"]),
        (["backfill", "crashes", "--source", "data.cityofnewyork.us"], ["--source"]),
        (["backfill", "crashes", "--source", "ftp://example/"], ["--source"]),
        (["backfill", "crashes", "--dest", "s3://"], ["s3://bucket/prefix"]),
        (["backfill", "crashes", "--dest", "gs://bucket/x"], ["--dest"]),
        (["export", "crashes", "--output", "out.json"], [".csv or .parquet"]),
        (["export", "crashes", "-o", "s3://bucket/out/crashes.parquet"], ["a local file"]),
        (["backfill", "crashes", "--timeout", "inf"], ["--timeout"]),
        (["backfill", "crashes", "--timeout", "1e12"], ["--timeout"]),
        (["backfill", "crashes", "--max-seconds", "nan"], ["--max-seconds"]),
        (["backfill", "crashes", "--key", "a b"], ["--key", "not a field name"]),
        (["backfill", "test-0001", "--key", "a b"], ["--key", "not a field name"]),
    ],
    ids=[
        "unknown_name",
        "workers_0",
        "negative_page",
        "zero_page",
        "zero_budget",
        "source_no_scheme",
        "source_ftp",
        "dest_s3_no_bucket",
        "dest_gs",
        "export_suffix",
        "export_to_s3",
        "timeout_inf",
        "timeout_past_a_socket",
        "budget_nan",
        "key_not_a_field",
        "key_not_a_field_of_an_id",
    ],
)
def test_usage_errors(
    soda_ro: FakeSoda,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    needles: list[str],
) -> None:
    full = list(args)
    if "--source" not in full and full[0] == "backfill":
        full += ["--source", soda_ro.url]
    if "--dest" not in full:
        full += ["--dest", str(tmp_path / "land")]
    monkeypatch.chdir(tmp_path)
    res = cli(*full)
    assert res.code == 2, res.text
    one_line_error(res.err, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # (no `s3:` folder either)
    nothing_committed(tmp_path / "land")
    assert not (tmp_path / "land").exists() or not any((tmp_path / "land").rglob("*.csv"))


def test_unknown_format_is_rejected(soda_ro: FakeSoda, tmp_path: Path) -> None:
    res = cli(
        "backfill", "crashes", "--format", "xml", "--source", soda_ro.url, "--dest", str(tmp_path)
    )
    assert res.code == 2
    assert "xml" in res.err
    assert "csv" in res.err


def test_unknown_dataset_id_is_404(soda_ro: FakeSoda, tmp_path: Path) -> None:
    res = cli("backfill", "zzzz-9999", "--source", soda_ro.url, "--dest", str(tmp_path / "l"))
    assert res.code == 1
    one_line_error(res.err, "zzzz-9999", "404")
    nothing_committed(tmp_path / "l")
    assert not (tmp_path / "l").exists()  # the run made the folder, landed nothing, removed it


def test_a_failed_run_leaves_an_existing_folder_as_it_was(
    soda_ro: FakeSoda, tmp_path: Path
) -> None:
    dest = tmp_path / "l"
    (dest / "mine").mkdir(parents=True)  # the user's own (empty) folder stays
    res = cli("backfill", "crashes", "zzzz-9999", "--source", soda_ro.url, "--dest", str(dest))
    assert res.code == 1
    one_line_error(res.err, "zzzz-9999", "404")
    # crashes landed before the 404 and stays; zzzz-9999's lock folder is gone again
    assert (dest / "crashes" / "manifest.json").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["crashes", "mine"]


def test_invalid_token(soda_ro: FakeSoda, tmp_path: Path) -> None:
    res = cli(
        "backfill",
        "crashes",
        "--source",
        soda_ro.url,
        "--dest",
        str(tmp_path / "l"),
        env={"SOCRATA_APP_TOKEN": "not-a-token-xyz"},
    )
    assert res.code == 1
    one_line_error(res.err, "SOCRATA_APP_TOKEN")
    assert "not-a-token-xyz" not in res.text
    nothing_committed(tmp_path / "l")


def test_unreachable_source(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = cli(
        "backfill",
        "crashes",
        "--retries",
        "2",
        "--source",
        f"http://127.0.0.1:{port}",
        "--dest",
        str(tmp_path / "l"),
    )
    assert res.code == 1
    one_line_error(res.err, "gave up after 2 attempts")
    assert not (tmp_path / "l").exists()
    kept = tmp_path / "kept"  # a folder the user made is kept
    kept.mkdir()
    res = cli(
        "update", "--retries", "1", "--source", f"http://127.0.0.1:{port}", "--dest", str(kept)
    )
    assert res.code == 1
    assert kept.is_dir()
    assert not list(kept.rglob("*.*"))  # no file in it


def test_html_instead_of_json(soda: FakeSoda, tmp_path: Path) -> None:
    soda.add_fault("html", times=1000)
    res = cli(
        "backfill", "crashes", "--retries", "2", "--source", soda.url, "--dest", str(tmp_path / "l")
    )
    assert res.code == 1
    one_line_error(res.err, "HTML")
    nothing_committed(tmp_path / "l")


def test_unwritable_local_folder(soda: FakeSoda, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli("backfill", "crashes", "--source", soda.url, "--dest", str(blocker / "sub"))
    assert res.code == 1
    one_line_error(res.err, str(blocker))
    assert not soda.requests()  # found out before asking the source anything


def test_read_only_folder(soda: FakeSoda, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes anywhere: use a read-only bind target instead
        target = Path("/proc/nyc-collisions-test")
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    soda.reset_stats()
    res = cli("backfill", "crashes", "--source", soda.url, "--dest", str(target))
    assert res.code == 1
    one_line_error(res.err, "nyc-collisions-test" if os.geteuid() == 0 else "ro")
    assert soda.stats()["rows_served"] == 0, "checked the destination before downloading"


def test_missing_bucket(soda_ro: FakeSoda, s3_env: str) -> None:
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", "s3://no-such-bucket-nyc/x")
    assert res.code == 1
    one_line_error(res.err, "no-such-bucket-nyc", "does not exist")


def test_no_aws_credentials(
    soda_ro: FakeSoda, s3_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", "s3://some-bucket/x")
    assert res.code == 1
    one_line_error(res.err, "no AWS credentials")


def test_ctrl_c_mid_run_commits_nothing_partial(tmp_path: Path) -> None:
    sizes = {"h9gi-nx95": 4000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    latency = Latency(base=0.1, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=5, latency=latency) as srv:
        dest = tmp_path / "land"
        # A terminal's Ctrl-C: SIGINT raises KeyboardInterrupt in the CLI even when this test runs
        # where SIGINT is ignored (a background job, which its children inherit and Python keeps).
        interactive = (
            "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
            " sys.argv[0] = 'nyc-collisions'; runpy.run_module('nyc_collisions', "
            "run_name='__main__', alter_sys=True)"
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                interactive,
                "backfill",
                "crashes",
                "--source",
                srv.url,
                "--dest",
                str(dest),
                "--page-size",
                "100",
                "--file-rows",
                "300",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list(dest.rglob("runs/*/parts/*.json")):
            time.sleep(0.05)
        # From here every page takes 3 s more, and the interrupt is sent once one is being held:
        # however late this (loaded) test process gets there, the run is mid-run.
        srv.add_fault("slow", times=None, match="$order", seconds=3)
        while time.monotonic() < deadline and not srv.stats()["faults"].get("slow"):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        srv.clear_faults()
        assert proc.returncode == 130, out + err
        one_line_error(err, "interrupted")
        assert not (dest / "crashes/manifest.json").exists()
        res = cli(
            "backfill", "crashes", "--source", srv.url, "--dest", str(dest), "--page-size", "100"
        )
        assert res.code == 0, res.text
        assert "resumed run" in res.out


def test_ctrl_c_while_the_command_loads_is_one_line(tmp_path: Path) -> None:
    """The installed `nyc-collisions` command, interrupted while it imports pyarrow."""
    dest = tmp_path / "land"
    child = (
        "import importlib.metadata as md, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pyarrow':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "[command] = [e for e in md.entry_points(group='console_scripts')"
        " if e.name == 'nyc-collisions']\n"
        "sys.argv[0] = 'nyc-collisions'\n"
        "command.load()()\n"
    )
    args = ["backfill", "crashes", "--dest", str(dest)]
    done = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True)
    assert done.returncode == 130, done.stderr
    one_line_error(done.stderr, "interrupted")
    assert not dest.exists()


def test_access_denied(soda_ro: FakeSoda, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto enforcing IAM: a user who may read the bucket but not write to it."""
    import json

    import boto3
    import httpx
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    admin = {
        "endpoint_url": url,
        "region_name": "us-east-1",
        "aws_access_key_id": "admin",
        "aws_secret_access_key": "admin",
    }
    try:
        boto3.client("s3", **admin).create_bucket(Bucket="read-only-bucket")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": "*"}
            ],
        }
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        httpx.post(f"{url}/moto-api/reset-auth", content=b"0")  # enforce IAM from now on
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        soda_ro.reset_stats()
        res = cli(
            "backfill", "crashes", "--source", soda_ro.url, "--dest", "s3://read-only-bucket/raw"
        )
        assert res.code == 1
        one_line_error(res.err, "access denied")
        assert key["SecretAccessKey"] not in res.text
        assert soda_ro.stats()["rows_served"] == 0
    finally:
        httpx.post(f"{url}/moto-api/reset-auth", content=b"inf")
        server.stop()


def test_a_source_that_keeps_failing_says_so_while_it_retries(tmp_path: Path) -> None:
    """Without -v the first retries are quiet; from the third on each says why the run waits.
    The count goes beside the metadata, so both retry: the one that gives up says each of its
    retries, the other those it reached before the run ended."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nyc_collisions.cli",
            "backfill",
            "crashes",
            "--retries",
            "5",
            "--source",
            f"http://127.0.0.1:{port}",
            "--dest",
            str(tmp_path / "l"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "NYC_COLLISIONS_RETRY_BASE": "0.01"},
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    # the other request's last line may come after the error's, as the process ends
    [error] = [line for line in lines if "gave up" in line]
    assert "gave up after 5 attempts" in error
    retries: dict[str, list[str]] = {}
    for line in lines:
        if line != error:
            assert "ConnectError" in line, done.stderr
            target = line.split("(GET ")[1].rstrip(")")
            retries.setdefault(target, []).append(line.split("retry ")[1][:3])
    gave_up = next(t for t in retries if t.split("?")[0] in error)
    assert retries[gave_up] == ["3/4", "4/4"], done.stderr
    assert all(seen == ["3/4", "4/4"][: len(seen)] for seen in retries.values()), done.stderr


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("NYC_COLLISIONS_RETRIES", "many"),
        ("NYC_COLLISIONS_RETRIES", "0"),
        ("NYC_COLLISIONS_RETRY_BASE", "soon"),
        ("NYC_COLLISIONS_RETRY_BASE", "-1"),
        ("NYC_COLLISIONS_RETRY_BASE", "inf"),
        ("NYC_COLLISIONS_WIRE", "xml"),
        ("NYC_COLLISIONS_ALLOW_HTTP", "maybe"),
    ],
)
def test_bad_environment_values(soda: FakeSoda, tmp_path: Path, var: str, value: str) -> None:
    res = cli(
        "backfill", "crashes", "--source", soda.url, "--dest", str(tmp_path / "l"), env={var: value}
    )
    assert res.code == 2, res.text
    one_line_error(res.err, var, repr(value))
    assert not (tmp_path / "l").exists()
    assert soda.requests() == [], "checked before asking the source anything"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("NYC_COLLISIONS_RETRIES", "0"),
        ("NYC_COLLISIONS_RETRIES", "ten"),
        ("NYC_COLLISIONS_RETRY_BASE", "x"),
        ("NYC_COLLISIONS_WIRE", "xml"),
        ("NYC_COLLISIONS_FORMAT", "xlsx"),
        ("NYC_COLLISIONS_RECONCILE_WEEKDAY", "someday"),
        ("NYC_COLLISIONS_ALLOW_HTTP", "maybe"),
    ],
)
def test_bad_environment_values_in_lambda(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    from nyc_collisions import aws, lambda_token
    from nyc_collisions.errors import UsageError

    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    monkeypatch.setenv("NYC_COLLISIONS_DEST", str(tmp_path / "l"))
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes")
    monkeypatch.setenv(var, value)
    lambda_token._token_cache.clear()
    with pytest.raises(UsageError) as caught:
        aws.handler({"command": "backfill"}, None)
    assert len(str(caught.value).splitlines()) == 1
    assert var in str(caught.value)
    assert repr(value) in str(caught.value)
    assert not (tmp_path / "l").exists()
    assert soda.requests() == []


def test_the_cli_honours_retries_from_the_environment(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["backfill", "crashes", "--source", f"http://127.0.0.1:{port}"]
    env = {"NYC_COLLISIONS_RETRIES": "2"}
    res = cli(*args, "--dest", str(tmp_path / "l"), env=env)
    assert res.code == 1
    one_line_error(res.err, "gave up after 2 attempts")
    res = cli(*args, "--retries", "1", "--dest", str(tmp_path / "l"), env=env)
    assert res.code == 1
    one_line_error(res.err, "gave up after 1 attempt;")  # the option wins over the variable


@pytest.mark.parametrize("value", ["soon", "Sun, 99 Foo 2026 25:61:00 GMT", "inf", "nan"])
def test_a_retry_after_that_is_no_number_or_date_is_retried_normally(
    soda: FakeSoda, tmp_path: Path, value: str
) -> None:
    soda.add_fault("429", times=2, match="$order", retry_after=value)
    soda.add_fault("503", times=1, match="/api/views/", retry_after=value)
    dest = str(tmp_path / "land")
    res = cli("backfill", "crashes", "--source", soda.url, "--dest", dest)
    assert res.code == 0, res.text
    assert soda.stats()["faults"] == {"429": 2, "503": 1}
    exact(soda, dest, "crashes", tmp_path)


@pytest.mark.parametrize(
    ("match", "body", "needle"),
    [
        ("/api/views/", "", "complete JSON"),
        ("/api/views/", "<html><body>Maintenance</body></html>", "HTML"),
        ("/api/views/", '["not", "metadata"]', "without columns"),
        ("count(*)", "", "complete JSON"),
        ("count(*)", '{"n": "12"}', "aggregate"),
        ("$order", "", "empty"),
        ("$order", "rows: none", "not a JSON array"),
        ("$order", '{"rows": []}', "not a JSON array"),
    ],
    ids=[
        "metadata_empty",
        "metadata_html",
        "metadata_not_metadata",
        "count_empty",
        "count_object",
        "page_empty",
        "page_garbage",
        "page_object",
    ],
)
def test_a_body_that_is_not_what_soda_sends(
    soda: FakeSoda, tmp_path: Path, match: str, body: str, needle: str
) -> None:
    """Fetched again; when it stays broken: one line, exit 1, nothing committed."""
    soda.add_fault("body", times=None, match=match, body=body)
    dest = tmp_path / "l"
    args = ["backfill", "crashes", "--wire", "json", "--retries", "2", "--source", soda.url]
    res = cli(*args, "--dest", str(dest))
    assert res.code == 1, res.text
    one_line_error(res.err, "gave up after 2 attempts", needle)
    nothing_committed(dest)
    soda.clear_faults()
    soda.add_fault("body", times=1, match=match, body=body)
    res = cli(*args, "--dest", str(dest))
    assert res.code == 0, res.text
    exact(soda, str(dest), "crashes", tmp_path)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["backfill", "crashes", "--retries", "0"], ["--retries", "backfill --help"]),
        (["backfill", "crashes", "--timeout", "0"], ["--timeout"]),
        (["backfill", "crashes", "--format", "xml"], ["--format", "xml"]),
        (["update", "--no-such-option"], ["--no-such-option", "update --help"]),
        (["no-such-command"], ["no-such-command"]),
        (["export", "crashes"], ["--output"]),
    ],
    ids=["retries_0", "timeout_0", "format_xml", "unknown_option", "unknown_command", "no_output"],
)
def test_option_errors_are_one_line(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    """What click itself refuses reads like every other error: one line, exit 2."""
    done = subprocess.run(
        [sys.executable, "-m", "nyc_collisions", *args, "--dest", str(tmp_path / "land")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    one_line_error(done.stderr, "error", *needles)
    assert not (tmp_path / "land").exists()


def test_status_says_why_the_source_has_no_count_for_a_dataset_not_landed(
    soda_ro: FakeSoda, tmp_path: Path
) -> None:
    """A dataset id the source does not have (a typo): the text says so, not just `?` rows."""
    res = cli("status", "abcd-1234", "--source", soda_ro.url, "--dest", str(tmp_path / "land"))
    assert res.code == 0, res.text
    assert "404" in res.out, res.out
    assert "abcd-1234" in res.out, res.out


@pytest.mark.parametrize("command", ["status", "verify"])
def test_output_piped_to_a_reader_that_stops_early_ends_quietly(
    soda_ro: FakeSoda, tmp_path: Path, command: str
) -> None:
    """`nyc-collisions status | head -1`: the reader closes the pipe before the last line. That
    is no error of ours to report ("unexpected BrokenPipeError ... please report it"): the
    command ends quietly with the status of a program the pipe's signal ended."""
    dest = str(tmp_path / "land")
    assert cli("backfill", "--source", soda_ro.url, "--dest", dest).code == 0
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NYC_COLLISIONS_", "SOCRATA_"))}
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nyc_collisions", command, "--source", soda_ro.url, "--dest", dest],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # as `| head -0` would: the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, err
    assert err == ""
