"""Broken state and unexpected failures: one line that names the file and the way out, exit 1."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from nyc_collisions.sink.storage import open_storage
from nyc_collisions.state import DatasetState
from tests.conftest import GOOD_TOKEN
from tests.fake_soda import FakeSoda
from tests.helpers import cli, exact

# dummy credentials made at run time (never a real-looking key in the repository)
_KEY_ID = "test-" + uuid.uuid4().hex[:12]
_SECRET = "test-secret-" + uuid.uuid4().hex


def one_line(text: str, *needles: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("nyc-collisions: error: "), text
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def land_crashes(soda: FakeSoda, dest: str, *extra: str) -> DatasetState:
    res = cli("backfill", "crashes", "--source", soda.url, "--dest", dest, *extra)
    assert res.code == 0, res.text
    return DatasetState(open_storage(dest), "crashes")


def snapshot_of(state: DatasetState) -> dict[str, bytes | None]:
    keys = state.storage.list_keys("crashes/")
    return {k: state.storage.get_bytes(k) for k in keys if not k.endswith("lock.json")}


def _fields(change: Callable[[dict[str, Any]], Any]) -> Callable[[bytes], bytes]:
    """A damage to the manifest's fields: still JSON, a field of the wrong kind."""

    def damage(data: bytes) -> bytes:
        doc = orjson.loads(data)
        change(doc)
        return orjson.dumps(doc)

    return damage


def _retired(path: str) -> dict[str, str]:
    """A retired file whose grace period is long past: the next run deletes it."""
    return {"path": path, "delete_after": "2000-01-01T00:00:00Z"}


@pytest.mark.parametrize(
    "damage",
    [
        lambda _: b'{"version": 1, "dataset": "cra',
        lambda _: b"null",
        lambda _: b"[]",
        lambda _: b"\x00\xff garbage",
        lambda _: b"",
        _fields(lambda d: d["columns"][0].pop("type")),
        _fields(lambda d: d.__setitem__("columns", "oops")),
        _fields(lambda d: d["batches"][0]["files"][0].__setitem__("path", None)),
        _fields(lambda d: d["batches"][0]["files"][0].__setitem__("bytes", "x")),
        _fields(lambda d: d["batches"][0].__setitem__("rows", "many")),
        _fields(lambda d: d["batches"][0]["files"][0].__setitem__("path", "../../etc/data/b/f")),
        _fields(lambda d: d.__setitem__("retired", [_retired("../../victim.txt")])),
        _fields(lambda d: d.__setitem__("retired", [_retired("/tmp/data/b/part.csv")])),
        _fields(lambda d: d.__setitem__("retired", [_retired("crashes/manifest.json")])),
        _fields(lambda d: d.__setitem__("retired", "all")),
    ],
    ids=[
        "truncated",
        "null",
        "array",
        "binary",
        "empty",
        "column-without-type",
        "columns-not-a-list",
        "file-path-null",
        "bytes-text",
        "rows-text",
        "file-outside",
        "retired-outside",
        "retired-absolute",
        "retired-the-manifest",
        "retired-not-a-list",
    ],
)
def test_a_corrupt_manifest_is_one_line_naming_it(
    soda_ro: FakeSoda, dest: str, damage: Callable[[bytes], bytes], tmp_path: Path
) -> None:
    state = land_crashes(soda_ro, dest)
    state.storage.put_bytes(
        state.manifest_key, damage(state.storage.get_bytes(state.manifest_key) or b"")
    )
    before = snapshot_of(state)
    where = ("--source", soda_ro.url, "--dest", dest)
    for command in (
        ("export", "crashes", "--dest", dest, "-o", str(tmp_path / "out.csv")),
        ("status", "crashes", *where),
        ("update", "crashes", *where),
        ("backfill", "crashes", "--force", *where),
        ("compact", "crashes", "--dest", dest),
    ):
        res = cli(*command)
        assert res.code == 1, (command, res.text)
        one_line(res.err, "crashes/manifest.json", "backfill")
    assert snapshot_of(state) == before  # nothing was written or removed
    assert not (tmp_path / "out.csv").exists()


