"""The HTTP client for SODA: one pooled connection pool, timeouts, the app token, retries.

Every request goes through `SodaClient.fetch`, which classifies responses in one place:

- 429, 202, 5xx, 403 throttles, connection errors, timeouts, incomplete or unparsable bodies and
  HTML pages are retried with exponential backoff and full jitter, honouring `Retry-After`;
- 404 is `DatasetNotFound`, 403 `permission_denied` is `InvalidAppToken`, any other 4xx is
  `SourceRejected` with the server's message (both of SODA's error shapes are read).

All workers share one `ConcurrencyLimit` (see `concurrency.py`): the requests in flight follow
what the source serves at once, found from how long its answers take, never above a polite
ceiling (`--max-concurrency`, default 8), or fixed (`--workers`); a throttle (429/403 throttle)
halves it once per event.
One INFO log line per request; the token travels only in the `X-App-Token` header and is never
logged or put in a message. Requests go only to the source's own origin (scheme, host, port): a
redirect elsewhere is refused before it is followed, so the token never leaves with it; plain
http is refused for any host but this machine unless allowed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx

from .. import __version__
from ..errors import (
    BadResponse,
    RetriesStopped,
    SourceRejected,
    SourceUnavailable,
    UsageError,
)
from ..redact import forget, redact, remember
from .answers import (
    MAX_DOCUMENT_BYTES,
    Retryable,
    at_most_one_row,
    classify,
    error_body,
    error_message,
    inflated,
    looks_like_html,
    metadata_document,
    one_row,
    parse_json_document,
    whole,
)
from .concurrency import ConcurrencyLimit
from .setup import (
    DEFAULT_BASE_URL,
    MAX_TIMEOUT,
    WIRES,
    RetryPolicy,
    check_app_token,
    check_timeouts,
    check_wire,
    max_concurrency,
    origin_of,
    validate_base_url,
)
from .stopping import RunStop

logger = logging.getLogger(__name__)
T = TypeVar("T")

CANCEL_LINGER = 0.5  # seconds a dropped page still counts as in flight, at least
# attempts in all of one request whose attempts each took rows before failing, in retries: a
# source cutting every body after a row or two is given up on, not crawled through
PROGRESS_RESTARTS = 10


@dataclass
class ClientStats:
    """What the client did, for summaries and benchmarks (thread-safe counters)."""

    requests: int = 0
    bytes: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += nbytes

    def retried(self, cause: str) -> None:
        with self._lock:
            self.retries[cause] += 1


class PageCancelled(Exception):
    """A page dropped on the caller's request (`stream_rows(cancelled=...)`); not an error."""


_THROTTLES = ("429", "403 throttle")


