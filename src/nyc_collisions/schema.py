"""A dataset's columns, from its metadata (`/api/views/{id}.json`), and their Arrow types.

Rows travel as *text tables*: one Arrow string column per field, holding the source's value as
text exactly as sent (numbers as SODA writes them, objects such as `location` as compact JSON,
booleans as `true`/`false`). CSV is written from the text table as is; Parquet casts it to the
types the metadata names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .datasets import SYSTEM_FIELDS, Dataset, landed_name
from .errors import BadResponse, SchemaError


def csv_text_options(
    names: Sequence[str], include: Sequence[str] | None = None
) -> pacsv.ConvertOptions:
    """How CSV written the landed way (and Socrata's way) reads back as a text table: every
    column text, an empty unquoted field null, `""` an empty string; only `include`, if given."""
    return pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
        include_columns=list(include or []),
    )


# Socrata's dataTypeName -> how the column is typed in Parquet.
_TIMESTAMP_TYPES = {"calendar_date", "floating_timestamp"}
_UTC_TYPES = {"date", "fixed_timestamp"}
_OBJECT_TYPES = {
    "location",
    "point",
    "multipoint",
    "line",
    "multiline",
    "polygon",
    "multipolygon",
    "url",
    "phone",
    "document",
    "photo",
    "json",
}


# dataTypeNames whose `/resource/{id}.csv` cell carries the same text as the JSON value, read
# from Socrata's server (soda-fountain `CsvColumnRep` against `JsonColumnRep.forClientType`):
# text, timestamps, row ids and booleans (`true`/`false`) are written alike; numbers are alike but
# for `BigDecimal.toString` in CSV against the plain form in JSON, which `pages.plain_numbers`
# undoes. Every other type is written differently in CSV: a legacy `location` loses its
# `human_address` JSON and its null members, points become WKT, urls `desc (url)`.
CSV_EXACT_TYPES = frozenset(
    {"text", "number", "calendar_date", "floating_timestamp", "fixed_timestamp", "checkbox"}
)


@dataclass(frozen=True)
class Column:
    field_name: str
    data_type: str

    @property
    def name(self) -> str:
        """The column's name in landed files."""
        return landed_name(self.field_name)

    @property
    def is_object(self) -> bool:
        return self.data_type in _OBJECT_TYPES


def _refuse_repeated_names(dataset: Dataset, columns: list[Column]) -> None:
    """A row has one value a field and a landed file one column a name: metadata that names a
    field twice, or two fields that land under one name (`socrata_id` beside `:id`), is refused
    (the two paths would land such a column differently)."""
    fields: dict[str, list[str]] = {}
    for column in columns:
        fields.setdefault(column.name, []).append(column.field_name)
    for name, named in fields.items():
        if len(named) > 1:
            said = (
                f"the field {named[0]!r} more than once"
                if len(set(named)) == 1
                else f"fields {' and '.join(map(repr, named))}, which both land as {name!r}"
            )
            raise SchemaError(f"{dataset.dataset_id}: the metadata names {said}")


@dataclass(frozen=True)
class Schema:
    """The columns of a dataset in metadata order, followed by the system fields."""

    columns: tuple[Column, ...]
    integer_fields: frozenset[str] = frozenset()
    # landed as text whatever their type (a key the user chose: it must read back as sent)
    text_fields: frozenset[str] = frozenset()

    @classmethod
    def from_metadata(cls, dataset: Dataset, metadata: dict[str, Any]) -> Schema:
        try:
            cols = sorted(
                (c for c in metadata["columns"] if not str(c["fieldName"]).startswith(":")),
                key=lambda c: int(c.get("position", 0)),
            )
            columns = [Column(str(c["fieldName"]), str(c["dataTypeName"])) for c in cols]
        except (KeyError, TypeError, ValueError) as exc:
            raise BadResponse(f"{dataset.dataset_id}: metadata columns unreadable: {exc}") from exc
        system = {":id": "text", ":created_at": "fixed_timestamp", ":updated_at": "fixed_timestamp"}
        columns += [Column(f, system[f]) for f in SYSTEM_FIELDS]
        _refuse_repeated_names(dataset, columns)
        names = [c.field_name for c in columns]
        if dataset.key not in names:
            raise SchemaError(
                f"{dataset.dataset_id}: key {dataset.key!r} is not a column "
                f"(columns: {', '.join(names[:40])}); if the source dropped it, what landed "
                "stays readable, and the dataset lands again with another --key in another --dest"
            )
        key_type = columns[names.index(dataset.key)].data_type
        if key_type in _OBJECT_TYPES:
            # the source can neither count its empty values nor group by it (the key's checks)
            raise SchemaError(
                f"{dataset.dataset_id}: key {dataset.key!r} is a {key_type} column; a key must "
                "be a text, number, date or checkbox column: land it with another --key"
            )
        return cls(tuple(columns), dataset.integer_fields, dataset.text_fields)

    @property
    def field_names(self) -> list[str]:
        return [c.field_name for c in self.columns]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def csv_exact(self) -> bool:
        """Whether the source's CSV carries every column exactly as its JSON does."""
        return all(c.data_type in CSV_EXACT_TYPES for c in self.columns)

    def text_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, pa.string()) for c in self.columns])

    def arrow_type(self, column: Column) -> pa.DataType:
        t = column.data_type
        if column.field_name == ":id" or column.field_name in self.text_fields:
            return pa.string()
        if t == "number":
            return pa.int64() if column.field_name in self.integer_fields else pa.float64()
        if t in _TIMESTAMP_TYPES:
            return pa.timestamp("ms")
        if t in _UTC_TYPES:
            return pa.timestamp("ms", tz="UTC")
        if t == "checkbox":
            return pa.bool_()
        return pa.string()

    def typed_schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, self.arrow_type(c)) for c in self.columns])

    def to_typed(self, table: pa.Table) -> pa.Table:
        """Cast a text table to the metadata's types (for Parquet); a misfit value fails."""
        arrays = []
        for column, array in zip(self.columns, table.columns, strict=True):
            target = self.arrow_type(column)
            if target == pa.string():
                arrays.append(array)
                continue
            try:
                if pa.types.is_timestamp(target):
                    # SODA writes `...T00:00:00.000` (floating) and `...Z` (fixed): both ISO 8601.
                    text = pc.replace_substring_regex(array, pattern="Z$", replacement="")
                    arrays.append(pc.cast(text, pa.timestamp("ms")).cast(target))
                else:
                    arrays.append(pc.cast(array, target))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(
                    f"column {column.field_name!r} ({column.data_type}) holds a value that is "
                    f"not {target}, the type Parquet and the table give it ({exc}); CSV keeps "
                    "every value as the source wrote it (land with --format csv and no --table, "
                    "export to .csv)"
                ) from exc
        return pa.Table.from_arrays(arrays, schema=self.typed_schema())

    def to_text(self, table: pa.Table) -> pa.Table:
        """The inverse of `to_typed`: typed Parquet columns back to SODA's text."""
        arrays = []
        for column, array in zip(self.columns, table.columns, strict=True):
            target = self.arrow_type(column)
            if target == pa.string():
                # (a key landed by an earlier version as a number reads back as its text)
                arrays.append(array if array.type == pa.string() else pc.cast(array, pa.string()))
            elif pa.types.is_timestamp(target):
                # %S carries the milliseconds for ms timestamps: `2022-07-03T00:00:00.000`.
                text = pc.strftime(array, format="%Y-%m-%dT%H:%M:%S")
                arrays.append(pc.binary_join_element_wise(text, "Z", "") if target.tz else text)
            elif pa.types.is_boolean(target):
                arrays.append(pc.if_else(array, "true", "false"))
            else:
                arrays.append(pc.cast(array, pa.string()))
        return pa.Table.from_arrays(arrays, schema=self.text_schema())
