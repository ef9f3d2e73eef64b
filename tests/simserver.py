"""A simulated source for the concurrency controller's tests: virtual time, no threads, no sleeps.

`SimSource` serves `capacity` requests at once. Queueing (`shared=False`): the others wait in
line; a served request's first byte comes `base` seconds after it got a slot, then its body
streams at `rate` bytes a second. Sharing (`shared=True`): every request is served at once, but
the streams share `capacity x rate` between them. `run` drives a `Controller` with `streams` clients
that always want to send another page, stepping time by `dt`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nyc_collisions.socrata.vegas import Controller


@dataclass
class _Req:
    rid: int
    nbytes: int
    start: float | None = None
    first: float | None = None
    left: float = 0.0


@dataclass
class SimSource:
    capacity: int
    base: float = 0.15
    rate: float = 8e6  # bytes a second per served stream
    page: int = 40 << 20  # bytes per page
    shared: bool = False
    throttle_at: set[int] = field(default_factory=set)  # request numbers answered 429
    queue: deque[_Req] = field(default_factory=deque)
    serving: list[_Req] = field(default_factory=list)
    peak: int = 0
    sent: int = 0

    def step(self, core: Controller, now: float, dt: float) -> None:
        """Move time to `now`: first bytes, progress and ends, reported to `core`."""
        if self.shared:
            while self.queue:
                r = self.queue.popleft()
                r.start = now
                self.serving.append(r)
        else:
            while self.queue and len(self.serving) < self.capacity:
                r = self.queue.popleft()
                r.start = now
                self.serving.append(r)
        share = self.rate
        if self.shared:
            streaming = sum(1 for r in self.serving if r.first is not None)
            share = self.rate * self.capacity / max(self.capacity, streaming)
        for r in list(self.serving):
            assert r.start is not None
            if r.first is None and now >= r.start + self.base:
                r.first = now
                core.first_byte(r.rid, now)
            elif r.first is not None:
                r.left -= share * dt
                if r.left <= 0:
                    self.serving.remove(r)
                    core.finished(r.rid, now, r.nbytes)

    def send(self, core: Controller, now: float) -> None:
        self.sent += 1
        rid = core.sent(now, sample=True)
        if self.sent in self.throttle_at:
            core.throttled(core.epoch, now)  # answered 429 at once (its epoch is the current)
            core.finished(rid, now, None)
            return
        self.queue.append(_Req(rid, self.page, left=float(self.page)))
        self.peak = max(self.peak, len(self.queue) + len(self.serving))


def run(
    core: Controller,
    source: SimSource,
    seconds: float,
    streams: int | None = None,
    dt: float = 0.01,
    each: Callable[[float], None] | None = None,
) -> list[int]:
    """Drive `core` for `seconds` of virtual time; returns the limit at every step."""
    streams = core.ceiling if streams is None else streams
    limits = []
    now = 0.0
    steps = int(seconds / dt)
    for _ in range(steps):
        now += dt
        if each is not None:
            each(now)
        source.step(core, now, dt)
        core.tick(now)
        while len(core.requests) < streams and core.admits():
            source.send(core, now)
        limits.append(core.limit)
    return limits
