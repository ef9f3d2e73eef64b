"""End to end: `nyc-collisions backfill` against the fake SODA server, to a folder and to S3."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tests.conftest import GOOD_TOKEN
from tests.fake_soda import FakeSoda
from tests.helpers import NAMES, cli, exact, read_export


def backfill(srv: FakeSoda, dest: str, *extra: str) -> None:
    res = cli("backfill", "--source", srv.url, "--dest", dest, *extra)
    assert res.code == 0, res.text


# Each pair of destination, format and workers once (four runs, not eight): the three are
# separate layers, so a bug of one pair shows in the run that has it.
@pytest.mark.parametrize(
    ("dest", "fmt", "workers"),
    [
        ("s3", "csv", "4"),
        ("s3", "parquet", "1"),
        ("local", "parquet", "4"),
        ("local", "csv", "1"),
    ],
    ids=[
        "s3-parallel-csv",
        "s3-sequential-parquet",
        "local-parallel-parquet",
        "local-sequential-csv",
    ],
    indirect=["dest"],
)
def test_backfill_all_three_exact(
    soda_ro: FakeSoda, dest: str, fmt: str, workers: str, tmp_path: Path
) -> None:
    backfill(
        soda_ro,
        dest,
        "--format",
        fmt,
        "--workers",
        workers,
        "--page-size",
        "700",
        "--file-rows",
        "1500",
    )
    for name in NAMES:
        exact(soda_ro, dest, name, tmp_path, ".csv")
        exact(soda_ro, dest, name, tmp_path, ".parquet")


def test_landed_layout_is_plain_files_with_a_manifest(soda_ro: FakeSoda, tmp_path: Path) -> None:
    dest = tmp_path / "land"
    backfill(soda_ro, str(dest), "crashes", "--page-size", "1000", "--file-rows", "1000")
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert "crashes/manifest.json" in files
    data = [f for f in files if f.startswith("crashes/data/")]
    assert data
    assert all(f.endswith(".csv") for f in data)
    assert not [f for f in files if f.startswith("crashes/runs/") or f.endswith(".tmp")]
    assert all(" " not in f and "'" not in f and '"' not in f for f in files)
    # each file has exactly one header row, and the manifest counts rows right
    import json

    manifest = json.loads((dest / "crashes/manifest.json").read_text())
    (batch,) = manifest["batches"]
    assert sorted(f["path"] for f in batch["files"]) == data
    for entry in batch["files"]:
        lines = read_export(dest / entry["path"])
        assert len(lines) == entry["rows"]
    assert batch["rows"] == len(soda_ro.rows("h9gi-nx95"))


def test_rerun_skips_a_landed_dataset_and_force_replaces(soda_ro: FakeSoda, tmp_path: Path) -> None:
    dest = str(tmp_path / "land")
    backfill(soda_ro, dest, "crashes")
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", dest)
    assert res.code == 0
    assert "already committed" in res.out
    assert "--force" in res.out
    backfill(soda_ro, dest, "crashes", "--force", "--format", "parquet")
    assert exact(soda_ro, dest, "crashes", tmp_path) == len(soda_ro.rows("h9gi-nx95"))


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        ("429", {"retry_after": 0}),
        ("429", {}),
        ("500", {}),
        ("503", {}),
        ("202", {}),
        ("reset", {}),
        ("truncate_rows", {}),
        ("truncate_mid", {}),
        ("truncate_rows", {"after_rows": 0}),
        ("html", {}),
        ("403_throttle", {}),
    ],
    ids=[
        "429_retry_after",
        "429_bare",
        "500",
        "503",
        "202",
        "reset_mid_body",
        "truncated_clean_rows",
        "truncated_clean_mid",
        "truncated_to_empty",
        "html_page",
        "403_throttle",
    ],
)
def test_faults_during_backfill_still_exact(
    soda: FakeSoda, kind: str, kw: dict[str, object], tmp_path: Path
) -> None:
    soda.add_fault(kind, times=3, match="$order", **kw)
    dest = str(tmp_path / "land")
    backfill(soda, dest, "crashes", "persons", "--page-size", "900", "--workers", "3")
    assert soda.stats()["faults"].get(kind, 0) == 3
    for name in ("crashes", "persons"):
        exact(soda, dest, name, tmp_path)


def test_token_is_sent_and_never_written(soda: FakeSoda, tmp_path: Path) -> None:
    dest = tmp_path / "land"
    res = cli(
        "backfill",
        "crashes",
        "-v",
        "--source",
        soda.url,
        "--dest",
        str(dest),
        env={"SOCRATA_APP_TOKEN": GOOD_TOKEN},
    )
    assert res.code == 0, res.text
    assert GOOD_TOKEN not in res.text
    for path in dest.rglob("*"):
        if path.is_file():
            assert GOOD_TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("debris", [False, True], ids=["clean", "a_record_half_written"])
def test_time_budget_stops_cleanly_and_rerun_resumes(tmp_path: Path, debris: bool) -> None:
    """With `debris`, a process killed while it wrote a part record has left that record's
    temporary file, empty: the rerun resumes from the records, not reading it, and removes it."""
    from tests.fake_soda import Latency

    sizes = {"h9gi-nx95": 3000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    latency = Latency(base=0.2, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=3, latency=latency) as srv:
        args = ["crashes", "--source", srv.url, "--page-size", "100", "--file-rows", "200"]
        args += ["--workers", "2"]
        # A budget that ends the run after some files and before the end, however loaded this
        # machine is: the first budget that does (a budget is not a measure of speed here).
        for budget in (0.8, 1.6, 3.2, 6.4):
            dest = tmp_path / f"land-{budget}"
            first = cli("backfill", *args, "--dest", str(dest), "--max-seconds", str(budget))
            assert first.code in (0, 3), first.text
            assert first.code == 3, f"finished within {budget}s before any budget stopped it"
            parts = list(dest.glob("crashes/runs/*/parts/*.json"))
            committed = sum(json.loads(p.read_bytes())["rows"] for p in parts)
            if committed:
                break
        assert committed, "no budget let a file be committed"
        assert "resumes" in first.out
        assert not (dest / "crashes/manifest.json").exists()
        if debris:
            record = parts[0].parent.relative_to(dest) / "0099-000000.json"
            killed_while_writing(dest, str(record))
        srv.reset_stats()
        second = cli("backfill", *args, "--dest", str(dest))
        assert second.code == 0, second.text
        assert "resumed run" in second.out
        # it went on from the committed files: only what they lack is fetched again (and at
        # most the page each partition had in flight)
        pages = [r for r in srv.requests() if r["params"].get("$select", "").startswith("*")]
        assert sum(r["rows"] for r in pages) <= 3000 - committed + 2 * 100
        # its plan holds the count it started from: the source's is not asked again
        selects = [r["params"].get("$select", "") for r in srv.requests()]
        assert not [s for s in selects if "count(" in s and "max(" in s]
        exact(srv, str(dest), "crashes", tmp_path)
        assert not list(dest.rglob("*.tmp"))


def killed_while_writing(dest: Path, key: str) -> None:
    """What a process killed while it wrote `key` into the folder `dest` leaves: its temporary
    file beside the key, empty, named for a writer that has ended."""
    code = (
        "import os, sys; from pathlib import Path; "
        "from nyc_collisions.sink.local import LocalStorage; "
        "LocalStorage(Path(sys.argv[1])).open_writer(sys.argv[2]); os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", code, str(dest), key], check=False)
    folder = (dest / key).parent
    assert [p.name for p in folder.glob(".*.tmp")], "no temporary file was left"


def test_aggregates_cut_to_nothing_are_fetched_again(soda: FakeSoda, tmp_path: Path) -> None:
    """`[]` for a count is a body cut short, never zero rows."""
    soda.add_fault("truncate_rows", times=4, match="count", after_rows=0)
    dest = str(tmp_path / "land")
    backfill(soda, dest, "vehicles", "--page-size", "700")
    assert soda.stats()["faults"]["truncate_rows"] == 4
    exact(soda, dest, "vehicles", tmp_path)


def test_a_stop_while_planning_resumes_the_plan(tmp_path: Path) -> None:
    """Fetching starts with the first boundary; a stop before the last one keeps the plan."""
    import json

    from tests.fake_soda import Latency

    sizes = {"h9gi-nx95": 4000, "f55k-p6yu": 10, "bm4k-52h4": 10}
    latency = Latency(base=0.15, per_row=0.0, per_skipped=0.0, max_concurrent=3)
    with FakeSoda(sizes=sizes, seed=6, latency=latency) as srv:
        args = ("backfill", "crashes", "--source", srv.url, "--page-size", "200", "--workers", "8")
        # Every boundary probe takes half a second more: the plan's last boundary comes at least
        # 3 s after its first partition, so the first budget that sees a partition stops the run
        # before the last boundary, however loaded this machine is.
        srv.add_fault("slow", times=None, match="$offset", seconds=0.5)
        for budget in (0.5, 1.0, 2.0, 4.0):
            dest = tmp_path / f"land-{budget}"
            first = cli(*args, "--dest", str(dest), "--max-seconds", str(budget))
            assert first.code == 3, first.text
            plans = list(dest.glob("crashes/runs/*/plan.json"))
            plan = json.loads(plans[0].read_text()) if plans else {"partitions": []}
            if plan["partitions"]:
                break
        assert plan["partitions"], "no budget let a partition be planned"
        assert plan["complete"] is False  # stopped before the last boundary
        srv.clear_faults()
        args += ("--dest", str(dest))
        second = cli(*args)
        assert second.code == 0, second.text
        assert "resumed run" in second.out
        manifest = json.loads((dest / "crashes/manifest.json").read_text())
        info = manifest["batches"][0]["info"]
        assert info["planned"] == 8  # the plan of the first run, gone on with
        assert info["partitions"] == 8 + info["splits"]
        exact(srv, str(dest), "crashes", tmp_path)


def test_wire_is_csv_where_exact_and_lands_what_json_lands(
    soda: FakeSoda, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """auto: persons and vehicles come as CSV (half the bytes, cheaper to parse), crashes as
    JSON (CSV loses its location's human_address); the landed files are the same as with JSON."""
    landed: dict[str, list[bytes]] = {}
    for wire in ("auto", "json"):
        soda.reset_stats()
        dest = tmp_path / wire
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="nyc_collisions.pages"):
            backfill(soda, str(dest), "--wire", wire, "--page-size", "900", "--workers", "1")
        # CSV pages land unparsed: the rows as the source wrote them are the landed rows
        assert ("CSV rows passed through unparsed" in caplog.text) == (wire == "auto")
        formats = {
            (r["dataset"], r["format"])
            for r in soda.requests()
            if r["kind"] == "data" and r["params"].get("$select", "").startswith("*")
        }
        if wire == "auto":
            assert formats == {(NAMES["crashes"], "json"), *((NAMES[n], "csv") for n in NAMES)} - {
                (NAMES["crashes"], "csv")
            }
        else:
            assert {f for _, f in formats} == {"json"}
        for name in NAMES:
            exact(soda, str(dest), name, tmp_path / wire, ".csv")
        landed[wire] = sorted(p.read_bytes() for p in dest.rglob("data/*/part-*.csv"))
    assert len(landed["auto"]) >= 3
    assert landed["auto"] == landed["json"]


