"""JSON rows straight to the landed CSV's rows in native code (`_jsoncsv.c`), for a page stream
whose rows go to a CSV file; a piece it declines takes the table path (`json_pages`)."""

from __future__ import annotations

import functools
import logging

import pyarrow as pa

from ..rows import CsvRows
from ..schema import Schema
from .stream import IGNORED_SYSTEM

try:
    from .. import _jsoncsv
except ImportError:  # installed without a C compiler: Arrow converts every JSON page
    _jsoncsv = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# Types whose JSON value is a string (SODA 2.1 writes numbers as strings), landed as sent.
_NATIVE_TEXT_TYPES = frozenset(
    {"text", "number", "calendar_date", "floating_timestamp", "fixed_timestamp"}
)


@functools.cache
def _say_not_built() -> None:
    logger.info("the native JSON -> CSV converter is not built: JSON pages take Arrow's path")


@functools.cache
def _built_from_this_source() -> bool:
    """Whether the module takes this version's arguments (a checkout updated without a rebuild
    keeps the old one)."""
    assert _jsoncsv is not None
    try:
        _jsoncsv.convert(b"", (":id",), b"\x00", (), 0, -1)
    except TypeError:
        logger.warning(
            "the native JSON -> CSV converter was built from an older source (`pip install .` "
            "rebuilds it): JSON pages take Arrow's path"
        )
        return False
    return True


def _usable() -> bool:
    if _jsoncsv is None:
        _say_not_built()
        return False
    return _built_from_this_source()


class JsonRowsToCsv:
    """JSON rows straight to the landed CSV's rows, in native code (`_jsoncsv.c`), for a
    `PageStream` whose rows go to a CSV file (`emit_rows`).

    It writes the bytes that the table path (`parse_rows_fast`, then Arrow's CSV writer) writes,
    for the rows it accepts: objects whose values are strings or null, and legacy locations whose
    members are strings. Anything else (another value type, a field the metadata does not name,
    a key given twice, a row without `:id`, invalid UTF-8 or JSON) makes it decline the piece,
    which then takes the table path, where the errors are raised. It costs a fraction of the
    table path and the CSV writer (`python -m bench.parsers`).
    """

    def __init__(self, schema: Schema) -> None:
        self.fields = tuple(schema.field_names)
        self.kinds = bytes(c.data_type == "location" for c in schema.columns)
        self.skip = tuple(sorted(IGNORED_SYSTEM))
        self.id_index = self.fields.index(":id")
        has_updated = ":updated_at" in self.fields
        self.updated_index = self.fields.index(":updated_at") if has_updated else -1

    @classmethod
    def for_schema(cls, schema: Schema) -> JsonRowsToCsv | None:
        """A converter for the schema, or None when the native module is not built or a column
        has a type it does not convert (checkboxes, points, urls...)."""
        if not _usable():
            return None
        if not all(
            c.data_type == "location" or c.data_type in _NATIVE_TEXT_TYPES for c in schema.columns
        ):
            return None
        return cls(schema)

    def __call__(self, rows: memoryview | bytes) -> CsvRows | None:
        """Rows separated by commas (a page without its brackets) -> the landed CSV rows, or
        None when the piece needs the table path."""
        assert _jsoncsv is not None
        done = _jsoncsv.convert(
            rows, self.fields, self.kinds, self.skip, self.id_index, self.updated_index
        )
        if done is None:
            logger.debug("JSON rows left to Arrow: the native converter declined them")
            return None
        data, num_rows, last_id, latest = done
        logger.debug("%d JSON rows converted to CSV natively", num_rows)
        last = pa.Table.from_arrays([pa.array([last_id], pa.string())], names=["socrata_id"])
        return CsvRows(memoryview(data), num_rows, last, latest)
