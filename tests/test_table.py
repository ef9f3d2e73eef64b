"""`--table delta`: every command that changes landed data keeps <dest>/<dataset>/table/ equal to
the current state, as DuckDB's own delta extension reads it (no nyc-collisions on the read)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlparse

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nyc_collisions.sink.storage import open_storage
from tests.fake_soda import GENERIC, FakeSoda
from tests.helpers import NAMES, cli

deltalake = pytest.importorskip("deltalake")

KEYS = {"crashes": "collision_id", "persons": "unique_id", GENERIC: "socrata_id"}
TABLE = ("--table", "delta")


def _extension(package: str) -> str:
    """The .duckdb_extension file a `duckdb-extension-*` package ships (offline install)."""
    module = pytest.importorskip(package)
    found = sorted(Path(module.__file__).parent.rglob("*.duckdb_extension"))
    assert found, f"{package} ships no extension file"
    return str(found[-1])


def _duckdb(dest: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    for package, name in (
        ("duckdb_extension_delta", "delta"),
        ("duckdb_extension_httpfs", "httpfs"),
    ):
        con.execute(f"INSTALL '{_extension(package)}'")
        con.execute(f"LOAD {name}")
    if dest.startswith("s3://"):
        endpoint = urlparse(os.environ["AWS_ENDPOINT_URL"])
        con.execute(
            "CREATE SECRET (TYPE s3, KEY_ID ?, SECRET ?, REGION ?, ENDPOINT ?, "
            "URL_STYLE 'path', USE_SSL false)",
            [
                os.environ["AWS_ACCESS_KEY_ID"],
                os.environ["AWS_SECRET_ACCESS_KEY"],
                os.environ["AWS_DEFAULT_REGION"],
                endpoint.netloc,
            ],
        )
    return con


def _table_uri(dest: str, name: str) -> str:
    return f"{dest}/{name}/table" if dest.startswith("s3://") else str(Path(dest, name, "table"))


def assert_table_is_export(dest: str, name: str, tmp_path: Path) -> int:
    """DuckDB's delta_scan of the table gives exactly the rows `export` writes, typed alike."""
    out = tmp_path / f"{name}.parquet"
    res = cli("export", name, "--dest", dest, "--output", str(out))
    assert res.code == 0, res.text
    want = pq.read_table(out).sort_by(KEYS[name])
    con = _duckdb(dest)
    got = con.execute(f"SELECT * FROM delta_scan('{_table_uri(dest, name)}')").to_arrow_table()
    assert got.column_names == want.column_names
    got = pa.table(
        [c.cast(f.type) for c, f in zip(got.columns, want.schema, strict=True)], schema=want.schema
    ).sort_by(KEYS[name])
    assert got.num_rows == want.num_rows
    assert got.equals(want)
    return got.num_rows


def _run(*args: str) -> str:
    res = cli(*args)
    assert res.code == 0, res.text
    return res.out


def _mutate(srv: FakeSoda, cycle: int) -> None:
    for name in ("crashes", "persons"):
        srv.insert(NAMES[name], 20 + cycle)
        srv.edit(NAMES[name], 15)
        srv.delete(NAMES[name], 7)