class SodaClient:
    """A pooled, retrying SODA client for one source (base URL) and optional app token."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        app_token: str | None = None,
        concurrency: int | None = None,
        adaptive: bool = True,
        retry: RetryPolicy | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        wire: str = "auto",
        allow_http: bool = False,
    ) -> None:
        self.base_url = validate_base_url(base_url, allow_http=allow_http)
        self._origin = origin_of(httpx.URL(self.base_url))
        self.wire = check_wire(wire)
        check_timeouts(timeout, connect_timeout)
        self.retry = retry or RetryPolicy()
        if concurrency is None:
            concurrency = max_concurrency()
        elif concurrency < 1:
            raise UsageError(f"concurrency must be at least 1, not {concurrency}")
        self.limit = ConcurrencyLimit(concurrency, adaptive=adaptive)
        self.stats = ClientStats()
        self._stop = RunStop()  # see `stopping_when`
        self._timeouts = (timeout, connect_timeout)
        headers = {
            "User-Agent": f"nyc-collisions/{__version__}",
            "Accept-Encoding": "gzip",
        }
        app_token = check_app_token(app_token)
        if app_token:
            headers["X-App-Token"] = app_token
        self._token = app_token  # masked in whatever the source says (`mask`, `clip`)
        remember(app_token)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(
                max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4
            ),
            follow_redirects=True,
            event_hooks={"request": [self._same_origin]},
            # a proxy from the environment would read plain http, token and all; https only
            # passes through one, encrypted
            trust_env=httpx.URL(self.base_url).scheme == "https",
        )

    def mask(self, text: str) -> str:
        """`text` with the app token masked: the source, or a proxy in front of it, may echo
        the request's headers in what it answers."""
        return redact(text, self._token)

    def _same_origin(self, request: httpx.Request) -> None:
        """Before every request, redirects included: only to the source's own origin."""
        origin = origin_of(request.url)
        if origin != self._origin:
            raise SourceRejected(
                f"{self.base_url}: the source redirected to {origin}{request.url.path}, another "
                f"origin; refused: requests and the app token go only to {self._origin}"
            )

    def close(self) -> None:
        self._http.close()
        if self._token is not None:
            forget(self._token)
            self._token = None

    def stopping_when(
        self, stopping: Callable[[], bool], deadline: float | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """While in it, a failed request is not tried again once `stopping()` is true (a run's
        stop or time budget): it raises `RetriesStopped` instead of waiting out the retries.
        With a `deadline` (`time.monotonic()`), a request the source holds silent times out
        soon after it rather than after the whole read timeout."""
        return self._stop.during(stopping, deadline)

    def _cancel_linger(self) -> float:
        """How long a request dropped before its end still counts: the source goes on with it
        until it sees the connection closed."""
        return self._stop.lingering(max(CANCEL_LINGER, 2 * (self.limit.ttfb_min or 0.0)))

    def wait_to_retry(self, seconds: float) -> bool:
        """Sleep `seconds` before a retry; False (at once) when the run has to stop."""
        return self._stop.wait(seconds)

    def __enter__(self) -> SodaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the one place where requests are made and classified -------------------------------
    def fetch(
        self,
        path: str,
        params: dict[str, str] | None,
        parse: Callable[[bytes], T],
        most: int | None = MAX_DOCUMENT_BYTES,
    ) -> T:
        """GET `path` and parse its whole body, retrying what is worth retrying.

        `parse` runs inside the retry loop: a body that does not parse (cut short, HTML, broken)
        is fetched again; a parser signals that with `BadResponse`. A body of more than `most`
        bytes is refused (None: a page of rows, as long as the rows asked for).
        """
        query = dict(params or {})
        return self.stream(path, lambda: query, lambda chunks: parse(whole(chunks, most)))

    def stream(
        self,
        path: str,
        params: Callable[[], dict[str, str]],
        consume: Callable[[Iterator[bytes]], T],
        sample: bool = False,
    ) -> T:
        """GET `path` and hand the body to `consume` as it arrives, retrying like `fetch`.

        `params` is called before every attempt, so a retry after a body cut short can ask for
        what comes after the rows `consume` already took. `sample`: the request is a page of
        rows, whose latencies tell the concurrency limit how busy the source is.
        """
        last: Retryable | None = None
        asked: dict[str, str] | None = None
        attempt = tried = 0  # the attempt about to go (since the last that took rows), all
        while True:
            query = params()
            if last is not None and query != asked:
                # the attempt that failed took rows first (a retry asks for what follows them):
                # a source that cuts every long body is paged through, not given up on
                attempt = 1
            if attempt >= self.retry.attempts or tried >= self.retry.attempts * PROGRESS_RESTARTS:
                break
            tried += 1
            asked = query
            shown = path + ("?" + urlencode(query) if query else "")
            if last is not None:
                pause = self.retry.delay(attempt - 1, last.retry_after)
                # the first retries are routine; from the third on the source is in trouble,
                # and a user without -v should see why the run is waiting
                logger.log(
                    logging.WARNING if attempt >= 3 else logging.INFO,
                    "retry %d/%d in %.1fs after %s (GET %s)",
                    attempt,
                    self.retry.attempts - 1,
                    pause,
                    last,
                    shown,
                )
                if not self.wait_to_retry(pause):
                    raise RetriesStopped(
                        f"{self.base_url}{path}: not tried again, the run is stopping; last: {last}"
                    )
            try:
                result = self._stream_attempt(path, query, consume, shown, sample, tried > 1)
            except Retryable as exc:
                self.stats.retried(exc.cause)
                last = exc
                attempt += 1
                continue
            except RetriesStopped as exc:  # a retry's wait for a slot, ended by a stop
                after = f"; last: {last}" if last is not None else ""
                raise RetriesStopped(f"{self.base_url}{path}: {exc}{after}") from None
            return result
        assert last is not None
        raise SourceUnavailable(
            f"{self.base_url}{path}: gave up after {tried} "
            f"attempt{'s' if tried != 1 else ''}; last: {last}"
        )

    def _stream_attempt(
        self,
        path: str,
        query: dict[str, str],
        consume: Callable[[Iterator[bytes]], T],
        shown: str,
        sample: bool,
        retry: bool,
    ) -> T:
        started = time.monotonic()
        received = 0
        heard = started  # when the source last sent something

        def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
            nonlocal received, heard
            for chunk in chunks:
                received += len(chunk)
                heard = time.monotonic()
                yield chunk

        # a retry's wait for a slot (behind one given up on that still counts) ends with a stop
        with self.limit.request(sample, self._stop.stopping if retry else None) as ticket:
            heard = time.monotonic()
            try:
                timeout = self._stop.timeout(*self._timeouts)
                with self._http.stream("GET", path, params=query, timeout=timeout) as response:
                    if response.status_code != 200 or looks_like_html(response, b""):
                        body = error_body(response)
                        self.stats.add(len(body))
                        classify(
                            response,
                            body,
                            f"{self.base_url}{shown}",
                            f"{self.base_url}{path}",
                            self._token,
                        )
                    ticket.first_byte()
                    try:
                        result = consume(counted(inflated(response)))
                    except BadResponse as exc:
                        # dropped before its end, which the source goes on sending: as a cancel
                        ticket.linger(self._cancel_linger())
                        raise Retryable("bad body", self.mask(str(exc))) from None
            except Retryable as exc:
                if exc.cause in _THROTTLES:
                    self.limit.throttled(ticket.epoch)
                raise
            except PageCancelled:
                # the source goes on with the page until it sees the connection closed: its
                # slot stays counted a little longer, so the ceiling holds at the source too
                ticket.linger(self._cancel_linger())
                raise
            except httpx.TooManyRedirects:
                raise SourceRejected(f"{self.base_url}{shown}: too many redirects") from None
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ReadTimeout):
                    # the source may still be serving it: its slot stays counted as long again
                    # as it was silent, so that the retry does not make two at the source
                    ticket.linger(
                        self._stop.lingering(max(CANCEL_LINGER, time.monotonic() - heard))
                    )
                raise Retryable("timeout", f"timed out ({type(exc).__name__})") from None
            except httpx.TransportError as exc:
                raise Retryable("connection", self.mask(f"{type(exc).__name__}: {exc}")) from None
            finally:
                if received:
                    self.stats.add(received)
            ticket.done(received)
        logger.info("GET %s -> 200 (%d bytes, %.2fs)", shown, received, time.monotonic() - started)
        return result

    # -- typed helpers ----------------------------------------------------------------------
    def get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        return self.fetch(path, params, parse_json_document)

    def metadata(self, dataset_id: str) -> dict[str, Any]:
        """The dataset's metadata; a document without columns is fetched again, like a body cut
        short."""

        return self.fetch(f"/api/views/{dataset_id}.json", None, metadata_document)

    def resource_path(self, dataset_id: str, fmt: str = "json") -> str:
        return f"/resource/{dataset_id}.{fmt}"

    def scalar(self, dataset_id: str, params: dict[str, str], alias: str) -> str | None:
        """One aggregate value (`count(*) AS n`, `max(...) AS m`); None when the source has none."""
        return self.aggregates(dataset_id, params, (alias,))[alias]

    def aggregates(
        self, dataset_id: str, params: dict[str, str], aliases: tuple[str, ...]
    ) -> dict[str, str | None]:
        """The aggregates of one request, by alias (None where the source has no value).

        An aggregate always answers one row: anything else (`[]` from a body cut short) is a
        `BadResponse`, so it is fetched again rather than read as zero.
        """

        row = self.fetch(self.resource_path(dataset_id), params, one_row(dataset_id))
        return {a: None if row.get(a) is None else str(row[a]) for a in aliases}

    def first_row(self, dataset_id: str, params: dict[str, str]) -> dict[str, Any] | None:
        """The one row a query with `$limit=1` answers, or None when it answers none."""

        return self.fetch(self.resource_path(dataset_id), params, at_most_one_row(dataset_id))


_body = inflated  # the name tests know

__all__ = [
    "DEFAULT_BASE_URL",
    "MAX_TIMEOUT",
    "WIRES",
    "PageCancelled",
    "RetryPolicy",
    "SodaClient",
    "error_message",
    "parse_json_document",
    "validate_base_url",
]
