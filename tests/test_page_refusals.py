"""Pages that are not JSON are refused by the streamed paths as by the reference parser (orjson,
`parse_page_plain`), however the body arrives: an empty element between separators, control bytes
that are not JSON's whitespace."""

from __future__ import annotations

import io

import orjson
import pytest

from nyc_collisions import pages
from nyc_collisions.datasets import KNOWN
from nyc_collisions.errors import BadResponse
from nyc_collisions.pages import CsvRows, PageStream, parse_page, parse_page_plain
from nyc_collisions.schema import Schema
from nyc_collisions.sink.formats import CsvEncoder

META = {
    "columns": [
        {"fieldName": "borough", "dataTypeName": "text", "position": 1},
        {"fieldName": "location", "dataTypeName": "location", "position": 2},
        {"fieldName": "collision_id", "dataTypeName": "number", "position": 3},
    ]
}


def schema() -> Schema:
    return Schema.from_metadata(KNOWN["crashes"], META)


def landed(body: bytes, native: bool, chunks: list[int]) -> tuple[bytes, int]:
    """A JSON page through a `PageStream`, fed in chunks of these sizes (the rest in one)."""
    out = io.BytesIO()
    encoder = CsvEncoder(out, schema())

    def emit_rows(rows: CsvRows) -> None:
        encoder.write_rows(rows.data)

    stream = PageStream(schema(), encoder.write, emit_rows if native else None)
    at = 0
    for size in [*chunks, len(body)]:
        stream.feed(body[at : at + size])
        at += size
    n = stream.finish()
    encoder.close()
    return out.getvalue(), n


def row(i: int, pad: int = 0) -> bytes:
    return orjson.dumps({"borough": "B" * pad, ":id": f"row-{i}"})


@pytest.mark.parametrize("native", [True, False])
def test_a_page_with_a_leading_elision_is_refused(native: bool) -> None:
    """`[ \\n,{..}]` is not JSON, also when the blank before the first `\\n,` is cut off as a
    piece of its own (a piece's worth has arrived)."""
    limit = pages.stream.NATIVE_PIECE_BYTES if native else pages.stream.PIECE_BYTES
    body = b"[ \n," + row(1, pad=limit) + b"\n]"
    with pytest.raises(BadResponse):
        parse_page_plain(body, schema())
    with pytest.raises(BadResponse):
        landed(body, native, [])


@pytest.mark.parametrize("native", [True, False])
def test_an_elision_mid_page_is_refused_however_the_body_arrives(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`{A}\\n, \\n,{B}`, in one chunk and cut by the network just after the first `\\n,`
    (the blank then a piece of its own)."""
    monkeypatch.setattr(pages.stream, "PIECE_BYTES", 64)
    monkeypatch.setattr(pages.stream, "NATIVE_PIECE_BYTES", 64)
    first, second = row(1, pad=80), row(2, pad=80)
    body = b"[" + first + b"\n, \n," + second + b"\n]"
    with pytest.raises(BadResponse):
        parse_page_plain(body, schema())
    with pytest.raises(BadResponse):
        landed(body, native, [])  # refused, as the reference
    with pytest.raises(BadResponse):
        landed(body, native, [1 + len(first) + 3])  # `[{A}\n, ` then the rest


@pytest.mark.parametrize("body", [b"[\x00]", b"[\x01\x1f]", b"[\x0b]"])
def test_control_bytes_are_not_an_empty_page(body: bytes) -> None:
    """Control bytes in brackets are not JSON, and not an empty page."""
    with pytest.raises(BadResponse):
        parse_page_plain(body, schema())
    with pytest.raises(BadResponse):
        parse_page(body, schema())
    for native in (True, False):
        with pytest.raises(BadResponse):
            landed(body, native, [])
