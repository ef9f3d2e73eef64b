"""How a client of the source is set up, each setting checked: the base URL (https, or a
loopback host, unless allowed), the retry policy, the wire format, the ceiling of requests in
flight."""

from __future__ import annotations

import ipaddress
import random
import string
from dataclasses import dataclass

import httpx

from .. import settings
from ..errors import UsageError

DEFAULT_BASE_URL = "https://data.cityofnewyork.us"
MAX_TIMEOUT = 3600.0  # seconds of silence a request may wait at most (a socket's bound is far off)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a failing request."""

    attempts: int = 10
    base: float = 1.0
    cap: float = 60.0
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise UsageError(f"retry attempts must be at least 1, not {self.attempts}")

    @classmethod
    def from_env(cls, attempts: int | None = None) -> RetryPolicy:
        """The policy: `attempts`, else `NYC_COLLISIONS_RETRIES` (1-100, default 10); the base
        delay from `NYC_COLLISIONS_RETRY_BASE` (0-60 seconds, default 1)."""
        base = settings.env_float(settings.RETRY_BASE, cls.base, 0.0, 60.0)
        if attempts is None:
            attempts = settings.env_int(settings.RETRIES, cls.attempts, 1, 100)
        return cls(attempts=attempts, base=base)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before attempt `attempt + 1`: full jitter, or the server's Retry-After, which
        lengthens the wait but never makes it shorter than half the backoff (a throttle saying
        `Retry-After: 0` would have every attempt spent within milliseconds)."""
        backoff = min(self.cap, self.base * 2.0**attempt)
        if retry_after is not None:
            return max(min(retry_after, self.max_retry_after), backoff / 2)
        return random.uniform(0, backoff)


def validate_base_url(base_url: str, *, allow_http: bool = False, name: str = "--source") -> str:
    """Check a source URL (`name` says where it came from): an http(s) URL of a host, without
    query, and https unless the host is this machine or `allow_http`; returns it without a
    final /."""
    if isinstance(base_url, str) and ("?" in base_url or "#" in base_url):
        # never quoted: a query may carry the token (`$$app_token=`)
        raise UsageError(
            f"{name} has a query or fragment (?, #) in it; give a base URL like "
            "https://data.cityofnewyork.us (the app token goes in SOCRATA_APP_TOKEN)"
        )
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UsageError(f"{name} {base_url!r} is not a URL: {exc}") from None
    if url.userinfo:
        # never quoted: the URL carries a password; the source is open data, and the token
        # has its own setting
        raise UsageError(
            f"{name} has a user or password in it; give the source's URL without them (the app"
            " token goes in SOCRATA_APP_TOKEN)"
        )
    port_ok = url.port is None or 0 < url.port < 65536
    if url.scheme not in ("http", "https") or not url.host or not port_ok:
        raise UsageError(
            f"{name} {base_url!r} is not a base URL like https://data.cityofnewyork.us"
        )
    if url.scheme == "http" and not allow_http and not _is_loopback(url.host):
        raise UsageError(
            f"{name} {base_url!r}: plain http would send the app token and the data unencrypted;"
            f" use https, or allow it with --allow-http ({settings.ALLOW_HTTP}=1)"
        )
    return str(url).rstrip("/")


_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~+/=")


def check_app_token(token: str | None) -> str | None:
    """The app token without the whitespace around it (a token file's line break), None when
    empty. One with any other character (a space, a quote, a control character, non-ASCII) is
    refused, never quoted: HTTP would refuse the header and say why with the token in it."""
    token = (token or "").strip()
    if not token:
        return None
    if not _TOKEN_CHARS.issuperset(token):
        raise UsageError(
            "the app token (SOCRATA_APP_TOKEN) has a character no app token has (a space, a"
            " quote, a control character or non-ASCII): check how it was set"
        )
    return token


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin_of(url: httpx.URL) -> str:
    """scheme://host[:port], the port only when it is not the scheme's default (as httpx keeps
    it); never user or password."""
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


DEFAULT_MAX_CONCURRENCY = 8


def max_concurrency() -> int:
    """The polite ceiling of requests in flight: `NYC_COLLISIONS_MAX_CONCURRENCY` (1-64), or 8."""
    return settings.env_int(settings.MAX_CONCURRENCY, DEFAULT_MAX_CONCURRENCY, 1, 64)


WIRES = ("auto", "json", "csv")


def check_timeouts(timeout: float, connect_timeout: float) -> None:
    """Each timeout positive seconds up to `MAX_TIMEOUT` (not nan, not inf)."""
    if not (0 < timeout <= MAX_TIMEOUT and 0 < connect_timeout <= MAX_TIMEOUT):
        raise UsageError(
            f"timeouts must be positive seconds up to {MAX_TIMEOUT:g}, not {timeout} and "
            f"{connect_timeout}"
        )


def check_wire(wire: str) -> str:
    """How pages of rows are read: `auto` (CSV where it is exact for the dataset, else JSON),
    `json`, or `csv` (refused for a dataset whose types CSV does not carry exactly)."""
    wire = wire.lower()
    if wire not in WIRES:
        raise UsageError(f"unknown wire format {wire!r}: use auto, json or csv")
    return wire
