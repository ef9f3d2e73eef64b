"""Schema drift: the publisher adds, drops, renames, retypes or moves columns, and `update` (CLI
and Lambda) lands them; every reader reads batches of different columns."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pytest

import nyc_collisions
from nyc_collisions import aws, lambda_token
from nyc_collisions.manifest import Batch
from nyc_collisions.schema import Column, Schema
from nyc_collisions.sink.files import FileEntry, FileRotation
from nyc_collisions.sink.local import LocalStorage
from nyc_collisions.source import DatasetSource
from nyc_collisions.state import DatasetState
from tests.conftest import GOOD_TOKEN
from tests.fake_soda import CRASHES, PERSONS, FakeSoda
from tests.helpers import cli, each_destination_and_format, exact, read_export

SIZES = {CRASHES: 700, PERSONS: 1100, "bm4k-52h4": 50}
# crashes come as JSON pages (a location column), persons as CSV pages: both wires drift
DRIFTED = {"crashes": CRASHES, "persons": PERSONS}


@pytest.fixture
def srv() -> Iterator[FakeSoda]:
    with FakeSoda(sizes=SIZES, seed=23, tokens=(GOOD_TOKEN,)) as s:
        yield s


def land(srv: FakeSoda, dest: str, fmt: str, *names: str) -> None:
    res = cli("backfill", *(names or DRIFTED), "--source", srv.url, "--dest", dest, "--format", fmt)
    assert res.code == 0, res.text


def update(srv: FakeSoda, dest: str, *names: str) -> str:
    res = cli(
        "update", *(names or DRIFTED), "--source", srv.url, "--dest", dest, "--page-size", "300"
    )
    assert res.code == 0, res.text
    return res.out


def edits(srv: FakeSoda, dataset_id: str) -> None:
    srv.insert(dataset_id, 15)
    srv.edit(dataset_id, 20)
    srv.delete(dataset_id, 7)


# Each cycle: what the publisher does to the columns of each dataset, and what the manifest must
# then record as added, removed and retyped.
CYCLES: list[dict[str, tuple[list[tuple[str, Any]], dict[str, list[str]]]]] = [
    {
        "crashes": (
            [("add_column", ("weather", "text"))],
            {"added": ["weather"], "removed": [], "retyped": []},
        ),
        "persons": (
            [("add_column", ("injury_score", "number", 5))],
            {"added": ["injury_score"], "removed": [], "retyped": []},
        ),
    },
    {
        "crashes": (
            [("drop_column", ("cross_street_name",)), ("retype_column", ("zip_code", "number"))],
            {"added": [], "removed": ["cross_street_name"], "retyped": ["zip_code"]},
        ),
        "persons": (
            [("retype_column", ("person_age", "text")), ("drop_column", ("ped_location",))],
            {"added": [], "removed": ["ped_location"], "retyped": ["person_age"]},
        ),
    },
    {
        "crashes": (  # a rename looks like a drop and an add
            [("drop_column", ("off_street_name",)), ("add_column", ("off_street", "text", 8))],
            {"added": ["off_street"], "removed": ["off_street_name"], "retyped": []},
        ),
        "persons": (
            [("move_column", ("person_sex", 2)), ("add_column", ("seen", "checkbox"))],
            {"added": ["seen"], "removed": [], "retyped": []},
        ),
    },
]


def drift(srv: FakeSoda, cycle: int) -> None:
    for name, (changes, _) in CYCLES[cycle].items():
        for method, args in changes:
            getattr(srv, method)(DRIFTED[name], *args)
        edits(srv, DRIFTED[name])


def manifest_of(dest: str, name: str) -> dict[str, Any]:
    if dest.startswith("s3://"):
        bucket, _, prefix = dest[5:].partition("/")
        key = f"{prefix}/{name}/manifest.json"
        body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        return dict(json.loads(body))
    return dict(json.loads((Path(dest) / name / "manifest.json").read_text()))


@each_destination_and_format(on_s3="parquet")
def test_three_cycles_of_drift_and_edits_stay_exact(
    srv: FakeSoda, dest: str, fmt: str, tmp_path: Path
) -> None:
    land(srv, dest, fmt)
    for cycle in range(3):
        drift(srv, cycle)
        out = update(srv, dest)
        assert out.count("columns changed") == 2, out
        for name in DRIFTED:
            exact(srv, dest, name, tmp_path, ".parquet" if (cycle + len(fmt)) % 2 else ".csv")
            changes = manifest_of(dest, name)["schema_changes"]
            assert len(changes) == cycle + 1
            assert {k: changes[-1][k] for k in ("added", "removed", "retyped")} == (
                CYCLES[cycle][name][1]
            )
    # persons' last change was a move as well as an add
    assert manifest_of(dest, "persons")["schema_changes"][-1]["reordered"]
    # no drift now: the next update is a stream of changes again, in the newest columns
    for dataset_id in DRIFTED.values():
        srv.insert(dataset_id, 4)
        srv.edit(dataset_id, 5)
    out = update(srv, dest)
    assert "columns changed" not in out
    assert "landed a fresh snapshot" not in out
    assert out.count("updated 9 rows") == 2, out
    for name in DRIFTED:
        assert manifest_of(dest, name)["batches"][-1]["kind"] == "update"
        exact(srv, dest, name, tmp_path, ".csv")
        exact(srv, dest, name, tmp_path, ".parquet")


def test_batches_landed_before_a_change_keep_their_columns(srv: FakeSoda, tmp_path: Path) -> None:
    """Each batch names the columns it was landed with once they differ from the manifest's
    (a `backfill --force` keeps the batches it supersedes; an update's fresh snapshot retires
    them); compact (with and without --prune) writes the current state in the newest columns."""
    dest = str(tmp_path / "land")
    land(srv, dest, "parquet", "crashes")
    before = manifest_of(dest, "crashes")
    drift(srv, 0)
    res = cli("backfill", "crashes", "--force", "--source", srv.url, "--dest", dest)
    assert res.code == 0, res.text
    after = manifest_of(dest, "crashes")
    first, second = after["batches"]
    assert first["columns"] == before["columns"]
    assert "columns" not in second  # the manifest's own: the newest
    assert [c["field"] for c in after["columns"]][-4:] == [
        "weather",
        ":id",
        ":created_at",
        ":updated_at",
    ]
    change = after["schema_changes"][0]
    assert change["before"] == before["columns"]
    assert change["after"] == after["columns"]
    assert change["batch_id"] == second["batch_id"]
    for args in (["compact"], ["compact", "--prune", "--grace", "0"]):
        res = cli(*args, "crashes", "--dest", dest)
        assert res.code == 0, res.text
        exact(srv, dest, "crashes", tmp_path, ".parquet")
    assert len(manifest_of(dest, "crashes")["batches"]) == 1
    assert len(manifest_of(dest, "crashes")["schema_changes"]) == 1


def test_a_manifest_written_before_per_batch_columns_drifts_too(
    srv: FakeSoda, tmp_path: Path
) -> None:
    dest = str(tmp_path / "land")
    land(srv, dest, "csv", "persons")
    srv.insert(PERSONS, 9)
    srv.edit(PERSONS, 9)
    update(srv, dest, "persons")
    path = Path(dest) / "persons/manifest.json"
    doc = json.loads(path.read_text())
    doc.pop("schema_changes", None)  # as the tool wrote it before
    for batch in doc["batches"]:
        batch.pop("columns", None)
    path.write_text(json.dumps(doc))
    exact(srv, dest, "persons", tmp_path)
    drift(srv, 1)
    assert "columns changed" in update(srv, dest, "persons")
    exact(srv, dest, "persons", tmp_path, ".parquet")


def test_reconcile_and_verify_after_drift(srv: FakeSoda, tmp_path: Path) -> None:
    """verify says in one line to run update; reconcile lands the new columns itself."""
    dest = str(tmp_path / "land")
    land(srv, dest, "csv", "persons")
    drift(srv, 0)
    res = cli("verify", "persons", "--source", srv.url, "--dest", dest)
    assert res.code == 1
    assert res.err == ""
    lines = res.out.strip().splitlines()
    assert len(lines) == 1
    assert "columns changed" in lines[0]
    assert "injury_score" in lines[0]
    assert "`nyc-collisions update persons`" in lines[0]
    status = json.loads(cli("status", "persons", "--json", "--source", srv.url, "--dest", dest).out)
    assert status[0]["source_columns_changed"]["added"] == ["injury_score"]
    res = cli("reconcile", "persons", "--source", srv.url, "--dest", dest)
    assert res.code == 0, res.text
    assert "columns changed" in res.out
    exact(srv, dest, "persons", tmp_path)
    res = cli("verify", "persons", "--source", srv.url, "--dest", dest)
    assert res.code == 0, res.text
    status = json.loads(cli("status", "persons", "--json", "--source", srv.url, "--dest", dest).out)
    assert "source_columns_changed" not in status[0]
    assert status[0]["schema_changes"][-1]["added"] == ["injury_score"]


def test_columns_that_change_while_an_update_runs(
    srv: FakeSoda, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher adds a column just after the update read the metadata: the pages then
    carry a field the metadata did not name, and the update lands the new columns."""
    dest = str(tmp_path / "land")
    land(srv, dest, "csv", "persons")
    edits(srv, PERSONS)
    read_metadata = DatasetSource.metadata
    changed = []

    def then_drift(self: DatasetSource) -> dict[str, Any]:
        doc = read_metadata(self)
        if not changed:
            changed.append(srv.add_column(PERSONS, "late_column", "text"))
            srv.edit(PERSONS, 5)
        return doc

    monkeypatch.setattr(DatasetSource, "metadata", then_drift)
    out = update(srv, dest, "persons")
    assert changed
    assert "columns changed" in out
    exact(srv, dest, "persons", tmp_path)


