"""A dataset landed with its own key (`backfill ID --key F`) keeps that key in every command."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

import nyc_collisions
from nyc_collisions import aws
from tests.fake_soda import GENERIC, FakeSoda
from tests.helpers import assert_exact, cli, columns, each_destination_and_format, read_export

KEY = "id"  # test-0001's own unique field; its default key would be `:id`


def export_equals_source(soda: FakeSoda, dest: str, tmp_path: Path) -> None:
    out = tmp_path / "generic.csv"
    res = cli("export", GENERIC, "--dest", dest, "-o", str(out))
    assert res.code == 0, res.text
    assert_exact(soda.rows(GENERIC), read_export(out), columns(soda.url, GENERIC), KEY)


def run(*args: str) -> str:
    res = cli(*args)
    assert res.code == 0, res.text
    return res.out


@each_destination_and_format(on_s3="csv")
def test_custom_key_through_every_command(
    soda: FakeSoda, dest: str, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = ("--source", soda.url, "--dest", dest)
    run("backfill", GENERIC, "--key", KEY, "--format", fmt, *where)
    for cycle in range(2):
        soda.insert(GENERIC, 7)
        soda.edit(GENERIC, 5)
        soda.delete(GENERIC, 3 + cycle)
        run("update", GENERIC, *where)
        out = run("reconcile", GENERIC, *where)
        assert f"vanished {3 + cycle}" in out, out
        assert "missing 0" in out, out  # nothing re-landed: the keys compared are the same field
        assert "OK" in run("verify", GENERIC, *where)
        export_equals_source(soda, dest, tmp_path)
    # a publisher's full replace: the refresh lands a new snapshot, still keyed by the field
    soda.replace(GENERIC)
    run("update", GENERIC, *where)
    soda.delete(GENERIC, 2)
    out = run("reconcile", GENERIC, *where)
    assert "vanished 2" in out, out
    assert "missing 0" in out, out
    run("compact", GENERIC, "--dest", dest)
    assert "OK" in run("verify", GENERIC, *where)
    export_equals_source(soda, dest, tmp_path)
    status = json.loads(run("status", GENERIC, "--json", *where))
    assert status[0]["agree"], status
    frame = nyc_collisions.read(GENERIC, dest=dest)
    assert sorted(frame[KEY].astype(int)) == sorted(int(r[KEY]) for r in soda.rows(GENERIC))
    # the Lambda handler resolves the dataset by name alone, as its schedule does
    soda.insert(GENERIC, 4)
    soda.delete(GENERIC, 1)
    monkeypatch.setenv("NYC_COLLISIONS_DEST", dest)
    monkeypatch.setenv("SOCRATA_BASE_URL", soda.url)
    summary = aws.handler({"datasets": [GENERIC], "reconcile": True}, None)
    assert summary["done"], summary
    assert [r.get("vanished") for r in summary["results"]] == [None, 1], summary
    assert "OK" in run("verify", GENERIC, *where)
    export_equals_source(soda, dest, tmp_path)


def test_a_key_that_contradicts_the_manifest_is_refused(soda: FakeSoda, tmp_path: Path) -> None:
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest)
    run("backfill", GENERIC, "--key", KEY, *where)
    before = sorted(p.name for p in (tmp_path / "land" / GENERIC).rglob("*"))
    for command in (
        ("backfill", GENERIC, "--key", ":id", "--force"),
        ("update", GENERIC, "--key", "name"),
        ("reconcile", GENERIC, "--key", ":id"),
        ("verify", GENERIC, "--key", ":id"),
    ):
        res = cli(*command, *where)
        assert res.code == 2, (command, res.text)
        lines = res.err.strip().splitlines()
        assert len(lines) == 1, (command, res.err)
        assert f"the key {KEY} it was landed with" in lines[0], (command, res.err)
    # the same key is accepted, and nothing was changed by the refused commands
    assert sorted(p.name for p in (tmp_path / "land" / GENERIC).rglob("*")) == before
    run("update", GENERIC, "--key", KEY, *where)


def test_an_unfinished_custom_key_backfill_resumes_with_its_key(
    soda: FakeSoda, tmp_path: Path
) -> None:
    dest = str(tmp_path / "land")
    where = ("--source", soda.url, "--dest", dest, "--page-size", "20", "--file-rows", "20")
    soda.add_fault("500", times=None, match=":id >")  # every page after the first fails
    res = cli("backfill", GENERIC, "--key", KEY, "--retries", "1", *where)
    assert res.code == 1, res.text
    soda.clear_faults()
    out = run("backfill", GENERIC, *where)  # no --key: the unfinished run's key is kept
    assert "resumed run" in out, out
    assert "OK" in run("verify", GENERIC, "--source", soda.url, "--dest", dest)
    export_equals_source(soda, dest, tmp_path)


def test_a_key_empty_in_some_rows_is_refused_before_anything_lands(tmp_path: Path) -> None:
    """`amount` is unique where it is set but empty in some rows: rows without a key would be
    merged into one by the current state (a reconcile then dropped them), so every command
    refuses such a key in one line, and nothing is landed."""
    with FakeSoda(sizes={GENERIC: 200}, seed=5) as soda:
        empty = sum(1 for r in soda.rows(GENERIC) if r.get("amount") is None)
        assert empty > 1
        dest = tmp_path / "land"
        where = ("--source", soda.url, "--dest", str(dest))
        for command in ("backfill", "update", "reconcile"):
            res = cli(command, GENERIC, "--key", "amount", *where)
            assert res.code == 1, res.text
            assert res.err.count("\n") == 1, res.err
            assert f"the key amount is empty in {empty} rows" in res.err, res.err
        assert not list(dest.rglob("manifest.json"))
        assert not [p for p in dest.rglob("*") if p.is_file() and "/data/" in p.as_posix()]


def test_verify_counts_rows_without_a_key() -> None:
    """Two landed rows without a key are two rows under one key, not a match."""
    from nyc_collisions.verify import compare_keys

    source = pa.array(["1", "2", None, None], pa.string())
    diff = compare_keys("x", source, source)
    assert (diff.duplicated, diff.ok) == (1, False)


def test_a_dropped_key_column_names_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher drops the column a dataset was keyed by: status does not say `run update`
    (which fails), and update's one line says what to do."""
    from nyc_collisions.source import DatasetSource

    with FakeSoda(sizes={GENERIC: 200}, seed=5) as soda:
        where = ("--source", soda.url, "--dest", str(tmp_path / "land"))
        # the fake's only unique field, `id`, cannot be dropped: `observed_at` (in every row,
        # a few repeated) is landed as a version that did not check keys would have
        key = "observed_at"
        with monkeypatch.context() as unchecked:
            unchecked.setattr(DatasetSource, "check_key", lambda _self: None)
            run("backfill", GENERIC, "--key", key, *where)
        soda.drop_column(GENERIC, key)
        status = run("status", GENERIC, *where)
        assert "run update" not in status
        assert f"the source dropped {key}" in status, status
        assert "another --dest" in status, status
        update = cli("update", GENERIC, *where)
        assert update.code == 1
        assert update.err.count("\n") == 1, update.err
        assert "another --dest" in update.err, update.err