def test_table_follows_every_command(
    soda: FakeSoda, dest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nyc_collisions import table as table_module

    src = ("--source", soda.url, "--dest", dest)
    names = ["crashes", "persons"]
    _run("backfill", *names, *src, "--page-size", "700", *TABLE)
    for name in names:
        assert_table_is_export(dest, name, tmp_path)
    # the changes go in by MERGE (they touch few of a big table's files), by a rewrite of the
    # table's own files (they touch most), and as the table decides
    ways = {0: (1.0, "MERGE"), 1: (0.0, "WRITE")}
    for cycle in range(3):
        _mutate(soda, cycle)
        if cycle in ways:
            monkeypatch.setattr(table_module, "MERGE_MAX_FILE_SHARE", ways[cycle][0])
        else:
            monkeypatch.setattr(table_module, "MERGE_MAX_FILE_SHARE", 0.5)
        if cycle == 0:
            _run("update", *names, *src, *TABLE)
        elif cycle == 1:
            _run("update", *names, *src, "--reconcile", *TABLE)
        else:  # changes landed without the table: the next command with it catches up
            _run("update", *names, *src)
            _run("reconcile", *names, *src, *TABLE)
        for name in names:
            assert_table_is_export(dest, name, tmp_path)
            if cycle in ways:
                assert _last_operation(dest, name) == ways[cycle][1]
    soda.replace(NAMES["crashes"])  # a full replace lands a fresh snapshot: the table rewritten
    soda.edit(NAMES["crashes"], 5)
    _run("update", "crashes", *src, *TABLE)
    n = assert_table_is_export(dest, "crashes", tmp_path)
    assert n == len(soda.rows(NAMES["crashes"]))
    _run("compact", "crashes", "--dest", dest, "--prune", "--grace", "0", *TABLE)
    assert_table_is_export(dest, "crashes", tmp_path)
    table = deltalake.DeltaTable(_table_uri(dest, "crashes"), storage_options=_options(dest))
    assert len(table.file_uris()) == len(_data_objects(dest)), "vacuum left superseded files"


def _last_operation(dest: str, name: str) -> str:
    """The operation of the table's latest commit, from its log."""
    table = deltalake.DeltaTable(_table_uri(dest, name), storage_options=_options(dest))
    log = open_storage(dest).get_bytes(f"{name}/table/_delta_log/{table.version():020d}.json")
    assert log is not None
    infos = [json.loads(line).get("commitInfo") for line in log.splitlines()]
    return str(next(i for i in infos if i)["operation"])


def _options(dest: str) -> dict[str, str]:
    if not dest.startswith("s3://"):
        return {}
    return {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_ALLOW_HTTP": "true"}


def _data_objects(dest: str) -> list[str]:
    """Every data file of the crashes table, as stored (not the log's checkpoints)."""
    if not dest.startswith("s3://"):
        return [str(p) for p in Path(dest, "crashes", "table").glob("*.parquet")]
    import boto3

    url = urlparse(dest)
    pages = (
        boto3.client("s3")
        .get_paginator("list_objects_v2")
        .paginate(Bucket=url.netloc, Prefix=f"{url.path.strip('/')}/crashes/table/")
    )
    keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
    return [k for k in keys if k.endswith(".parquet") and "/_delta_log/" not in k]


def test_a_crash_between_commits_is_healed(
    soda: FakeSoda, dest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest commits, then the table's commit fails: the run says so in one line, the
    landed data stays committed, and the next run brings the table up to the manifest."""
    from nyc_collisions import table as table_module

    src = ("crashes", "--source", soda.url, "--dest", dest)
    _run("backfill", *src, *TABLE)
    soda.insert(NAMES["crashes"], 30)
    soda.edit(NAMES["crashes"], 10)

    def broken(*_args: object, **_kw: object) -> None:
        raise OSError("the table store went away")

    with monkeypatch.context() as patch:
        patch.setattr(table_module, "merge_changes", broken)
        patch.setattr(table_module, "rewrite_with_changes", broken)
        res = cli("update", *src, *TABLE)
    assert res.code == 1
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1, res.err
    assert "table" in lines[0]
    # nothing new at the source: this run lands nothing, and heals the table
    _run("update", *src, *TABLE)
    assert_table_is_export(dest, "crashes", tmp_path)


@pytest.mark.parametrize("how", ["option", "env"])
def test_unknown_table_format_is_one_line(soda_ro: FakeSoda, tmp_path: Path, how: str) -> None:
    args = ["update", "crashes", "--source", soda_ro.url, "--dest", str(tmp_path)]
    env = None
    if how == "option":
        args += ["--table", "parquet-ish"]
    else:
        env = {"NYC_COLLISIONS_TABLE": "parquet-ish"}
    res = cli(*args, env=env)
    assert res.code == 2
    assert res.err.strip().count("\n") == 0, res.err
    assert "parquet-ish" in res.err
    assert not any(tmp_path.iterdir())


def test_new_columns_rewrite_the_table(soda: FakeSoda, dest: str, tmp_path: Path) -> None:
    """The publisher adds and retypes columns: update lands a fresh snapshot with them, and the
    table is written again in the new columns (DuckDB reads them as export writes them)."""
    src = ("crashes", "--source", soda.url, "--dest", dest)
    _run("backfill", *src, *TABLE)
    soda.add_column(NAMES["crashes"], "severity_score", "number", position=3)
    soda.retype_column(NAMES["crashes"], "zip_code", "number")
    soda.edit(NAMES["crashes"], 10)
    _run("update", *src, *TABLE)
    got = assert_table_is_export(dest, "crashes", tmp_path)
    assert got == len(soda.rows(NAMES["crashes"]))
    soda.insert(NAMES["crashes"], 12)
    _run("update", *src, *TABLE)  # and changes merge into the new columns
    assert_table_is_export(dest, "crashes", tmp_path)


def test_the_lambda_keeps_the_table(
    soda: FakeSoda, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NYC_COLLISIONS_TABLE=delta: the scheduled update keeps the table on S3 too."""
    from nyc_collisions import aws
    from tests.test_aws import Context

    dest = f"s3://{bucket}/collisions_raw_data"
    _run("backfill", "crashes", "--source", soda.url, "--dest", dest)
    soda.insert(NAMES["crashes"], 9)
    soda.edit(NAMES["crashes"], 4)
    for name, value in {
        "NYC_COLLISIONS_DEST": dest,
        "NYC_COLLISIONS_DATASETS": "crashes",
        "SOCRATA_BASE_URL": soda.url,
        "NYC_COLLISIONS_TABLE": "delta",
    }.items():
        monkeypatch.setenv(name, value)
    assert aws.handler({"command": "update"}, Context(60))["done"] is True
    assert_table_is_export(dest, "crashes", tmp_path)


def test_text_keys_merge(soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dataset keyed by `:id` (text, quoted in the merge's predicate) merges exactly too."""
    from nyc_collisions import table as table_module

    monkeypatch.setattr(table_module, "MERGE_MAX_FILE_SHARE", 1.0)  # always MERGE
    dest = str(tmp_path / "landing")
    src = (GENERIC, "--source", soda.url, "--dest", dest)
    _run("backfill", *src, *TABLE)
    soda.insert(GENERIC, 7)
    soda.edit(GENERIC, 5)
    soda.delete(GENERIC, 3)
    _run("update", *src, "--reconcile", *TABLE)
    assert _last_operation(dest, GENERIC) == "MERGE"
    assert_table_is_export(dest, GENERIC, tmp_path)


def test_a_lost_lease_stops_the_table_sync(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run takes the lease over while the table syncs: the stale run does not commit
    the table, and ends with one line and a non-zero exit."""
    import time

    from nyc_collisions import table as table_module

    dest = str(tmp_path / "d")
    src = ("crashes", "--source", soda.url, "--dest", dest)
    _run("backfill", *src, *TABLE)
    soda.insert(NAMES["crashes"], 30)
    real = table_module.merge_changes
    before: list[int] = []

    def taken_over(table: object, *args: object) -> tuple[int, int]:
        st = open_storage(dest)
        got = st.get_versioned("crashes/lock.json")
        assert got is not None
        # another run takes the lease over (as after a stall of a whole TTL)
        assert st.put_if(
            "crashes/lock.json", got.data.replace(b'"beat"', b'"xbeat"'), expect=got.version
        )
        time.sleep(1.5)  # the renewer (TTL 2 s: every 0.5 s) finds it lost
        before.append(deltalake.DeltaTable(_table_uri(dest, "crashes")).version())
        return real(table, *args)  # type: ignore[arg-type]

    monkeypatch.setenv("NYC_COLLISIONS_LEASE_TTL", "2")
    monkeypatch.setattr(table_module, "MERGE_MAX_FILE_SHARE", 1.0)
    monkeypatch.setattr(table_module, "merge_changes", taken_over)
    res = cli("update", *src, *TABLE)
    assert res.code != 0
    assert len([line for line in res.err.splitlines() if "error" in line]) == 1, res.err
    assert "lease" in res.err
    assert before, res.err
    assert deltalake.DeltaTable(_table_uri(dest, "crashes")).version() == before[0]


def test_a_commit_in_between_fails_the_stale_sync(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table commit lands between the sync's open and its overwrite: the overwrite fails
    (delta-rs would replay it on top, keeping the other's files: rows twice), one line, and
    the next run heals the table."""
    from nyc_collisions import table as table_module

    dest = str(tmp_path / "d")
    src = ("crashes", "--source", soda.url, "--dest", dest)
    _run("backfill", *src, *TABLE)
    soda.insert(NAMES["crashes"], 30)
    real = table_module.overwrite
    uri = _table_uri(dest, "crashes")

    def meanwhile(*args: object) -> int:
        # another run's sync commits the table as it was (its own files, the same mark)
        other = deltalake.DeltaTable(uri)
        mark = other.history(1)[0][table_module.MARK_KEY]
        deltalake.write_deltalake(
            other,
            other.to_pyarrow_table(),
            mode="overwrite",
            commit_properties=deltalake.CommitProperties(
                custom_metadata={table_module.MARK_KEY: mark}
            ),
        )
        return real(*args)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(table_module, "MERGE_MAX_ROWS", 0)  # a rewrite
        patch.setattr(table_module, "overwrite", meanwhile)
        res = cli("update", *src, *TABLE)
    assert res.code == 1
    assert len([line for line in res.err.splitlines() if line.strip()]) == 1, res.err
    _run("update", *src, *TABLE)
    assert_table_is_export(dest, "crashes", tmp_path)


def test_one_table_error_does_not_stop_the_other_datasets(
    soda: FakeSoda, dest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table of every dataset fails: each is still updated, each failure is one line, the
    run exits 1, and the next run heals the tables."""
    from nyc_collisions import table as table_module

    names = ["crashes", "persons"]
    src = ("--source", soda.url, "--dest", dest)
    _run("backfill", *names, *src, *TABLE)
    _mutate(soda, 0)

    def broken(*_args: object, **_kw: object) -> None:
        raise OSError("the table store went away")

    with monkeypatch.context() as patch:
        for name in ("merge_changes", "rewrite_with_changes", "overwrite"):
            patch.setattr(table_module, name, broken)
        res = cli("update", *names, *src, *TABLE)
    assert res.code == 1
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 2, res.err
    for name in names:  # both updated: nothing new at the source, the tables healed
        after = cli("update", name, *src, *TABLE)
        assert after.code == 0, after.text
        assert " 0 rows" in after.out, after.out
        assert_table_is_export(dest, name, tmp_path)


def test_prune_deletes_files_no_commit_names(soda: FakeSoda, tmp_path: Path) -> None:
    """compact --prune --grace 0 leaves only the table's live files: also the files of a killed
    write, and those whose remove entries the checkpoints no longer hold."""
    dest = str(tmp_path / "d")
    src = ("crashes", "--source", soda.url, "--dest", dest)
    _run("backfill", *src, *TABLE)
    uri = _table_uri(dest, "crashes")
    deltalake.DeltaTable(uri).alter.set_table_properties(
        {"delta.deletedFileRetentionDuration": "interval 0 seconds"}
    )
    killed = Path(uri, "part-00000-killed-write.zstd.parquet")
    pq.write_table(pa.table({"x": [1]}), killed)
    soda.edit(NAMES["crashes"], 5)
    _run("backfill", *src, "--force", *TABLE)  # a rewrite, and its checkpoint
    _run("compact", "crashes", "--dest", dest, "--prune", "--grace", "0", *TABLE)
    table = deltalake.DeltaTable(uri)
    assert sorted(Path(p).name for p in table.file_uris()) == sorted(
        Path(p).name for p in _data_objects(dest)
    )
    assert_table_is_export(dest, "crashes", tmp_path)


def test_the_sync_keeps_to_the_time_budget(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-seconds runs out while the table is rewritten: the rewrite does not commit (the
    next run brings the table up)."""
    import time

    from nyc_collisions import table as table_module

    dest = str(tmp_path / "d")
    src = ("crashes", "--source", soda.url, "--dest", dest)
    _run("backfill", *src, *TABLE)
    version = deltalake.DeltaTable(_table_uri(dest, "crashes")).version()
    soda.insert(NAMES["crashes"], 30)
    budget = 4
    real = table_module.iter_current

    def slow(*args: object) -> object:
        for i, rows in enumerate(real(*args)):  # type: ignore[arg-type]
            yield rows
            if i == 0:
                time.sleep(budget)  # past the deadline, however fast the run was

    with monkeypatch.context() as patch:
        patch.setattr(table_module, "MERGE_MAX_ROWS", 0)  # a rewrite
        patch.setattr(table_module, "iter_current", slow)
        res = cli("update", *src, "--max-seconds", str(budget), *TABLE)
    assert res.code in (0, 3), res.text  # (3: the update itself stopped by the deadline)
    assert "error" not in res.err, res.err
    assert deltalake.DeltaTable(_table_uri(dest, "crashes")).version() == version
    _run("update", *src, *TABLE)
    assert_table_is_export(dest, "crashes", tmp_path)


def test_daily_syncs_delete_what_they_superseded_a_grace_ago(
    soda: FakeSoda, dest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unattended, each daily sync merges changes (rewriting the files they touch) or rewrites
    the table (a full replace); the files they supersede go once the grace has passed (here
    none), not only at a `compact --prune` the Lambda never runs. The mark of the last sync
    stays the latest's: the next sync with nothing new leaves the table as it is."""
    from nyc_collisions import table as table_module

    monkeypatch.setattr(table_module, "DEFAULT_GRACE_HOURS", 0.0, raising=False)
    src = ("--source", soda.url, "--dest", dest)
    _run("backfill", "crashes", *src, "--page-size", "700", *TABLE)
    for cycle in range(3):
        _mutate(soda, cycle)
        if cycle == 2:
            soda.replace(NAMES["crashes"])  # the fresh snapshot rewrites the table
        _run("update", "crashes", *src, "--reconcile", *TABLE)
        assert_table_is_export(dest, "crashes", tmp_path)
        table = deltalake.DeltaTable(_table_uri(dest, "crashes"), storage_options=_options(dest))
        live = sorted(Path(p).name for p in table.file_uris())
        assert live == sorted(Path(p).name for p in _data_objects(dest)), cycle
    version = table.version()
    _run("update", "crashes", *src, *TABLE)
    table = deltalake.DeltaTable(_table_uri(dest, "crashes"), storage_options=_options(dest))
    assert table.version() == version  # nothing new: no commit, not a rewrite


def test_a_vacuum_with_nothing_left_to_delete_commits_nothing(
    soda: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log names a removed file for a week after it is deleted: a vacuum of it deletes
    nothing more, and two commits each sync would only lengthen the log."""
    from nyc_collisions import table as table_module
    from nyc_collisions.table_write import Guard, vacuum_superseded

    monkeypatch.setattr(table_module, "DEFAULT_GRACE_HOURS", 0.0, raising=False)
    dest = str(tmp_path / "d")
    src = ("crashes", "--source", soda.url, "--dest", dest)
    _run("backfill", *src, *TABLE)
    soda.edit(NAMES["crashes"], 5)
    _run("update", *src, *TABLE)  # merged, and the file it rewrote deleted at once
    uri = _table_uri(dest, "crashes")
    version = deltalake.DeltaTable(uri).version()
    storage = open_storage(dest)
    vacuum_superseded(
        uri, lambda: deltalake.DeltaTable(uri), storage, "crashes/table", None, 0.0, Guard()
    )
    assert deltalake.DeltaTable(uri).version() == version
