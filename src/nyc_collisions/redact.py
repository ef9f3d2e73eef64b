"""Secrets out of text: the app token in every form a message may carry it, and the user and
password of any URL (an S3 endpoint's, a proxy's), before anything is shown or logged."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import AnyStr

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


def _tokens(token: str | None) -> list[str]:
    """`token` and each remembered one."""
    return sorted({t for t in (token, *_KNOWN) if t and t.strip()})


# HTML's names for the characters a token or a quoted text may hold (HTML5 names some more)
_NAMED = {
    "&": ["amp"],
    "<": ["lt"],
    ">": ["gt"],
    '"': ["quot"],
    "'": ["apos"],
    "/": ["sol"],
    "+": ["plus"],
    "=": ["equals"],
    ".": ["period"],
    "_": ["lowbar", "UnderBar"],
}


def _hex(number: int, width: int) -> str:
    """`number` in hex digits as a regex matching either case."""
    return "".join(f"[{d}{d.lower()}]" if d.isalpha() else d for d in f"{number:0{width}X}")


def _utf8(text: str) -> bytes:
    """`text` in UTF-8; a lone surrogate (undecodable bytes of a token read from the
    environment) as the byte it stands for."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _char(c: str) -> str:
    """A regex for one character of a token as any escaper may spell it, once or escaped
    again (a URL inside a URL, JSON inside JSON, HTML of HTML): itself, a percent escape (`+`
    for a space), JSON's `\\/` and `\\uXXXX`, an HTML entity in decimal, hex or by name, hex
    digits in either case. Escapers differ in which characters they escape, so each character
    is matched in any of its spellings."""
    if c.isascii() and c.isalnum():
        return c
    code = ord(c)
    utf8 = _utf8(c)
    entity = f"#0*{code}|#[xX]0*{_hex(code, 1)}" + "".join(f"|{n}" for n in _NAMED.get(c, []))
    # escaped again up to three times: bounded, so that a run of `%25`s, `&amp;`s or
    # backslashes costs each place it is tried a few steps, never the rest of the run
    spellings = [
        re.escape(c),
        "".join("%(?:25){0,3}" + _hex(b, 2) for b in utf8),
        f"&(?:amp;){{0,3}}(?:{entity});",
    ]
    if code <= 0xFFFF:
        spellings.append(r"\\{1,15}u" + _hex(code, 4))
    if c == "/":
        spellings.append(r"\\{1,15}/")
    if c == " ":
        spellings.append(r"\+")
    return "(?:" + "|".join(spellings) + ")"


@lru_cache(maxsize=64)
def _matcher(token: str) -> tuple[re.Pattern[str], re.Pattern[bytes]]:
    """`token` in any spelling (`_char`), as a str and a bytes regex."""
    pattern = "".join(_char(c) for c in token.strip())
    return re.compile(pattern), re.compile(_utf8(pattern))


def _masked(text: AnyStr, patterns: list[re.Pattern[AnyStr]], mask: AnyStr) -> AnyStr:
    """`text` with every stretch that a token covers masked (overlapping tokens merged)."""
    found = sorted(m.span() for p in patterns for m in p.finditer(text))
    if not found:
        return text
    pieces, at = [], 0
    for start, end in found:
        if start >= at:  # a stretch of its own
            pieces += [text[at:start], mask]
            at = end
        elif end > at:  # overlapping the last one: it grows
            at = end
    pieces.append(text[at:])
    return text[:0].join(pieces)


def redact(text: str, token: str | None = None) -> str:
    """`text` with the token (and each one remembered) masked in each of its forms, and any
    URL's user and password."""
    tokens = _tokens(token)
    if tokens:
        text = _masked(text, [_matcher(t)[0] for t in tokens], MASK)
    return _USERINFO.sub(rf"\1{MASK}@", text)


def redact_bytes(body: bytes, token: str | None = None) -> bytes:
    """`body` with the token (and each one remembered) masked in each of its forms (before a
    message is cut from it)."""
    tokens = _tokens(token)
    if tokens:
        body = _masked(body, [_matcher(t)[1] for t in tokens], MASK.encode())
    return body