@pytest.mark.parametrize("key", ["observed_at", "name", ":updated_at"])
def test_a_key_repeated_in_rows_is_refused_before_anything_lands(tmp_path: Path, key: str) -> None:
    """A key that several rows share (a date, a name, a system field): the current state would
    keep one of them (an update then dropped most of the dataset while status agreed)."""
    with FakeSoda(sizes={GENERIC: 200}, seed=5) as soda:
        dest = tmp_path / "land"
        res = cli("backfill", GENERIC, "--key", key, "--source", soda.url, "--dest", str(dest))
        assert res.code == 1, res.text
        assert res.err.count("\n") == 1, res.err
        assert f"the key {key} is" in res.err, res.err
        assert "a key must name every row once" in res.err, res.err
        assert not list(dest.rglob("manifest.json"))


def test_a_long_number_key_in_parquet_reads_back_as_the_source_sent_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key of 17 digits landed as Parquet: stored as a float it read back as
    `1.0000000000000088e+16`, so verify found every key missing and extra, and each reconcile
    tombstoned and re-landed every row, losing those whose keys collided as floats."""
    from tests.fake_soda import data

    original = data._generic_rows
    monkeypatch.setattr(data, "_generic_rows", lambda rng, keys: original(rng, keys + 10**16))
    with FakeSoda(sizes={GENERIC: 200}, seed=5) as soda:
        dest = str(tmp_path / "land")
        where = ("--source", soda.url, "--dest", dest)
        run("backfill", GENERIC, "--key", KEY, "--format", "parquet", *where)
        verify = cli("verify", GENERIC, *where)
        assert verify.code == 0, verify.text
        assert "missing 0, stale 0, vanished 0" in run("reconcile", GENERIC, *where)
        export_equals_source(soda, dest, tmp_path)
        assert cli("verify", GENERIC, *where).code == 0


def test_a_number_key_an_earlier_version_landed_in_parquet_still_reads() -> None:
    """Files written before the key was landed as text hold it as a float: read back as text,
    not refused (their keys then differ from the source's, as verify shows)."""
    from nyc_collisions.schema import Column, Schema

    schema = Schema((Column("id", "number"),), text_fields=frozenset({"id"}))
    old = pa.table({"id": pa.array([1.0, 2.5], pa.float64())})
    assert schema.to_text(old).column("id").to_pylist() == ["1", "2.5"]


def test_a_delta_table_an_earlier_version_keyed_by_a_number_follows_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table whose key column an earlier version wrote as a float takes the text keys of
    later batches: the table is rewritten with them and holds each row once."""
    deltalake = pytest.importorskip("deltalake")
    from nyc_collisions.datasets import Dataset

    with FakeSoda(sizes={GENERIC: 200}, seed=5) as soda:
        dest = str(tmp_path / "land")
        where = ("--source", soda.url, "--dest", dest)
        with monkeypatch.context() as before:  # as the earlier version landed a chosen key
            before.setattr(Dataset, "text_fields", property(lambda self: frozenset()))
            run(
                "backfill", GENERIC, "--key", KEY, "--format", "parquet", "--table", "delta", *where
            )
        soda.insert(GENERIC, 3)
        soda.edit(GENERIC, 4)
        run("update", GENERIC, "--table", "delta", *where)
        table = deltalake.DeltaTable(str(Path(dest) / GENERIC / "table")).to_pyarrow_table()
        source = {str(r[KEY]) for r in soda.rows(GENERIC)}
        assert sorted(table.column(KEY).to_pylist()) == sorted(source)
        assert "OK" in run("verify", GENERIC, *where)


@pytest.mark.parametrize("command", ["backfill", "update", "reconcile"])
def test_a_key_of_a_compound_type_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    """`location` (a legacy location: latitude, longitude, address) cannot be counted empty or
    grouped by at the source: each command that can land refuses it as a key before any row."""
    with FakeSoda(sizes={"h9gi-nx95": 300}, seed=5) as soda:
        dest = tmp_path / "land"
        where = ("--source", soda.url, "--dest", str(dest), "--retries", "2")
        res = cli(command, "crashes", "--key", "location", *where)
        assert res.code != 0, res.text
        assert res.err.count("\n") == 1, res.err
        assert "key 'location' is a location column" in res.err, res.err
        assert "another --key" in res.err, res.err
        assert not list(dest.rglob("manifest.json"))
