"""SODA pages -> rows to land: JSON pages (`json_pages`), CSV pages (`csv_pages`) and the
native JSON -> CSV bridge (`native`), parsed a few MiB of whole rows at a time as they stream in
(`stream`). A page that is not whole or not what SODA sends is a `BadResponse` (fetched again),
never a crash; a field the metadata does not name is a `SchemaError`.
"""

from __future__ import annotations

from ..rows import CsvRows
from . import csv_pages, json_pages, native, stream
from .csv_pages import CsvPageStream, plain_numbers
from .json_pages import (
    LOCATION_MEMBERS,
    PageStream,
    parse_page,
    parse_page_fast,
    parse_page_plain,
    parse_rows_fast,
)
from .native import JsonRowsToCsv

__all__ = [
    "LOCATION_MEMBERS",
    "CsvPageStream",
    "CsvRows",
    "JsonRowsToCsv",
    "PageStream",
    "csv_pages",
    "json_pages",
    "native",
    "parse_page",
    "parse_page_fast",
    "parse_page_plain",
    "parse_rows_fast",
    "plain_numbers",
    "stream",
]
