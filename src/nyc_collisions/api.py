"""The Python API: `fetch` straight from the source (keyset pages until a count finds no rows
left, as the commands page), `read` and `export` what landed."""

from __future__ import annotations

import importlib.util
import operator
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import settings
from .connect import SourceSettings
from .current import iter_current, open_landed
from .datasets import resolve
from .errors import UsageError
from .extract import DEFAULT_PAGE_SIZE
from .pages import parse_page
from .sink.formats import READ_BATCH_ROWS
from .sink.local import LocalStorage
from .sink.storage import DEFAULT_LOCAL_DEST, open_storage
from .socrata import soql
from .socrata.client import SodaClient
from .source import DatasetSource

if TYPE_CHECKING:
    import pandas as pd


PANDAS_MISSING = (
    "nyc-collisions: {name}() returns a pandas DataFrame and pandas is not installed;"
    " install the extra: pip install 'nyc-collisions[pandas]'"
)


def _need_pandas(name: str) -> None:
    """pandas is an extra (the CLI and Lambda never load it): say which one, in one line."""
    if importlib.util.find_spec("pandas") is None:
        raise ImportError(PANDAS_MISSING.format(name=name))


def _dest(dest: str | None) -> str:
    return dest or os.environ.get(settings.DEST) or DEFAULT_LOCAL_DEST


def _client(source: str | None, allow_http: bool) -> SodaClient:
    """A client as the CLI makes one: the same environment variables, checked the same way."""
    return SourceSettings.from_env(source, allow_http=allow_http).client()


def _whole(value: object, name: str, least: int) -> int:
    """`value` as an int (a numpy integer too), at least `least`; else one clear error."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or number < least:
        raise UsageError(f"{name} must be a whole number, at least {least}, not {value!r}")
    return number


def fetch(
    dataset: str,
    where: str | None = None,
    limit: int | None = None,
    *,
    source: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    allow_http: bool = False,
) -> pd.DataFrame:
    """Rows straight from the API as a typed DataFrame (for notebooks).

    `where` is a SoQL condition (`"borough = 'BROOKLYN'"`); `limit` caps the number of rows.
    Pages are keyset pages on `:id`, so nothing is skipped or repeated. `allow_http` allows a
    plain http `source` on another machine (as `--allow-http`).
    """
    _need_pandas("fetch")
    limit = None if limit is None else _whole(limit, "limit", 0)
    page_size = _whole(page_size, "page_size", 1)
    ds = resolve(dataset)
    with _client(source, allow_http) as client:
        src = DatasetSource(client, ds)
        schema = src.schema()
        tables: list[pa.Table] = []
        after: str | None = None
        got = asked = 0

        def page() -> int:
            nonlocal after, got, asked
            n = asked = page_size if limit is None else min(page_size, limit - got)
            params = soql.page_params(after=after, upper=None, limit=n, where=where)
            table = client.fetch(src.path, params, lambda b: parse_page(b, schema), most=None)
            if table.num_rows:
                tables.append(table)
                got += table.num_rows
                after = table.column("socrata_id")[-1].as_py()
            return int(table.num_rows)

        src.page_until_empty(
            page,
            lambda: soql.rows_in(where, after),
            asked=lambda: asked,
            stopped=lambda: limit is not None and got >= limit,
        )
        text = pa.concat_tables(tables) if tables else schema.text_schema().empty_table()
        frame: pd.DataFrame = schema.to_typed(text).to_pandas()
        return frame


def read(dataset: str, dest: str | None = None) -> pd.DataFrame:
    """The landed current state of a dataset as a typed DataFrame."""
    _need_pandas("read")
    landed = open_landed(open_storage(_dest(dest)), resolve(dataset))
    tables = [landed.schema.to_typed(t) for t in iter_current(landed)]
    table = pa.concat_tables(tables) if tables else landed.schema.typed_schema().empty_table()
    frame: pd.DataFrame = table.to_pandas()
    return frame


def export(dataset: str, output: str | Path, dest: str | None = None) -> int:
    """Write the landed current state as one `.csv` or `.parquet` file; returns the row count."""
    if "://" in str(output):
        raise UsageError(
            f"--output {str(output)!r}: export writes a local file; write it here, then copy "
            "it (aws s3 cp)"
        )
    out = settings.user_path(output, "--output")
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise UsageError(f"--output {str(output)!r}: the name must end in .csv or .parquet")
    landed = open_landed(open_storage(_dest(dest)), resolve(dataset))
    target = LocalStorage(out.parent.resolve())
    writer = target.open_writer(out.name)
    rows = 0
    try:
        if suffix == ".csv":
            csv = pacsv.CSVWriter(writer, landed.schema.text_schema())
            for table in iter_current(landed):
                csv.write_table(table)
                rows += table.num_rows
            csv.close()
        else:
            pqw = pq.ParquetWriter(writer, landed.schema.typed_schema(), compression="zstd")
            for table in iter_current(landed):
                pqw.write_table(landed.schema.to_typed(table), row_group_size=READ_BATCH_ROWS * 4)
                rows += table.num_rows
            pqw.close()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return rows
