"""The requests in flight to one source: a slot per request, as many as the limit that
`vegas.Controller` finds from how the source answers (see there), shared by every thread of a
client.

Slots go to waiting requests in the order they asked: a thread that ends a page and asks for its
next one at once would otherwise take the slot it freed before a waiter wakes, again and again,
and leave one range unfetched until the others end. A stop releases every waiter at once
(`interrupt`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import Interrupted, RetriesStopped
from .vegas import GROW_AFTER, Controller

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    """What the limit did over a run: for logs and summaries."""

    settled: int  # the limit held longest, or the peak in flight when that was less
    peak: int  # most requests in flight at once
    ceiling: int
    throttles: int
    adaptive: bool


class Ticket:
    """One request holding a slot: tell it when its first byte came and when it ended well."""

    def __init__(self, owner: ConcurrencyLimit, rid: int, epoch: int) -> None:
        self._owner = owner
        self.rid = rid
        self.epoch = epoch
        self.nbytes: int | None = None
        self.lingers = 0.0

    def first_byte(self) -> None:
        self._owner._event(lambda core, now: core.first_byte(self.rid, now))

    def done(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def linger(self, seconds: float) -> None:
        """Count it in flight for `seconds` more after it ends (a request given up on, which the
        source may still be serving)."""
        self.lingers = seconds


class ConcurrencyLimit:
    """The requests in flight to one source, shared by every thread of a client (see the module
    docstring). `with limit.request(sample=True) as ticket:` holds one slot for a request."""

    GROW_AFTER = GROW_AFTER

    def __init__(
        self,
        maximum: int,
        *,
        adaptive: bool = False,
        initial: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._core = Controller(maximum, initial, adaptive)
        self._clock = clock
        self._cond = threading.Condition()
        self._interrupts = 0  # `interrupt` calls so far
        self._line: deque[object] = deque()  # requests waiting for a slot, first come first

    @property
    def limit(self) -> int:
        return self._core.limit

    @property
    def ceiling(self) -> int:
        return self._core.ceiling

    @property
    def adaptive(self) -> bool:
        return self._core.adaptive

    @property
    def ttfb_min(self) -> float | None:
        """The least time to a page's first byte seen so far (seconds)."""
        return self._core.ttfb_min

    def in_flight(self) -> int:
        with self._cond:
            return len(self._core.requests)

    def waiting(self) -> int:
        """Requests waiting for a slot."""
        with self._cond:
            return len(self._line)

    def _event(self, apply: Callable[[Controller, float], object]) -> None:
        with self._cond:
            before = self._core.limit
            apply(self._core, self._clock())
            if self._core.limit > before:
                self._cond.notify_all()

    @contextlib.contextmanager
    def request(
        self, sample: bool = False, stopping: Callable[[], bool] | None = None
    ) -> Iterator[Ticket]:
        """Wait for a slot and hold it for one request; `sample`: a page of rows, whose
        latencies the limit learns from; `stopping`: once true, a wait for a slot raises
        `RetriesStopped` (a run's stop or time budget; a slot free at once is taken)."""
        with self._cond:
            interrupts, me = self._interrupts, object()
            self._line.append(me)
            try:
                while True:
                    if self._interrupts != interrupts:
                        raise Interrupted("stopped while waiting for a request slot")
                    self._core.tick(self._clock())
                    if self._line[0] is me and self._core.admits():
                        break
                    if stopping is not None and stopping():
                        raise RetriesStopped("not sent, the run is stopping")
                    self._cond.wait(timeout=0.05)
            finally:
                self._line.remove(me)
                self._cond.notify_all()  # the next in line may take a slot still free
            rid = self._core.sent(self._clock(), sample)
            ticket = Ticket(self, rid, self._core.epoch)
        try:
            yield ticket
        finally:
            if ticket.lingers > 0:
                timer = threading.Timer(ticket.lingers, self._finish, (rid, ticket.nbytes))
                timer.daemon = True
                timer.start()
            else:
                self._finish(rid, ticket.nbytes)

    def _finish(self, rid: int, nbytes: int | None) -> None:
        with self._cond:
            self._core.finished(rid, self._clock(), nbytes)
            self._cond.notify_all()

    def interrupt(self) -> None:
        """Release every request waiting for a slot now with `Interrupted`: a stop (Ctrl-C) must
        not wait for the requests in flight, which a source may hold for minutes."""
        with self._cond:
            self._interrupts += 1
            self._cond.notify_all()

    def tick(self) -> None:
        """Let time tell (grants that came due, requests that waited too long); called by
        whoever waits, so that the limit moves while every request streams."""
        self._event(lambda core, now: core.tick(now))

    def throttled(self, epoch: int) -> None:
        """A request sent in `epoch` was throttled: halve the limit, once per event."""
        with self._cond:
            before = self._core.limit
            if self._core.throttled(epoch, self._clock()) and self._core.limit != before:
                logger.warning("source throttles: concurrency %d -> %d", before, self._core.limit)

    def reset_usage(self) -> None:
        """Start counting `usage` afresh (at the start of a dataset's run), and the rate its
        pages stream at."""
        with self._cond:
            core = self._core
            core.new_dataset()
            core.held.clear()
            core.changed_at = self._clock()
            core.peak = len(core.requests)
            core.throttles = 0

    def usage(self) -> Usage:
        """What the limit did since it was made or `reset_usage`."""
        with self._cond:
            core = self._core
            settled = core.settled(self._clock())
            if core.peak:  # a limit never filled (fewer streams than it allowed) was not the bound
                settled = min(settled, core.peak)
            return Usage(settled, core.peak, core.ceiling, core.throttles, core.adaptive)
