"""What the source answers, read: bodies un-gzipped as they arrive, whole JSON documents,
SODA's error messages (both shapes), `Retry-After`. A body that is cut short or broken is a
`BadResponse`, which the client fetches again."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import orjson
from isal import isal_zlib

from ..errors import BadResponse


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asks us to wait: a number or an HTTP date; anything else is ignored
    (the usual backoff applies)."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def clip(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "…"


def error_message(body: bytes) -> str:
    """The server's message from either SODA error shape, or the clipped body."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return clip(body.decode("utf-8", "replace"))
    if isinstance(doc, dict):
        code = doc.get("code") or doc.get("errorCode")
        message = doc.get("message")
        if message:
            return clip(f"{code}: {message}" if code and code not in message else str(message))
    return clip(body.decode("utf-8", "replace"))


def looks_like_html(response: httpx.Response, body: bytes) -> bool:
    content_type = response.headers.get("content-type", "")
    return "html" in content_type or body.lstrip()[:1] == b"<"


_INFLATE_ERROR = cast("type[Exception]", isal_zlib.error)  # its stubs type it as an instance


def inflated(response: httpx.Response) -> Iterator[bytes]:
    """The body as it arrives, un-gzipped with ISA-L (faster than zlib: see bench/README.md);
    other encodings are left to httpx. A gzip stream that stops before its end or does not
    inflate is a `BadResponse` (fetched again)."""
    if response.headers.get("content-encoding", "").strip().lower() != "gzip":
        yield from response.iter_bytes()
        return
    inflate = isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS)
    try:
        for raw in response.iter_raw():
            data = inflate.decompress(raw)
            if data:
                yield data
    except _INFLATE_ERROR as exc:
        raise BadResponse(f"gzip body does not inflate: {exc}") from None
    if not inflate.eof:
        raise BadResponse("gzip body cut short")


def parse_json_document(body: bytes) -> Any:
    """A whole JSON document; a body cut short is a `BadResponse` (and so retried)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if body.lstrip()[:1] == b"<":
            raise BadResponse("the source answered with an HTML page, not JSON") from None
        raise BadResponse(f"body is not complete JSON ({exc}; {len(body)} bytes)") from None