def test_the_lambda_update_lands_drift_and_reports_it(
    srv: FakeSoda,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    json_log: io.StringIO,
    tmp_path: Path,
) -> None:
    dest = f"s3://{bucket}/collisions_raw_data"
    monkeypatch.setenv("NYC_COLLISIONS_DEST", dest)
    monkeypatch.setenv("SOCRATA_BASE_URL", srv.url)
    monkeypatch.setenv("SOCRATA_APP_TOKEN", GOOD_TOKEN)
    monkeypatch.setenv("NYC_COLLISIONS_DATASETS", "crashes,persons")
    lambda_token._token_cache.clear()
    land(srv, dest, "parquet")
    try:
        for cycle in range(3):
            drift(srv, cycle)
            summary = aws.handler({"command": "update"}, None)
            assert summary["done"] is True
            for result in summary["results"]:
                want = CYCLES[cycle][result["dataset"]][1]
                assert result["schema_change"] == want
            for name in DRIFTED:
                exact(srv, dest, name, tmp_path, ".csv", token=GOOD_TOKEN)
        warnings = [
            json.loads(line)
            for line in json_log.getvalue().splitlines()
            if line.startswith("{") and '"WARNING"' in line
        ]
        assert sum("columns changed" in w["message"] for w in warnings) == 6
        again = aws.handler({"command": "update"}, None)
        assert all("schema_change" not in r for r in again["results"])
    finally:
        lambda_token._token_cache.clear()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_readers_conform_batches_of_different_columns(tmp_path: Path, fmt: str) -> None:
    """A current state whose batches were landed with different columns (the tool lands a fresh
    snapshot after a change, so this is what a reader must still handle): it is read in the
    newest columns; a column a batch lacks is null, one whose type changed too."""
    system = (
        Column(":id", "text"),
        Column(":created_at", "fixed_timestamp"),
        Column(":updated_at", "fixed_timestamp"),
    )
    old = Schema(
        (Column("id", "number"), Column("name", "text"), Column("amount", "number"), *system)
    )
    new = Schema(
        (Column("weather", "text"), Column("id", "number"), Column("amount", "text"), *system)
    )
    storage = LocalStorage(tmp_path / "land")
    state = DatasetState(storage, "abcd-1234")

    def batch(kind: str, schema: Schema, rows: list[dict[str, str | None]]) -> Batch:
        b = Batch(f"b-{kind}-{len(rows)}", kind, fmt, "2026-01-01T00:00:00Z", [], 0)
        entries: list[FileEntry] = []
        files = FileRotation(
            storage,
            schema,
            fmt,
            1000,
            lambda seq: state.data_key(b.batch_id, 0, seq, fmt),
            0,
            lambda entry, _last, _done: entries.append(entry) if entry else None,
        )
        files.write(pa.Table.from_pylist(rows, schema=schema.text_schema()))
        files.commit(done=True)
        b.files, b.rows = entries, len(rows)
        return b

    def row(i: int, **values: str) -> dict[str, str | None]:
        stamp = f"2026-01-0{i}T00:00:00.000Z"
        return {
            "id": str(i),
            "socrata_id": f"row-{i}",
            "socrata_created_at": stamp,
            "socrata_updated_at": stamp,
            **values,
        }

    def specs(schema: Schema) -> list[dict[str, str]]:
        return [
            {"field": c.field_name, "name": c.name, "type": c.data_type} for c in schema.columns
        ]

    snapshot = batch("snapshot", old, [row(1, name="a", amount="1.5"), row(2, name="b"), row(3)])
    update = batch("update", new, [row(2, weather="rain", amount="x"), row(4)])
    tombstones = batch("tombstones", Schema((Column("id", "number"),)), [{"id": "3"}])
    manifest = {
        "dataset": "abcd-1234",
        "dataset_id": "abcd-1234",
        "key": "id",
        "columns": specs(new),
        "batches": [
            {**asdict(snapshot), "columns": specs(old)},  # landed before the change
            asdict(update),
            asdict(tombstones),
        ],
        "version": 1,
    }
    state.put_json(state.manifest_key, manifest)

    want = {
        "1": {"weather": None, "amount": None},  # retyped since: null, as a drop and an add
        "2": {"weather": "rain", "amount": "x"},
        "4": {"weather": None, "amount": None},
    }
    names = ["weather", "id", "amount", "socrata_id", "socrata_created_at", "socrata_updated_at"]

    def check(suffix: str) -> None:
        out = tmp_path / f"out{suffix}"
        res = cli("export", "abcd-1234", "--dest", str(tmp_path / "land"), "--output", str(out))
        assert res.code == 0, res.text
        got = read_export(out)
        assert [list(r) for r in got[:1]] == [names]
        ids = [str(int(float(r["id"]))) for r in got]  # Parquet: a number, float64
        assert dict(zip(ids, ({k: r[k] for k in want["2"]} for r in got), strict=True)) == want
        assert dict(zip(ids, (r["socrata_id"] for r in got), strict=True)) == {
            i: f"row-{i}" for i in want
        }

    check(".csv")
    check(".parquet")
    frame = nyc_collisions.read("abcd-1234", dest=str(tmp_path / "land"))
    assert list(frame.columns) == names
    assert sorted(frame["weather"].fillna("-")) == ["-", "-", "rain"]
    res = cli("compact", "abcd-1234", "--prune", "--grace", "0", "--dest", str(tmp_path / "land"))
    assert res.code == 0, res.text
    check(".csv")
