"""Exactness: compare what a method landed with the server's own rows (`GET /__admin/rows`).

The truth is read once per dataset state: every row's unique key (collision_id for crashes,
unique_id for persons/vehicles) and a sample of whole rows (evenly spaced in `:id` order, plus
the rows an update changed). A landed result is read back the same way, whatever its shape
(our `export` CSV, pandas' `to_csv`, the offset client's CSV, the keyset client's raw JSON pages),
and reported as rows, unique keys, missing keys, duplicated rows, unknown keys and the sampled
rows whose fields differ from the truth.
"""

from __future__ import annotations

import ast
import csv
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .servers import FakeSodaServer

SAMPLE_ROWS = 300
EXAMPLES = 5
# system fields and the names our tool lands them under
_SYSTEM = {
    ":id": "socrata_id",
    ":created_at": "socrata_created_at",
    ":updated_at": "socrata_updated_at",
}
_IGNORED = {":version"}


@dataclass
class Truth:
    dataset_id: str
    key_field: str
    keys: np.ndarray  # sorted, unique
    sample: dict[int, dict[str, Any]]

    @property
    def rows(self) -> int:
        return len(self.keys)


@dataclass
class Landed:
    keys: np.ndarray
    sample: dict[int, dict[str, Any]]


@dataclass
class Exactness:
    rows: int
    unique: int
    missing: int
    duplicated: int
    unknown: int
    sampled: int
    field_errors: int
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return (
            self.missing == 0
            and self.duplicated == 0
            and self.unknown == 0
            and self.field_errors == 0
        )

    def label(self) -> str:
        if self.exact:
            return "yes"
        parts = []
        if self.missing:
            parts.append(f"{self.missing:,} lost")
        if self.duplicated:
            parts.append(f"{self.duplicated:,} dup")
        if self.unknown:
            parts.append(f"{self.unknown:,} unknown")
        if self.field_errors:
            parts.append(f"{self.field_errors}/{self.sampled} rows differ")
        return "no: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "exact": self.exact,
            "rows": self.rows,
            "unique_keys": self.unique,
            "missing": self.missing,
            "duplicated": self.duplicated,
            "unknown": self.unknown,
            "sampled_rows": self.sampled,
            "rows_with_field_errors": self.field_errors,
            "examples": self.examples,
        }


def _key_of(line: bytes, mark: bytes) -> int:
    i = line.find(mark)
    if i < 0:
        raise ValueError(f"no key {mark!r} in {line[:200]!r}")
    start = i + len(mark)
    return int(line[start : line.index(b'"', start)])


def load_truth(
    server: FakeSodaServer, dataset_id: str, key_field: str, extra_keys: Iterable[int] = ()
) -> Truth:
    """Every key of the dataset now, and a sample of whole rows."""
    n = server.count(dataset_id)
    step = max(1, n // SAMPLE_ROWS)
    extra = set(extra_keys)
    mark = f'"{key_field}":"'.encode()
    keys: array[int] = array("q")
    sample: dict[int, dict[str, Any]] = {}
    for i, line in enumerate(server.iter_rows(dataset_id)):
        k = _key_of(line, mark)
        keys.append(k)
        if i % step == 0 or k in extra:
            sample[k] = orjson.loads(line)
    arr = np.frombuffer(keys, dtype=np.int64) if len(keys) else np.zeros(0, np.int64)
    arr = np.sort(arr)
    if len(arr) > 1 and bool((arr[1:] == arr[:-1]).any()):
        raise RuntimeError(f"{dataset_id}: the server's own keys repeat")
    return Truth(dataset_id, key_field, arr, sample)


# -- readers -----------------------------------------------------------------------------------


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f))


def read_csv(path: Path, key_field: str, sample_keys: set[int]) -> Landed:
    """A CSV with a header row (any quoting); unquoted empty cells are nulls."""
    names = _csv_header(path)
    if key_field not in names:
        raise RuntimeError(f"{path}: no {key_field} column (columns: {names[:8]}...)")
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=16 << 20),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    chunks: list[np.ndarray] = []
    sample: dict[int, dict[str, Any]] = {}
    wanted = pa.array(sorted(sample_keys), pa.int64())
    for batch in reader:
        keys = pc.cast(batch.column(key_field), pa.int64())
        chunks.append(keys.to_numpy(zero_copy_only=False))
        if len(wanted):
            picked = batch.filter(pc.is_in(keys, value_set=wanted))
            for row in picked.to_pylist():
                sample[int(row[key_field])] = row
    keys_all = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    return Landed(keys_all.astype(np.int64), sample)


def _iter_json_pages(folder: Path) -> Iterator[list[dict[str, Any]]]:
    for path in sorted(folder.glob("*.json")):
        page = orjson.loads(path.read_bytes())
        if not isinstance(page, list):
            raise RuntimeError(f"{path}: not a JSON array")
        yield page


def read_json_pages(folder: Path, key_field: str, sample_keys: set[int]) -> Landed:
    """A folder of SODA JSON page bodies (the keyset client's copies)."""
    keys: array[int] = array("q")
    sample: dict[int, dict[str, Any]] = {}
    for page in _iter_json_pages(folder):
        for row in page:
            k = int(row[key_field])
            keys.append(k)
            if k in sample_keys:
                sample[k] = row
    arr = np.frombuffer(keys, dtype=np.int64) if len(keys) else np.zeros(0, np.int64)
    return Landed(arr.copy(), sample)


# -- comparison --------------------------------------------------------------------------------


def _norm(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value[:1] == "{":
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            try:
                return ast.literal_eval(value)  # pandas writes a dict as its repr
            except (ValueError, SyntaxError):
                return value
    return value


def _same(truth: Any, landed: Any) -> bool:
    a, b = _norm(truth), _norm(landed)
    if a == b:
        return True
    if isinstance(a, str | int | float) and isinstance(b, str | int | float):
        try:
            return float(a) == float(b)
        except ValueError:
            return False
    return False


def _row_diffs(truth: dict[str, Any], landed: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    diffs: list[tuple[str, Any, Any]] = []
    seen: set[str] = set()
    for name, value in truth.items():
        if name in _IGNORED:
            continue
        column = name
        if name.startswith(":") and name not in landed:
            column = _SYSTEM.get(name, name)
            if column not in landed:
                continue  # this method does not land system fields
        seen.add(column)
        if not _same(value, landed.get(column)):
            diffs.append((name, value, landed.get(column)))
    for column, value in landed.items():
        if column in seen or column in _IGNORED or column in _SYSTEM.values():
            continue
        if _norm(value) is not None:
            diffs.append((column, None, value))
    return diffs


def compare(truth: Truth, landed: Landed) -> Exactness:
    keys = landed.keys
    uniq = np.unique(keys)
    missing = len(np.setdiff1d(truth.keys, uniq, assume_unique=True))
    unknown = len(np.setdiff1d(uniq, truth.keys, assume_unique=True))
    field_errors = 0
    sampled = 0
    examples: list[dict[str, Any]] = []
    for k, row in truth.sample.items():
        got = landed.sample.get(k)
        if got is None:
            continue
        sampled += 1
        diffs = _row_diffs(row, got)
        if diffs:
            field_errors += 1
            if len(examples) < EXAMPLES:
                name, want, have = diffs[0]
                examples.append({"key": k, "field": name, "truth": want, "landed": have})
    return Exactness(
        rows=len(keys),
        unique=len(uniq),
        missing=missing,
        duplicated=len(keys) - len(uniq),
        unknown=unknown,
        sampled=sampled,
        field_errors=field_errors,
        examples=examples,
    )
