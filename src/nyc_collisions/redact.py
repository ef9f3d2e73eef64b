"""Secrets out of text: the app token in every form a message may carry it, and the user and
password of any URL (an S3 endpoint's, a proxy's), before anything is shown or logged."""

from __future__ import annotations

import html
import re
from functools import lru_cache
from typing import AnyStr
from urllib.parse import quote, quote_plus

MASK = "***"

# scheme://user:password@ -- what botocore and httpx quote of an endpoint or a proxy (to the
# last @ before the host: a password may hold @ and ')
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s\"<>]*@")
_KNOWN: dict[str, int] = {}  # the tokens clients of this process send, and how many send each


def remember(token: str | None) -> None:
    """Mask `token` in everything `redact` and `clip` see, until `forget` (a client sending it:
    what the source says is clipped into messages before any other masking)."""
    token = (token or "").strip()
    if token:
        _KNOWN[token] = _KNOWN.get(token, 0) + 1


def forget(token: str | None) -> None:
    """The client that sent `token` is closed."""
    token = (token or "").strip()
    if _KNOWN.get(token, 0) > 1:
        _KNOWN[token] -= 1
    else:
        _KNOWN.pop(token, None)


def _forms(token: str | None) -> list[str]:
    """The forms of `token` and of each remembered one."""
    return sorted({f for known in {token, *_KNOWN} for f in token_forms(known)})


def token_forms(token: str | None) -> list[str]:
    """The app token as sent, and as a source or a proxy may echo it: JSON with its slashes
    escaped (`\\/`), percent-encoded in a URL, or HTML-escaped. Longest first."""
    token = (token or "").strip()
    if not token:
        return []
    forms = {
        token,
        token.replace("/", "\\/"),
        quote(token, safe=""),
        quote_plus(token),
        html.escape(token),
        html.escape(token).replace("/", "&#x2F;"),
        html.escape(token).replace("/", "&#47;"),
        "".join(f"&#{ord(c)};" if not c.isalnum() else c for c in token),
    }
    return sorted(forms, key=len, reverse=True)


def _pattern(form: str) -> str:
    """`form` as a regex where its percent escapes match in either case (`%2F`, `%2f`)."""
    return "".join(
        f"%[{m[1].upper()}{m[1].lower()}][{m[2].upper()}{m[2].lower()}]"
        if m[1]
        else re.escape(m[0])
        for m in re.finditer(r"%([0-9A-Fa-f])([0-9A-Fa-f])|.", form, re.S)
    )


@lru_cache(maxsize=64)
def _matcher(forms: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[bytes]]:
    # every start of every form, overlapping ones too: a lookahead captures each
    body = "|".join(_pattern(f) for f in sorted(forms, key=len, reverse=True))
    text = re.compile(f"(?=({body}))", re.S)
    return text, re.compile(text.pattern.encode(), re.S)


def _masked(text: AnyStr, pattern: re.Pattern[AnyStr], mask: AnyStr) -> AnyStr:
    """`text` with every stretch that some form covers (overlapping forms merged) masked."""
    spans: list[list[int]] = []
    for m in pattern.finditer(text):
        start, end = m.start(1), m.end(1)
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    if not spans:
        return text
    pieces, at = [], 0
    for start, end in spans:
        pieces += [text[at:start], mask]
        at = end
    pieces.append(text[at:])
    return text[:0].join(pieces)


def redact(text: str, token: str | None = None) -> str:
    """`text` with the token (and each one remembered) masked in each of its forms, and any
    URL's user and password."""
    forms = _forms(token)
    if forms:
        text = _masked(text, _matcher(tuple(forms))[0], MASK)
    return _USERINFO.sub(rf"\1{MASK}@", text)


def redact_bytes(body: bytes, token: str | None = None) -> bytes:
    """`body` with the token (and each one remembered) masked in each of its forms (before a
    message is cut from it)."""
    forms = _forms(token)
    if forms:
        body = _masked(body, _matcher(tuple(forms))[1], MASK.encode())
    return body
