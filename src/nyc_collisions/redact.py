"""Secrets out of text: the app token in every form a message may carry it, and the user and
password of any URL (an S3 endpoint's, a proxy's), before anything is shown or logged."""

from __future__ import annotations

import re
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
    """The forms of `token` and of each remembered one, longest first (none left in part)."""
    forms = {f for known in {token, *_KNOWN} for f in token_forms(known)}
    return sorted(forms, key=len, reverse=True)


def token_forms(token: str | None) -> list[str]:
    """The app token as sent, and as a source or a proxy may echo it: JSON with its slashes
    escaped (`\\/`), or percent-encoded in a URL. Longest first, so that none is left in part."""
    token = (token or "").strip()
    if not token:
        return []
    forms = {token, token.replace("/", "\\/"), quote(token, safe=""), quote_plus(token)}
    return sorted(forms, key=len, reverse=True)


def redact(text: str, token: str | None = None) -> str:
    """`text` with the token (and each one remembered) masked in each of its forms, and any
    URL's user and password."""
    for form in _forms(token):
        text = text.replace(form, MASK)
    return _USERINFO.sub(rf"\1{MASK}@", text)


def redact_bytes(body: bytes, token: str | None = None) -> bytes:
    """`body` with the token (and each one remembered) masked in each of its forms (before a
    message is cut from it)."""
    for form in _forms(token):
        body = body.replace(form.encode(), MASK.encode())
    return body
