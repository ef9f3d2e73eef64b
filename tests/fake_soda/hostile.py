"""Hostile text: values real Socrata text carries that break naive CSV handling (the
`hostile_text` knob).

With the knob, about one row in twenty gets one to three of its text columns (or the address in
a location's `human_address`) set to a value from `VALUES`: newlines, `\\r\\n` and lone `\\r`,
quotes, commas, backslashes, tabs, non-ASCII and emoji, leading and trailing spaces, the empty
string, words pandas takes for NA, and values of several KB with many lines. Rows are chosen and
filled from their own generator, so the same seed gives the same rows, and the rest of the data
is what it is without the knob.
"""

from __future__ import annotations

import json

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from .schema import LOCATION, TEXT, Schema

ROW_SHARE = 0.05  # rows that get hostile values


def _long(lines: int, line: str, sep: str) -> str:
    return sep.join(line.format(i=i) for i in range(lines))


SHORT = (
    "line one\nline two",
    "windows\r\nline break",
    "old mac\rline break",
    "\n",
    "\r\n",
    "ends in a newline\n",
    "\r\nstarts with a break",
    'say "hello", then "bye"',
    '"',
    '""',
    '"quoted whole"',
    '"\n"',
    "a,b,c",
    ",",
    ",\n,",
    "back\\slash \\n is not a newline \\",
    "\\",
    '\\"',
    "tab\there\t",
    "\t",
    "  leading and trailing spaces  ",
    " ",
    "",
    "NA",
    "N/A",
    "null",
    "NaN",
    "#N/A",
    "None",
    "Ñandú, CAFÉ — naïve façade, 東京, Ελληνικά, עברית",
    "emoji 🚗💥🚑 and a flag 🇺🇸",
    "\u2028line separator\u2029paragraph separator\u0085next line",
    '=HYPERLINK("x")',
    "0012",
)
LONG = (
    _long(40, 'Vehicle {i} was going north on "BROADWAY", struck a parked car.', "\r\n"),
    _long(160, '{i},\t"quoted, with comma"\\ é 🚗', "\n"),
    _long(300, '  statement line {i}; witness said: "it\'s fine"  ', "\n") + "\n",
)
VALUES = SHORT + LONG
# The long values are rarer than each short one, but come often enough to be in every file.
_WEIGHTS = np.array([1.0] * len(SHORT) + [0.6] * len(LONG))
_WEIGHTS /= _WEIGHTS.sum()


def text_fields(schema: Schema) -> list[str]:
    """The fields that take hostile values: text columns, and the address of a location."""
    return [c.field for c in schema.columns if c.soda_type in (TEXT, LOCATION)]


def rows(
    schema: Schema, inners: pa.Array, rng: np.random.Generator, share: float = ROW_SHARE
) -> pa.Array:
    """The inner JSON of generated rows with hostile values put in the text columns of about
    `share` of them."""
    n = len(inners)
    fields = text_fields(schema)
    chosen = np.flatnonzero(rng.random(n) < share)
    if not len(chosen) or not fields:
        return inners
    picks = _picks(len(chosen), len(fields), rng)
    replacements = [
        _put(schema, orjson.loads("{" + inner + "}"), fields, pick)
        for inner, pick in zip(inners.take(pa.array(chosen)).to_pylist(), picks, strict=True)
    ]
    mask = np.zeros(n, bool)
    mask[chosen] = True
    return pc.replace_with_mask(inners, pa.array(mask), pa.array(replacements, pa.string()))


def put(schema: Schema, row: dict[str, object], fields: list[str], rng: np.random.Generator) -> str:
    """The row as inner JSON with hostile values in 1-3 of `fields` (its text columns)."""
    return _put(schema, row, fields, _picks(1, len(fields), rng)[0])


def _picks(m: int, n_fields: int, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
    """For each of m rows, 1-3 distinct (field index, value index) pairs (drawn in bulk: a
    generator call per row would cost more than the rest of the generation)."""
    counts = np.minimum(rng.integers(1, 4, m), n_fields)
    fields = rng.random((m, n_fields)).argsort(axis=1)[:, :3]
    values = rng.choice(len(VALUES), size=(m, 3), p=_WEIGHTS)
    return [
        list(zip(f[:c], v[:c], strict=True))
        for f, v, c in zip(fields.tolist(), values.tolist(), counts.tolist(), strict=True)
    ]


def _put(
    schema: Schema, row: dict[str, object], fields: list[str], pick: list[tuple[int, int]]
) -> str:
    row = dict(row)
    locations = {c.field for c in schema.columns if c.soda_type == LOCATION}
    for f, v in pick:
        field = fields[f]
        location = row.get(field)
        if isinstance(location, dict):
            # human_address is JSON text itself, written as Socrata writes it
            address = {"address": VALUES[v], "city": "", "state": "", "zip": ""}
            row[field] = {**location, "human_address": json.dumps(address, ensure_ascii=False)}
        elif field not in locations:  # a null location stays null
            row[field] = VALUES[v]
    ordered = {f: row[f] for f in schema.fields if row.get(f) is not None}
    return orjson.dumps(ordered)[1:-1].decode()
