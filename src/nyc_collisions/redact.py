"""Secrets out of text: the app token in every form a message may carry it, and the user and
password of any URL (an S3 endpoint's, a proxy's), before anything is shown or logged."""

from __future__ import annotations

import re
from urllib.parse import quote, quote_plus

MASK = "***"

# scheme://user:password@ -- what botocore and httpx quote of an endpoint or a proxy (to the
# last @ before the host: a password may hold @ and ')
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s\"<>]*@")
_KNOWN: set[str] = set()  # the tokens this process sends (`remember`)


def remember(token: str | None) -> None:
    """Mask `token` in everything `redact` and `clip` see from now on (a client sending it)."""
    token = (token or "").strip()
    if token:
        _KNOWN.add(token)


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
    for known in {token, *_KNOWN}:
        for form in token_forms(known):
            text = text.replace(form, MASK)
    return _USERINFO.sub(rf"\1{MASK}@", text)


def redact_bytes(body: bytes, token: str | None = None) -> bytes:
    """`body` with the token (and each one remembered) masked in each of its forms (before a
    message is cut from it)."""
    for known in {token, *_KNOWN}:
        for form in token_forms(known):
            body = body.replace(form.encode(), MASK.encode())
    return body
