"""The Python API: fetch straight from the source, read and export what landed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import nyc_collisions
from nyc_collisions.errors import UsageError
from tests.fake_soda import FakeSoda
from tests.helpers import cli


def test_fetch_is_typed_and_pages_by_keyset(soda_ro: FakeSoda) -> None:
    df = nyc_collisions.fetch("crashes", source=soda_ro.url, page_size=300)
    rows = soda_ro.rows("h9gi-nx95")
    assert len(df) == len(rows)
    assert df["collision_id"].is_unique
    assert str(df["collision_id"].dtype) == "int64"
    assert str(df["crash_date"].dtype).startswith("datetime64")
    assert df.columns[-3:].tolist() == ["socrata_id", "socrata_created_at", "socrata_updated_at"]


def test_fetch_where_and_limit(soda_ro: FakeSoda) -> None:
    df = nyc_collisions.fetch(
        "crashes", where="borough = 'QUEENS'", limit=50, source=soda_ro.url, page_size=20
    )
    assert len(df) == 50
    assert set(df["borough"]) == {"QUEENS"}
    with pytest.raises(nyc_collisions.UsageError):
        nyc_collisions.fetch("crashes", limit=-1, source=soda_ro.url)


def test_fetch_ends_at_an_empty_page_only_when_a_count_agrees(soda: FakeSoda) -> None:
    # the second page comes back well formed but empty, as a body cut short can: rows follow it
    soda.add_fault("truncate_rows", match=":id >", after_rows=0)
    df = nyc_collisions.fetch("crashes", source=soda.url, page_size=300)
    assert soda.stats()["faults"]["truncate_rows"] == 1
    assert len(df) == len(soda.rows("h9gi-nx95"))
    assert df["collision_id"].is_unique


def test_read_and_export_what_landed(soda_ro: FakeSoda, tmp_path: Path) -> None:
    dest = str(tmp_path / "land")
    assert cli("backfill", "vehicles", "--source", soda_ro.url, "--dest", dest).code == 0
    df = nyc_collisions.read("vehicles", dest=dest)
    assert len(df) == len(soda_ro.rows("bm4k-52h4"))
    out = tmp_path / "v.parquet"
    assert nyc_collisions.export("vehicles", out, dest=dest) == len(df)
    back = pd.read_parquet(out)
    assert back["unique_id"].tolist() == df["unique_id"].tolist()
    with pytest.raises(nyc_collisions.NothingLanded):
        nyc_collisions.read("crashes", dest=dest)


def test_any_dataset_id_with_key(soda_ro: FakeSoda, tmp_path: Path) -> None:
    dest = str(tmp_path / "land")
    res = cli("backfill", "test-0001", "--source", soda_ro.url, "--dest", dest)
    assert res.code == 0, res.text
    df = nyc_collisions.read("test-0001", dest=dest)
    assert len(df) == len(soda_ro.rows("test-0001"))
    assert df["socrata_id"].is_unique


def test_every_command_has_help_with_an_example_to_copy_whole() -> None:
    """The example is one line however narrow the terminal: rewrapped, the S3 URL of the
    backfill's and the update's was cut at its hyphen, and pasted so."""
    from nyc_collisions.cli import main

    for name in main.list_commands(None):  # type: ignore[arg-type]
        command = main.get_command(None, name)  # type: ignore[arg-type]
        assert command is not None
        assert command.help is not None
        (example,) = [ln.strip() for ln in command.help.splitlines() if "Example:" in ln]
        assert example.startswith("Example: nyc-collisions " + name), name
        res = cli(name, "--help", env={"COLUMNS": "60"})
        assert res.code == 0
        assert example in [ln.strip() for ln in res.out.splitlines()], res.out


@pytest.mark.parametrize(
    ("kw", "what"),
    [({"page_size": 0}, "page_size"), ({"limit": "5"}, "limit"), ({"limit": -1}, "limit")],
)
def test_fetch_refuses_bad_arguments_at_once(
    soda_ro: FakeSoda, kw: dict[str, Any], what: str
) -> None:
    """One clear error before any request (page_size 0 asked for empty pages until the retries
    gave up, and blamed the source)."""
    with pytest.raises(UsageError, match=what):
        nyc_collisions.fetch("crashes", source=soda_ro.url, **kw)


def test_fetch_takes_a_numpy_integer(soda_ro: FakeSoda) -> None:
    """`df["n"].sum()` is a numpy integer, not a Python int: a whole number all the same."""
    import numpy as np

    df = nyc_collisions.fetch("crashes", source=soda_ro.url, limit=np.int64(5))
    assert len(df) == 5


def test_fetch_takes_pages_of_any_size_asked() -> None:
    """A page of 100,000 crash rows (about 90 MiB of JSON) is what `page_size` asked for: it is
    not refused as a document too long to be metadata."""
    rows = 100_000
    with FakeSoda(sizes={"h9gi-nx95": rows}, seed=3) as srv:
        df = nyc_collisions.fetch("crashes", source=srv.url, page_size=rows)
        assert len(df) == rows
        assert df["socrata_id"].is_unique
