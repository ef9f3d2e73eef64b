"""What the source answers, read: bodies un-gzipped as they arrive, whole JSON documents (the
metadata, an aggregate's one row, a probe's row), SODA's error messages (both shapes) and what
an error status means (`classify`), `Retry-After`. A body that is cut short or broken is a
`BadResponse`, which the client fetches again."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, cast

import httpx
import orjson
from isal import isal_zlib

from ..errors import BadResponse, DatasetNotFound, InvalidAppToken, SourceRejected
from ..redact import redact, redact_bytes


class Retryable(Exception):
    """A failure worth another attempt; `cause` names it for stats and the final message."""

    def __init__(self, cause: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.cause = cause
        self.retry_after = retry_after


def classify(
    response: httpx.Response, body: bytes, shown: str, where: str, token: str | None
) -> NoReturn:
    """Turn a response that is not a 200 JSON body into the right exception (`shown`: the
    request's URL as said in errors, `where`: its path alone); the app token masked in what the
    source says (a source or a proxy in front of it may echo the request's headers)."""
    status = response.status_code
    if status == 200:
        raise Retryable("html", "the source answered with an HTML page, not JSON")
    body = redact_bytes(body, token)  # before the message is clipped
    message = error_message(body, token)
    if status == 202 or status == 429 or status >= 500:
        if looks_like_html(response, body):
            message = "an HTML error page"
        raise Retryable(str(status), f"HTTP {status}: {message}", retry_after(response))
    if status == 404:
        raise DatasetNotFound(f"{where}: HTTP 404 not found: {message}")
    if status in (401, 403):
        if "permission_denied" in message or "app_token" in message.lower():
            raise InvalidAppToken(f"{where}: HTTP {status}: {message} (check SOCRATA_APP_TOKEN)")
        if any(w in message.lower() for w in ("throttl", "rate limit", "too many")):
            raise Retryable("403 throttle", f"HTTP {status}: {message}", retry_after(response))
    raise SourceRejected(f"{shown}: HTTP {status}: {message}")


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
    """What the source said, fit for one line of a terminal: whitespace collapsed, control
    characters (escape sequences that would move the cursor or retitle the window) as `?`, at
    most `n` characters; the app token masked before it is cut (a part of it would show)."""
    text = " ".join(redact(text).split()).translate(CONTROLS)
    return text if len(text) <= n else text[:n] + "…"


CONTROLS = {c: "?" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}  # for str.translate


def error_message(body: bytes, token: str | None = None) -> str:
    """The server's message from either SODA error shape, or the clipped body; the app token
    masked once the JSON is decoded too (its escapes may have spelled it otherwise)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return clip(redact(body.decode("utf-8", "replace"), token))
    if isinstance(doc, dict):
        code = doc.get("code") or doc.get("errorCode")
        message = doc.get("message")
        if message:
            text = f"{code}: {message}" if code and code not in message else str(message)
            return clip(redact(text, token))
    return clip(redact(body.decode("utf-8", "replace"), token))


def looks_like_html(response: httpx.Response, body: bytes) -> bool:
    content_type = response.headers.get("content-type", "")
    return "html" in content_type or body.lstrip()[:1] == b"<"


INFLATE_CHUNK = 4 << 20  # bytes inflated at a time: a few KiB of gzip can inflate to MiBs
MAX_DOCUMENT_BYTES = 64 << 20  # a whole document's body (metadata, an aggregate) at most
MAX_ERROR_BYTES = 1 << 20  # an error's body read, at most: only its start is shown


def whole(chunks: Iterator[bytes], most: int | None = MAX_DOCUMENT_BYTES) -> bytes:
    """A whole body, refused past `most` bytes (None: no bound) rather than held."""
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if most is not None and len(body) > most:
            raise BadResponse(f"answer of more than {most >> 20} MiB; refused")
    return bytes(body)


def error_body(response: httpx.Response) -> bytes:
    """The start of an error's body (the message is in it), not the whole of a long one."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= MAX_ERROR_BYTES:
            break
    return bytes(body[:MAX_ERROR_BYTES])


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
            data = inflate.decompress(raw, INFLATE_CHUNK)
            if data:
                yield data
            while inflate.unconsumed_tail:  # a chunk that inflates to more (a gzip bomb)
                yield inflate.decompress(inflate.unconsumed_tail, INFLATE_CHUNK)
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


def metadata_document(body: bytes) -> dict[str, Any]:
    """A dataset's metadata; one without columns is a `BadResponse` (fetched again, like a
    body cut short)."""
    doc = parse_json_document(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("columns"), list):
        raise BadResponse(f"metadata without columns: {clip(str(doc), 80)}")
    return doc


def one_row(dataset_id: str) -> Callable[[bytes], dict[str, Any]]:
    """The parser of an aggregate's answer: always one row (`[]` from a body cut short is a
    `BadResponse`, fetched again rather than read as zero)."""

    def parse(body: bytes) -> dict[str, Any]:
        rows = parse_json_document(body)
        if not isinstance(rows, list) or len(rows) != 1 or not isinstance(rows[0], dict):
            raise BadResponse(f"{dataset_id}: unexpected aggregate answer {clip(str(rows))}")
        return rows[0]

    return parse


def at_most_one_row(dataset_id: str) -> Callable[[bytes], dict[str, Any] | None]:
    """The parser of a `$limit=1` query's answer: its row, or None."""

    def parse(body: bytes) -> dict[str, Any] | None:
        rows = parse_json_document(body)
        if (
            not isinstance(rows, list)
            or len(rows) > 1
            or not all(isinstance(r, dict) for r in rows)
        ):
            raise BadResponse(f"{dataset_id}: unexpected answer {clip(str(rows))}")
        return rows[0] if rows else None

    return parse
