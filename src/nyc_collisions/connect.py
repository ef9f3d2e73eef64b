"""A client of the source made from one typed record of settings, the same way everywhere: the
command line's options (each falling back to its environment variable), the Lambda handler and
the library's `fetch` (the environment variables alone)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import settings
from .errors import UsageError
from .settings import MAX_IN_FLIGHT
from .socrata.client import DEFAULT_BASE_URL, MAX_TIMEOUT, WIRES, RetryPolicy, SodaClient

DEFAULT_RETRIES = 10
DEFAULT_TIMEOUT = 120.0
__all__ = ["DEFAULT_RETRIES", "DEFAULT_TIMEOUT", "MAX_TIMEOUT", "SourceSettings"]


@dataclass(frozen=True)
class SourceSettings:
    """Where the rows come from and how they are asked for."""

    url: str = DEFAULT_BASE_URL
    retries: int = DEFAULT_RETRIES
    timeout: float = DEFAULT_TIMEOUT
    wire: str = "auto"
    allow_http: bool = False
    retry_base: float | None = None  # seconds before the first retry; None: from the environment

    @classmethod
    def from_env(cls, url: str | None = None, *, allow_http: bool = False) -> SourceSettings:
        """`url`, else SOCRATA_BASE_URL; NYC_COLLISIONS_RETRIES, _RETRY_BASE, _WIRE and
        _ALLOW_HTTP, each checked (a bad value is a `UsageError` naming it)."""
        retry = RetryPolicy.from_env()
        return cls(
            url=url or os.environ.get("SOCRATA_BASE_URL") or DEFAULT_BASE_URL,
            retries=retry.attempts,
            wire=settings.env_choice(settings.WIRE, "auto", WIRES),
            allow_http=allow_http or settings.env_flag(settings.ALLOW_HTTP),
            retry_base=retry.base,
        )

    def client(
        self,
        workers: int | None = None,
        max_concurrency: int | None = None,
        *,
        retries: int | None = None,
        app_token: str | None = None,
    ) -> SodaClient:
        """A client of the source: `workers` requests in flight, or as many as it serves up to
        `max_concurrency` (give one of them); `retries` instead of the record's; the app token
        given, else SOCRATA_APP_TOKEN."""
        if workers is not None and max_concurrency is not None:
            raise UsageError(
                "--workers fixes the requests in flight and --max-concurrency bounds the number "
                "found at run time: give one of them"
            )
        if max_concurrency is not None and not 1 <= max_concurrency <= MAX_IN_FLIGHT:
            raise UsageError(
                f"--max-concurrency must be from 1 to {MAX_IN_FLIGHT}, not {max_concurrency}"
            )
        if workers is not None and not 1 <= workers <= MAX_IN_FLIGHT:
            raise UsageError(f"--workers must be from 1 to {MAX_IN_FLIGHT}, not {workers}")
        return SodaClient(
            self.url,
            wire=self.wire,
            app_token=app_token or os.environ.get("SOCRATA_APP_TOKEN") or None,
            concurrency=workers if workers is not None else max_concurrency,
            adaptive=workers is None,
            retry=self._retry(self.retries if retries is None else retries),
            timeout=self.timeout,
            allow_http=self.allow_http,
        )

    def _retry(self, attempts: int) -> RetryPolicy:
        if self.retry_base is None:
            return RetryPolicy.from_env(attempts=attempts)
        return RetryPolicy(attempts=attempts, base=self.retry_base)