def test_wire_csv_is_refused_where_it_would_lose_data(soda_ro: FakeSoda, tmp_path: Path) -> None:
    dest = tmp_path / "land"
    res = cli("backfill", "crashes", "--source", soda_ro.url, "--dest", str(dest), "--wire", "csv")
    assert res.code != 0
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.text
    assert "--wire csv" in lines[0]
    assert "location" in lines[0]
    assert not (dest / "crashes" / "manifest.json").exists()
    assert not dest.exists()  # refused before any plan was written


def test_crashes_land_the_same_bytes_with_or_without_the_native_converter(
    soda_ro: FakeSoda,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Crash pages (JSON) go to CSV through the native converter when it is built; without it
    (a machine with no C compiler), or with one built from an older source (a checkout updated
    without a rebuild: its `convert` takes other arguments), they take Arrow's path and land the
    same bytes."""
    import types

    from nyc_collisions import pages

    def older_convert(rows: Any, fields: Any, kinds: Any, skip: Any, id_index: int) -> Any:
        raise AssertionError("called with this version's arguments it is a TypeError")

    def forget() -> None:  # what the module was found to be is kept a process
        pages.native._say_not_built.cache_clear()
        pages.native._built_from_this_source.cache_clear()

    landed: dict[str, list[bytes]] = {}
    said = {"native": "JSON rows converted to CSV natively", "not built": "converter is not built"}
    said["older build"] = "built from an older source"
    try:
        for how in said:
            if how == "not built":
                monkeypatch.setattr(pages.native, "_jsoncsv", None)
            elif how == "older build":
                older = types.SimpleNamespace(convert=older_convert)
                monkeypatch.setattr(pages.native, "_jsoncsv", older)
            forget()
            dest = tmp_path / how
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="nyc_collisions.pages"):
                # one stream, so that the runs cut the same files (ranges split as timing goes)
                args = ("--page-size", "900", "--file-rows", "700", "--workers", "1")
                backfill(soda_ro, str(dest), "crashes", *args)
            assert [text in caplog.text for text in said.values()] == [h == how for h in said]
            exact(soda_ro, str(dest), "crashes", tmp_path / how, ".csv")
            landed[how] = sorted(p.read_bytes() for p in dest.rglob("data/*/part-*.csv"))
    finally:  # the real module back, and found again, for the tests after this one
        monkeypatch.undo()
        forget()
    assert len(landed["native"]) > 1
    assert landed["native"] == landed["not built"] == landed["older build"]


@pytest.mark.parametrize(
    ("name", "how"),
    [("persons", ("--wire", "csv")), ("crashes", ()), ("crashes", ("--format", "parquet"))],
    ids=["csv-rows-passed-through", "json-rows-converted", "rows-as-tables"],
)
def test_the_snapshot_records_the_latest_change_it_holds_without_asking_again(
    soda: FakeSoda,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    how: tuple[str, ...],
) -> None:
    """Counts tell new rows by a snapshot's `ahead_until` (counts.py): no row it holds was
    changed after it. The rows' own latest `:updated_at` is that, exactly, whichever way pages
    land; a row changed after it was landed (its old version landed) does not raise it, and
    the source is not asked for it after the last page."""
    from nyc_collisions.source import DatasetSource
    from tests.test_counts import edit_ids

    dataset_id = NAMES[name]
    pages = DatasetSource.page_params
    edited: list[str] = []

    def page_params(self: DatasetSource, **kw: Any) -> dict[str, str]:
        if kw["after"] is not None and not edited:  # a row already landed changes
            edited.append(kw["after"])
            edit_ids(soda, dataset_id, edited)
        return pages(self, **kw)

    monkeypatch.setattr(DatasetSource, "page_params", page_params)
    dest = tmp_path / "land"
    soda.reset_stats()
    backfill(soda, str(dest), name, "--workers", "1", "--page-size", "500", *how)
    assert edited
    export = tmp_path / "rows.csv"
    res = cli("export", name, "--dest", str(dest), "-o", str(export))
    assert res.code == 0, res.text
    held = max(r["socrata_updated_at"] for r in read_export(export))
    source_latest = max(r[":updated_at"] for r in soda.rows(dataset_id))
    assert held < source_latest  # (the edit's time: its row landed before it)
    snapshot = json.loads((dest / name / "manifest.json").read_text())["batches"][0]
    assert snapshot["info"]["ahead_until"] == held
    asked = [r["params"].get("$select", "") for r in soda.requests()]
    assert len([s for s in asked if "max(" in s]) == 1, asked  # the one beside the count


@pytest.mark.parametrize("older", [False, True], ids=["records-say", "records-of-an-older-version"])
def test_a_resumed_snapshot_records_the_latest_change_its_files_hold(
    tmp_path: Path, older: bool
) -> None:
    """Each part record says the latest `:updated_at` its partition landed up to it, its own
    file's rows included, so a resumed run knows it of the files it did not write; records of
    an older version do not say, and the source is asked at the end instead."""
    import pyarrow.csv as pacsv

    from tests.helpers import paced_crashes
    from tests.test_counts import edit_ids

    with paced_crashes() as srv:
        args = ["crashes", "--source", srv.url, "--page-size", "100", "--file-rows", "100"]
        for budget in (0.6, 1.2, 2.4, 4.8):  # the first that stops it after some files
            dest = tmp_path / f"land-{budget}"
            first = cli("backfill", *args, "--dest", str(dest), "--max-seconds", str(budget))
            assert first.code in (0, 3), first.text
            records = [json.loads(p.read_text()) for p in dest.glob("crashes/runs/*/parts/*")]
            if first.code == 3 and any(r["path"] for r in records):
                break
        else:
            pytest.fail("no budget stopped the backfill after a file")
        read = pacsv.ConvertOptions(column_types={"socrata_updated_at": pa.string()})
        for r in records:
            if r["path"]:
                rows = pacsv.read_csv(dest / r["path"], convert_options=read)
                assert r["latest"] >= pc.max(rows.column("socrata_updated_at")).as_py(), r
        # a row the stopped run landed changes: its landed version stays the older
        landed_id = next(r["last_id"] for r in records if r["path"])
        edit_ids(srv, NAMES["crashes"], [landed_id])
        if older:
            for p in dest.glob("crashes/runs/*/parts/*"):
                doc = json.loads(p.read_text())
                del doc["latest"]
                p.write_text(json.dumps(doc))
        srv.reset_stats()
        second = cli("backfill", *args, "--dest", str(dest))
        assert second.code == 0, second.text
        export = tmp_path / "rows.csv"
        res = cli("export", "crashes", "--dest", str(dest), "-o", str(export))
        assert res.code == 0, res.text
        held = max(r["socrata_updated_at"] for r in read_export(export))
        source_latest = max(r[":updated_at"] for r in srv.rows(NAMES["crashes"]))
        assert held < source_latest
        ahead = json.loads((dest / "crashes/manifest.json").read_text())["batches"][0]["info"]
        assert ahead["ahead_until"] == (source_latest if older else held)
        asked = [r["params"].get("$select", "") for r in srv.requests()]
        assert len([s for s in asked if "max(" in s]) == (1 if older else 0), asked
