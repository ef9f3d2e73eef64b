"""What flows from the page parsers to the landed files besides text tables: rows already in
the landed CSV's form, which a CSV file writes as they are."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class CsvRows:
    """Whole rows already in the landed CSV's columns, order and convention: a CSV page's rows
    passed through (see `CsvPageStream`) or JSON rows converted natively (see `JsonRowsToCsv`).
    A file writes them as they are."""

    data: memoryview
    num_rows: int
    last: pa.Table  # the last row's `socrata_id` (the only column read)
    latest: str = ""  # the latest `:updated_at` among them ("" when none has one)

    @property
    def last_id(self) -> str:
        return str(self.last.column(0)[0].as_py())