def _cut(data: bytes) -> bytes:
    """The first half of the file, cut inside a row."""
    return data[: len(data) // 2]


def _cut_at_row(data: bytes) -> bytes:
    """Whole rows only: the cut a reader cannot see from the bytes themselves."""
    half = data[: len(data) // 2]
    return half[: half.rindex(b"\n") + 1]


@pytest.mark.parametrize(
    ("fmt", "damage"),
    [
        ("csv", _cut),
        ("csv", _cut_at_row),
        ("csv", lambda d: b"\xff" * len(d)),
        ("parquet", _cut),
        ("parquet", lambda d: b"\xff" * len(d)),
    ],
    ids=["csv-cut", "csv-cut_at_row", "csv-overwritten", "parquet-cut", "parquet-overwritten"],
)
def test_a_damaged_data_file_is_one_line_naming_it(
    soda_ro: FakeSoda, dest: str, fmt: str, damage: Any, tmp_path: Path
) -> None:
    state = land_crashes(
        soda_ro, dest, "--format", fmt, "--file-rows", "1000", "--page-size", "500"
    )
    manifest = state.load()
    assert manifest is not None
    victim = manifest.batches[-1].files[1].path
    data = state.storage.get_bytes(victim)
    assert data is not None
    state.storage.put_bytes(victim, damage(data))
    where = ("--source", soda_ro.url, "--dest", dest)
    for command in (
        ("export", "crashes", "--dest", dest, "-o", str(tmp_path / "out.parquet")),
        ("verify", "crashes", *where),
        ("compact", "crashes", "--dest", dest),
    ):
        res = cli(*command)
        assert res.code == 1, (command, res.text)
        one_line(res.err, victim, "--force")
    assert not (tmp_path / "out.parquet").exists()
    # the way out the line gives works
    res = cli("backfill", "crashes", "--force", *where)
    assert res.code == 0, res.text
    exact(soda_ro, dest, "crashes", tmp_path)


def test_an_unfinished_run_with_a_damaged_plan_is_replaced_by_a_new_run(
    soda_ro: FakeSoda, tmp_path: Path
) -> None:
    """Nothing of an unfinished run is committed: a plan that cannot be read as one is dropped
    (a warning names it) and the backfill lands the snapshot afresh."""
    dest = str(tmp_path / "land")
    state = DatasetState(open_storage(dest), "crashes")
    state.put_json(f"{state.run_prefix('backfill-damaged')}/plan.json", {"kind": "snapshot"})
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", dest)
    assert res.code == 0, res.text
    assert not state.storage.list_keys(f"{state.run_prefix('backfill-damaged')}/")
    exact(soda_ro, dest, "crashes", tmp_path)


@pytest.mark.parametrize("command", ["backfill", "export", "compact"])
def test_an_unexpected_failure_is_one_line_and_the_traceback_only_with_v(
    soda_ro: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The line says to rerun with -v for the traceback: every command that can say it takes
    -v."""
    token = GOOD_TOKEN
    monkeypatch.setenv("SOCRATA_APP_TOKEN", token)

    def broken(*_args: Any, **_kw: Any) -> None:
        raise RuntimeError(f"something nobody foresaw (with {token})")

    dest = str(tmp_path / "land")
    if command != "backfill":
        land_crashes(soda_ro, dest)
    monkeypatch.setattr(DatasetState, "load", broken)
    args: tuple[str, ...] = (command, "crashes", "--dest", dest)
    args += {
        "backfill": ("--source", soda_ro.url),
        "export": ("-o", str(tmp_path / "out.csv")),
        "compact": (),
    }[command]
    res = cli(*args)
    assert res.code == 1, res.text
    line = one_line(res.err, "RuntimeError", "something nobody foresaw", "-v")
    assert token not in res.text
    assert "***" in line
    res = cli(*args, "-v")
    assert res.code == 1
    assert "Traceback" in res.err
    assert token not in res.text
    if command == "backfill":
        assert not list((tmp_path / "land").rglob("manifest.json"))


class _S3Refuses(BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with one error."""

    status = 403
    code = "InvalidAccessKeyId"

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.code}</Code>"
            f"<Message>refused</Message><Region>eu-west-1</Region></Error>"
        ).encode()
        self.send_response(self.status)
        self.send_header("x-amz-bucket-region", "eu-west-1")
        self.send_header("content-type", "application/xml")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def s3_refusing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    status, code = request.param
    handler = type("Handler", (_S3Refuses,), {"status": status, "code": code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", _KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", _SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield code
    server.shutdown()


@pytest.mark.parametrize(
    ("s3_refusing", "needles"),
    [
        ((301, "PermanentRedirect"), ["another region", "eu-west-1"]),
        ((400, "AuthorizationHeaderMalformed"), ["another region", "eu-west-1"]),
        ((403, "InvalidAccessKeyId"), ["credentials"]),
        ((403, "SignatureDoesNotMatch"), ["credentials"]),
    ],
    indirect=["s3_refusing"],
    ids=["redirect", "auth_region", "bad_key_id", "bad_secret"],
)
def test_an_s3_refusal_says_what_to_fix(
    soda_ro: FakeSoda, s3_refusing: str, needles: list[str]
) -> None:
    for command in (
        ("backfill", "crashes", "--source", soda_ro.url),
        ("status", "crashes", "--source", soda_ro.url),
    ):
        res = cli(*command, "--dest", "s3://some-bucket/prefix")
        assert res.code == 1, res.text
        one_line(res.err, "s3://some-bucket", *needles)
        assert _SECRET not in res.text


def test_a_key_outside_the_destination_folder_is_refused(tmp_path: Path) -> None:
    """Whatever a record edited by hand names, the folder's storage reads, writes and deletes
    only inside the folder."""
    from nyc_collisions.errors import DestinationError
    from nyc_collisions.sink.local import LocalStorage

    storage = LocalStorage(tmp_path / "land")
    storage.put_bytes("crashes/data/b/part.csv", b"kept")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for key in ("../victim.txt", "crashes/../../victim.txt", "/" + str(victim).lstrip("/")):
        with pytest.raises(DestinationError, match="not a key inside the destination"):
            storage.delete([key])
        with pytest.raises(DestinationError, match="not a key inside the destination"):
            storage.get_bytes(key)
    assert victim.read_text() == "precious"
    assert storage.get_bytes("crashes/data/b/part.csv") == b"kept"
