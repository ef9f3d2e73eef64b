"""How many requests to have in flight, found while a run goes from how the source answers:
the rules, pure and clock-free (`Controller`); `concurrency.ConcurrencyLimit` holds the slots.

A source serves some number of requests at once and queues the rest; nobody tells the client
that number, and it may change with the token, the hour and the dataset. Asking for more than
the source serves makes no row come sooner, it only makes the source slower for everyone; asking
for fewer leaves its capacity idle. The limit holds the requests in flight near what the
source serves, the way TCP Vegas (Brakmo and Peterson, 1994) and Netflix's concurrency-limits
`VegasLimit` do: compare each request's latency with the latency when nothing waits (the least
seen) and keep one request waiting at the source, so that no slot of it idles between two
pages.

Latency is read in two places, because page sizes vary and a whole page's time says little.
Each is against the least seen, except that a page sent with no other request in flight, and
none sent until it answered, waited behind nothing of ours: its latency becomes the least even
when it is more, so that a source grown slower for every request (a busier hour) is the new
normal rather than a queue that never drains, and the limit grows again in slow start.

- the time to the first byte of a page: a source that queues requests holds them before it
  answers; a page that waited longer than `max(2 x least, least + 0.1 s)` waited in a queue;
- the time per byte while a page streams: a source that shares itself among requests streams
  each more slowly; a page slower than `SHARED` x the fastest seen counts as waiting too.

The rules (every method takes the time, so that tests drive them with synthetic latencies):

- slow start: from `initial`, each page whose first byte came without waiting while the limit was
  in use earns one more request in flight, granted a queue threshold later if no request waits
  by then (so the limit doubles per round trip until a request waits);
- then one more per `limit` such pages (Vegas' additive increase), and after the source throttled
  one more per `GROW_AFTER x limit` of them;
- two or more requests waiting (Vegas' beta) mean the source serves about the others: the limit
  drops to one more than those, and drops again only for a request sent after that (a drop
  takes effect only as requests end); a page k times slower than the fastest drops it to one
  more than the requests in flight / k (Gradient2's `limit x gradient + queue`);
- a throttle (429, 403 throttle) halves the limit, once per event: requests in flight when it
  happened were sent at the old rate, so only a throttled request sent after the last halving
  halves it again;
- never above `ceiling` (the polite maximum), never below 1.

Only pages of rows are samples (`sample=True`): probes and counts take a slot, but a deep
`$offset` is slow for its own reasons. A source that shares itself from the first request on
looks the same at every limit (every page as slow as the fastest): only a slowdown shows.

`adaptive=False` (`--workers N`) keeps the limit at the ceiling: only a throttle lowers it, and
it grows back by one after `GROW_AFTER x limit` successes in a row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

GROW_AFTER = 4  # after a throttle: good pages per limit before the limit grows by one
BETA = 2  # requests waiting at the source that make the limit drop
SHARED = 1.5  # a page streaming this many times slower than the fastest: the source is shared
QUEUE_FACTOR = 2.0  # a first byte later than this many times the least seen: the request waited
QUEUE_SLACK = 0.1  # ... and later than the least + this many seconds (jitter of a fast source)
MIN_SAMPLE_BYTES = 256 << 10  # pages smaller than this say nothing about the streaming rate


@dataclass
class _Request:
    sent: float
    sample: bool  # a page of rows: its latencies are samples (probes and counts are not)
    first: float | None = None
    alone: bool = False  # no other request in flight from its sending on (so far)


@dataclass
class _Grant:
    due: float  # when it is known whether requests sent with it waited


@dataclass
class Controller:
    """The controller's state and rules; every method takes the time (seconds, monotonic)."""

    ceiling: int
    initial: int
    adaptive: bool
    limit: int = 0
    epoch: int = 0  # halvings so far (see `throttled`)
    throttles: int = 0
    peak: int = 0
    ttfb_min: float | None = None
    byte_time_min: float | None = None
    slow_start: bool = True
    throttled_once: bool = False
    credit: int = 0
    successes: int = 0
    dropped_at: float | None = None  # when the limit last dropped for waiting requests
    requests: dict[int, _Request] = field(default_factory=dict)
    grants: list[_Grant] = field(default_factory=list)
    held: dict[int, float] = field(default_factory=dict)  # seconds spent at each limit
    changed_at: float | None = None
    _next_id: int = 0

    def __post_init__(self) -> None:
        self.ceiling = max(1, self.ceiling)
        start = self.initial if self.adaptive else self.ceiling
        self.limit = max(1, min(self.ceiling, start))

    # -- admission ---------------------------------------------------------------------------
    def admits(self) -> bool:
        return len(self.requests) < self.limit

    def sent(self, now: float, sample: bool) -> int:
        self._next_id += 1
        for r in self.requests.values():
            r.alone = False
        self.requests[self._next_id] = _Request(now, sample, alone=not self.requests)
        self.peak = max(self.peak, len(self.requests))
        if self.changed_at is None:
            self.changed_at = now
        return self._next_id

    # -- samples -----------------------------------------------------------------------------
    def threshold(self) -> float:
        """A first byte later than this waited in a queue."""
        least = self.ttfb_min if self.ttfb_min is not None else 0.0
        return max(QUEUE_FACTOR * least, least + QUEUE_SLACK)

    def first_byte(self, rid: int, now: float) -> None:
        r = self.requests.get(rid)
        if r is None or r.first is not None:
            return
        r.first = now
        if not r.sample:
            return
        wait = now - r.sent
        if r.alone and self.ttfb_min is not None and wait > self.threshold():
            # what the source takes now with nothing of ours ahead: the pages that made the
            # limit drop were not queued behind ours; it grows again as from the start
            self.slow_start = not self.throttled_once
        if self.ttfb_min is None or wait < self.ttfb_min or r.alone:
            self.ttfb_min = wait
        if wait > self.threshold():
            self.slow_start = False
            self.grants.clear()
        elif len(self.requests) >= self.limit and self.adaptive:
            # the limit is in use: one more in flight might be served at once too
            self.grants.append(_Grant(now + self.threshold()))
        self.tick(now)

    def finished(self, rid: int, now: float, nbytes: int | None) -> None:
        """The request ended: `nbytes` received when it succeeded, None when it failed."""
        r = self.requests.pop(rid, None)
        if r is None:
            return
        if nbytes is not None and not self.adaptive:
            self._succeeded(now)
        if (
            nbytes is not None
            and r.sample
            and r.first is not None
            and nbytes >= MIN_SAMPLE_BYTES
            and now > r.first
        ):
            per_byte = (now - r.first) / nbytes
            if self.byte_time_min is None or per_byte < self.byte_time_min or r.alone:
                self.byte_time_min = per_byte  # (alone: its rate shared with none of ours)
            elif per_byte > SHARED * self.byte_time_min and self.adaptive and self._new(r):
                # k times slower: the source shares what it serves among k times more
                # requests than it serves at full speed; keep one more than that
                slower = per_byte / self.byte_time_min
                served = int((len(self.requests) + 1) / slower)
                self.slow_start = False
                self.grants.clear()
                self._drop(now, min(self.limit - 1, served + 1), "pages stream slower")
        self.tick(now)

    def _waiting(self, now: float) -> list[_Request]:
        """Pages in flight that have waited longer than the threshold for their first byte
        (none before a first byte was seen: until then, nothing says how long is long)."""
        if self.ttfb_min is None:
            return []
        threshold = self.threshold()
        return [
            r
            for r in self.requests.values()
            if r.sample and r.first is None and now - r.sent > threshold
        ]

    def waiting(self, now: float) -> int:
        return len(self._waiting(now))

    def _new(self, r: _Request) -> bool:
        """Whether `r` was sent after the last drop (and so tells whether it sufficed)."""
        return self.dropped_at is None or r.sent > self.dropped_at

    def tick(self, now: float) -> None:
        """Apply what time has told: grants that came due, and a queue that grew."""
        if not self.adaptive:
            return
        waiting = self._waiting(now)
        queued = len(waiting)
        if queued >= BETA and any(self._new(r) for r in waiting):
            self.grants.clear()
            self.slow_start = False
            # the source serves about the requests that do not wait: keep one more than that
            served = len(self.requests) - queued
            self._drop(now, min(self.limit - 1, served + 1), f"{queued} requests wait")
            return
        due = [g for g in self.grants if g.due <= now]
        if not due:
            return
        self.grants = [g for g in self.grants if g.due > now]
        if queued:
            self.slow_start = False
            self.grants.clear()
            return
        for _ in due:
            self._grow(now)

    # -- changes -----------------------------------------------------------------------------
    def _set(self, now: float, limit: int, why: str) -> None:
        limit = max(1, min(self.ceiling, limit))
        if limit == self.limit:
            return
        if self.changed_at is not None:
            self.held[self.limit] = self.held.get(self.limit, 0.0) + max(0.0, now - self.changed_at)
        self.changed_at = now
        logger.debug("concurrency %d -> %d (%s)", self.limit, limit, why)
        self.limit = limit

    def _grow(self, now: float) -> None:
        if self.slow_start:
            self._set(now, self.limit + 1, "slow start")
            return
        self.credit += 1
        if self.credit >= self.limit * (GROW_AFTER if self.throttled_once else 1):
            self.credit = 0
            self._set(now, self.limit + 1, "no request waits")

    def _drop(self, now: float, limit: int, why: str) -> None:
        self.dropped_at = now
        self.credit = 0
        self._set(now, limit, why)

    def throttled(self, epoch: int, now: float) -> bool:
        """A request sent in `epoch` was throttled: halve the limit once per event; True if
        this was a new event."""
        if epoch != self.epoch:
            return False  # sent before the last halving: the same event, already answered
        self.epoch += 1
        self.throttles += 1
        self.throttled_once = True
        self.slow_start = False
        self.grants.clear()
        self.successes = self.credit = 0
        self._set(now, self.limit // 2, "throttled")
        return True

    def _succeeded(self, now: float) -> None:
        """Fixed limit: one success; after `GROW_AFTER * limit` in a row, one more in flight."""
        if self.limit >= self.ceiling:
            return
        self.successes += 1
        if self.successes >= self.limit * GROW_AFTER:
            self.successes = 0
            self._set(now, self.limit + 1, "recovered")

    def new_dataset(self) -> None:
        """Another dataset's pages: its rows have another width, so its bytes stream at another
        rate; the first byte's latency is the source's and stays."""
        self.byte_time_min = None

    def settled(self, now: float) -> int:
        """The limit held longest so far."""
        held = dict(self.held)
        if self.changed_at is not None:
            held[self.limit] = held.get(self.limit, 0.0) + max(0.0, now - self.changed_at)
        return max(held, key=lambda k: (held[k], k)) if held else self.limit
