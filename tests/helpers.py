"""Shared test helpers: run the CLI, and compare landed data with the fake server's rows."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nyc_collisions.cli import main
from nyc_collisions.reconcile import Reconcile
from tests.fake_soda import FakeSoda, Latency

NAMES = {"crashes": "h9gi-nx95", "persons": "f55k-p6yu", "vehicles": "bm4k-52h4"}
KEYS = {"h9gi-nx95": "collision_id", "f55k-p6yu": "unique_id", "bm4k-52h4": "unique_id"}
SYSTEM = {
    ":id": "socrata_id",
    ":created_at": "socrata_created_at",
    ":updated_at": "socrata_updated_at",
}


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def each_destination_and_format(on_s3: str) -> pytest.MarkDecorator:
    """Each destination once and each format once, `on_s3` on S3 and the other in a folder:
    storage and the file format are separate layers, so two runs find what four would (the
    test takes the `dest` fixture and a `fmt` argument)."""
    other = {"csv": "parquet", "parquet": "csv"}[on_s3]
    return pytest.mark.parametrize(
        ("dest", "fmt"),
        [("s3", on_s3), ("local", other)],
        ids=[f"s3-{on_s3}", f"local-{other}"],
        indirect=["dest"],
    )


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run `nyc-collisions ARGS` in process; returns exit code, stdout and stderr."""
    try:  # stdout and stderr apart: click 8.2's default, mix_stderr=False before
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        runner = CliRunner()
    res = runner.invoke(main, list(args), env=env, catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Result(res.exit_code, res.stdout, res.stderr)


def columns(url: str, dataset_id: str, token: str | None = None) -> list[tuple[str, str]]:
    """(fieldName, dataTypeName) of the dataset in metadata order, then the system fields."""
    headers = {"X-App-Token": token} if token else {}
    meta = httpx.get(f"{url}/api/views/{dataset_id}.json", headers=headers).json()
    cols = sorted(
        (c for c in meta["columns"] if not c["fieldName"].startswith(":")),
        key=lambda c: c["position"],
    )
    return [(c["fieldName"], c["dataTypeName"]) for c in cols] + [
        (":id", "text"),
        (":created_at", "fixed_timestamp"),
        (":updated_at", "fixed_timestamp"),
    ]


def landed(field: str) -> str:
    return SYSTEM.get(field, field)


def source_text(value: Any) -> str | None:
    """What a source value looks like as landed text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, separators=(",", ":"))


def read_export(path: Path) -> list[dict[str, Any]]:
    return read_export_table(path).to_pylist()


def read_export_table(path: Path) -> pa.Table:
    if path.suffix == ".csv":
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=128 << 20),  # rows of up to 64 MiB whole
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
                null_values=[""],
                column_types={n: pa.string() for n in _header(path)},
            ),
        )
    else:
        table = pq.read_table(path)
    return table


def _header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        import csv

        return next(csv.reader(f))


def _normalise(value: Any, dtype: str, typed: bool) -> Any:
    """Compare a source value and a landed one on equal terms."""
    if value is None:
        return None
    if dtype in ("location", "point") or isinstance(value, dict | list):
        return json.loads(value) if isinstance(value, str) else value
    if typed:
        if dtype == "number":
            return float(value)
        if dtype in ("calendar_date", "floating_timestamp", "fixed_timestamp", "date"):
            if hasattr(value, "isoformat"):
                value = value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}"
            return str(value).rstrip("Z")
        if dtype == "checkbox":
            return value if isinstance(value, bool) else value == "true"
    return source_text(value)


def assert_exact(
    source_rows: list[dict[str, Any]],
    landed_rows: list[dict[str, Any]],
    cols: list[tuple[str, str]],
    key: str,
    typed: bool = False,
) -> int:
    """Every source row landed once, field by field; returns the number of rows checked."""
    key_col = landed(key)
    by_key: dict[Any, dict[str, Any]] = {}
    for row in landed_rows:
        k = str(row[key_col])
        assert k not in by_key, f"duplicated key {k}"
        by_key[k] = row
    expected_keys = {str(r[key]) for r in source_rows}
    missing = expected_keys - set(by_key)
    extra = set(by_key) - expected_keys
    assert not missing, f"missing {len(missing)} keys, e.g. {sorted(missing)[:5]}"
    assert not extra, f"extra {len(extra)} keys, e.g. {sorted(extra)[:5]}"
    if landed_rows:
        assert list(landed_rows[0].keys()) == [landed(f) for f, _ in cols]
    for src in source_rows:
        got = by_key[str(src[key])]
        for field, dtype in cols:
            want = _normalise(src.get(field), dtype, typed)
            have = _normalise(got[landed(field)], dtype, typed)
            assert want == have, f"{key}={src[key]} {field}: source {want!r} landed {have!r}"
    return len(source_rows)


def exact(
    srv: Any, dest: str, name: str, tmp_path: Path, suffix: str = ".csv", token: str | None = None
) -> int:
    """Export `name` from `dest` with the CLI and check it equals the server's rows exactly."""
    out = tmp_path / f"export-{name}{suffix}"
    res = cli("export", name, "--dest", dest, "--output", str(out))
    assert res.code == 0, res.text
    dataset_id = NAMES[name]
    return assert_exact(
        srv.rows(dataset_id),
        read_export(out),
        columns(srv.url, dataset_id, token),
        KEYS[dataset_id],
        typed=suffix == ".parquet",
    )


class Context:
    """What Lambda hands the handler: here only the time left matters."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int((self.deadline - time.monotonic()) * 1000)


def invoke(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """The Lambda handler run as a fresh invocation (no app token cached from an earlier one)."""
    from nyc_collisions import aws, lambda_token

    lambda_token._token_cache.clear()
    try:
        return aws.handler(event, context)
    finally:
        lambda_token._token_cache.clear()


def deadline_past_for(names: set[str]) -> type[Reconcile]:
    """A Reconcile already past its deadline for the datasets in `names` (what the Lambda's
    deadline does to a reconcile that does not fit in the invocation)."""

    class Late(Reconcile):
        def __init__(self, client: Any, storage: Any, ds: Any, opts: Any) -> None:
            if ds.name in names:
                opts = dataclasses.replace(opts, deadline=time.monotonic())
            super().__init__(client, storage, ds, opts)

    return Late


def paced_crashes() -> FakeSoda:
    """A fake server of 3,000 crashes (and a few other rows) whose every request takes 0.05 s,
    3 at a time: a run lasts long enough to be stopped midway by a small --max-seconds."""
    latency = Latency(base=0.05, per_row=0.0, per_skipped=0.0, max_concurrent=3, metadata=0.0)
    sizes = {NAMES["crashes"]: 3000, NAMES["persons"]: 10, NAMES["vehicles"]: 10}
    return FakeSoda(sizes=sizes, seed=3, latency=latency)


def stopped_snapshot(
    srv: FakeSoda,
    tmp_path: Path,
    common: list[str],
    change: Callable[[], None],
    before: Callable[[], None] = lambda: None,
) -> Path:
    """A landing with a `backfill --force` over it stopped (as a kill would) after some files
    and before its end: each try lands afresh (`before`, then a backfill), `change`s the source,
    then stops the new snapshot at a longer time budget. Returns the landing's folder."""
    for i, budget in enumerate((0.8, 1.6, 3.2, 6.4)):
        dest = tmp_path / f"land-{budget}"
        if i:
            before()
        res = cli("backfill", *common, "--dest", str(dest))
        assert res.code == 0, res.text
        change()
        first = cli(
            "backfill", *common, "--force", "--dest", str(dest), "--max-seconds", str(budget)
        )
        assert first.code in (0, 3), first.text
        parts = list(dest.glob("*/runs/*/parts/*.json"))
        if first.code == 3 and sum(json.loads(p.read_bytes())["rows"] for p in parts):
            return dest
    raise AssertionError("no budget stopped the backfill after a committed file")
