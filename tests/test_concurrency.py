"""The concurrency controller against a simulated source: virtual time, synthetic latencies, no
sleeps (see tests/simserver.py). What the user sees of it end to end is in test_capacity.py."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter

import pytest

from nyc_collisions.socrata.concurrency import ConcurrencyLimit
from nyc_collisions.socrata.vegas import Controller
from tests.simserver import SimSource, run

CEILING = 8


def settled(limits: list[int]) -> int:
    """The limit held longest over the second half of a run."""
    return Counter(limits[len(limits) // 2 :]).most_common(1)[0][0]


@pytest.mark.parametrize("capacity", [1, 2, 3, 4, 5, 6, 7])
def test_settles_one_above_what_a_queueing_source_serves(capacity: int) -> None:
    """One request waits at the source, so that no slot idles between two pages."""
    core = Controller(CEILING, 4, adaptive=True)
    source = SimSource(capacity)
    limits = run(core, source, 60)
    assert settled(limits) == capacity + 1
    assert set(limits[len(limits) // 2 :]) == {capacity + 1}  # and stays there
    assert source.peak <= CEILING


@pytest.mark.parametrize("capacity", [8, 12, 30])
def test_a_source_that_serves_more_gets_the_ceiling_and_never_more(capacity: int) -> None:
    core = Controller(CEILING, 4, adaptive=True)
    source = SimSource(capacity)
    limits = run(core, source, 30)
    assert max(limits) == CEILING
    assert settled(limits) == CEILING
    assert source.peak == CEILING


def test_it_grows_within_a_second_on_a_source_with_room() -> None:
    """Slow start: growth is earned by first bytes (0.15 s here), not by whole pages (5 s)."""
    core = Controller(CEILING, 4, adaptive=True)
    limits = run(core, SimSource(12), 1.0)
    assert limits[-1] == CEILING


@pytest.mark.parametrize(("before", "after"), [(6, 2), (2, 6), (8, 3)])
def test_it_follows_the_source_when_its_capacity_changes(before: int, after: int) -> None:
    core = Controller(CEILING, 4, adaptive=True)
    source = SimSource(before)

    def change(now: float) -> None:
        if now >= 40:
            source.capacity = after

    limits = run(core, source, 120, each=change)
    assert Counter(limits[2000:4000]).most_common(1)[0][0] == min(before + 1, CEILING)
    assert settled(limits) == min(after + 1, CEILING)


@pytest.mark.parametrize("seconds", [120, 600])
def test_a_source_that_shares_and_slows_down_is_seen(seconds: int) -> None:
    """A source that serves every request at once but streams each more slowly when it has
    more: pages slower than the fastest seen lower the limit, and it stays down (ten minutes
    on too: a slower rate never becomes the normal while pages share the source)."""
    core = Controller(CEILING, 4, adaptive=True)
    source = SimSource(8, shared=True)

    def change(now: float) -> None:
        if now >= 40:
            source.capacity = 2

    limits = run(core, source, seconds, each=change)
    assert max(limits[3000:4000]) == CEILING
    assert max(limits[-3000:]) <= 5


def test_probes_and_counts_teach_it_nothing() -> None:
    """Only pages of rows are latency samples: a slow probe (a deep $offset) is no queue."""
    core = Controller(CEILING, 4, adaptive=True)
    page = core.sent(0.0, sample=True)
    core.first_byte(page, 0.15)
    probe = core.sent(0.0, sample=False)
    core.tick(10.0)
    core.first_byte(probe, 10.0)
    core.finished(probe, 10.1, 31)
    assert core.limit == 4
    assert core.ttfb_min == pytest.approx(0.15)


def test_a_fixed_limit_does_not_adapt() -> None:
    """`--workers 3` on a source that serves one request at a time: 3 in flight, always."""
    core = Controller(3, 4, adaptive=False)
    source = SimSource(1)
    limits = run(core, source, 60)
    assert set(limits) == {3}
    assert source.peak == 3


def test_a_throttle_halves_once_and_growth_is_slow_after() -> None:
    core = Controller(CEILING, 4, adaptive=True)
    source = SimSource(12, throttle_at={40})
    limits = run(core, source, 60)
    assert core.throttles == 1
    at = next(i for i, (a, b) in enumerate(itertools.pairwise(limits)) if b < a)
    assert limits[at + 1] == limits[at] // 2
    # back up by one per GROW_AFTER x limit pages without waiting, not by slow start
    assert all(b - a <= 1 for a, b in itertools.pairwise(limits[at + 1 :]))


def test_threads_never_have_more_in_flight_than_the_ceiling() -> None:
    """Many threads, each asking for a slot and answering at once: the limit grows, but the
    requests in flight never pass the ceiling."""
    limit = ConcurrencyLimit(3, adaptive=True, initial=1)
    peak = 0
    now = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal peak, now
        for _ in range(20):
            with limit.request(sample=True) as ticket:
                with lock:
                    now += 1
                    peak = max(peak, now)
                ticket.first_byte()
                ticket.done(1 << 20)
                with lock:
                    now -= 1

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak <= 3
    assert limit.usage().peak <= 3
    assert limit.in_flight() == 0


def test_a_dropped_page_still_counts_until_the_source_stops_it() -> None:
    """A page given up on (a split) is still served until the source sees the connection
    closed: it holds its slot a while longer, so the ceiling also holds at the source."""
    limit = ConcurrencyLimit(1)
    with limit.request(sample=True) as ticket:
        ticket.linger(60)
    assert limit.in_flight() == 1
    assert not limit._core.admits()


def test_what_it_reports_as_settled_was_in_flight() -> None:
    """A run with fewer streams than its limit allows (two at most here, under a limit of 4)
    reports the requests it had in flight, not a limit it never used."""
    now = [0.0]
    limit = ConcurrencyLimit(CEILING, adaptive=True, initial=4, clock=lambda: now[0])
    for _ in range(10):
        with limit.request(sample=True) as a, limit.request(sample=True) as b:
            now[0] += 0.15
            a.first_byte()
            b.first_byte()
            now[0] += 1.0
            a.done(1 << 20)
            b.done(1 << 20)
    usage = limit.usage()
    assert usage.peak == 2
    assert usage.settled <= usage.peak


def test_an_interrupt_releases_requests_waiting_for_a_slot() -> None:
    """A request the source holds keeps its slot; Ctrl-C must not wait behind it: those waiting
    for a slot are released at once, and a request after the interrupt waits as usual."""
    from nyc_collisions.errors import Interrupted

    limit = ConcurrencyLimit(1)
    held, release = threading.Event(), threading.Event()
    outcome: list[str] = []

    def holder() -> None:
        with limit.request():
            held.set()
            release.wait(30)

    def waiter() -> None:
        try:
            with limit.request():
                outcome.append("admitted")
        except Interrupted:
            outcome.append("interrupted")

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    threads[0].start()
    assert held.wait(10)
    threads[1].start()
    while limit.waiting() < 1:
        time.sleep(0.001)
    limit.interrupt()
    threads[1].join(10)
    assert outcome == ["interrupted"]  # released while the slot was still held
    later = threading.Thread(target=waiter)
    later.start()
    release.set()
    later.join(10)
    threads[0].join(10)
    assert outcome == ["interrupted", "admitted"]


def test_a_freed_slot_goes_to_the_request_waiting_longest() -> None:
    """A thread that ends a request and asks for its next at once must not take the slot it
    freed from a request already waiting: in a backfill, one range's worker then waited for
    slots while the others paged on, and the run ended on that range alone."""
    limit = ConcurrencyLimit(1)
    order: list[str] = []
    holding = threading.Event()

    def busy() -> None:
        for i in range(20):
            with limit.request():
                order.append("busy")
                if i == 0:
                    holding.set()
                    while limit.waiting() < 1:
                        time.sleep(0.001)

    def waiter() -> None:
        with limit.request():
            order.append("waiter")

    first = threading.Thread(target=busy)
    first.start()
    assert holding.wait(10)
    second = threading.Thread(target=waiter)
    second.start()
    first.join(10)
    second.join(10)
    assert order.index("waiter") == 1  # the slot freed first went to the one waiting


def test_a_source_slower_for_every_request_is_the_new_normal() -> None:
    """A source serving 12 at once whose first byte comes 0.3 s after a slot instead of 0.05 s
    (a busier hour): nothing queues, so the limit comes back to the ceiling rather than stay at
    the one request its first slow pages dropped it to."""
    core = Controller(CEILING, 4, adaptive=True)
    source = SimSource(12, base=0.05)

    def slower(now: float) -> None:
        if now >= 20:
            source.base = 0.3

    limits = run(core, source, 200, each=slower)
    assert Counter(limits[1000:2000]).most_common(1)[0][0] == CEILING
    assert Counter(limits[-5000:]).most_common(1)[0][0] == CEILING


def test_the_next_dataset_slower_to_answer_is_not_held_to_the_first_ones_latency() -> None:
    """`backfill crashes persons` shares one limit: persons' pages take 0.3 s to start where
    crashes' took 0.05 s, and stream fewer bytes a second (narrower rows), on a source serving
    12 at once. Persons is not fetched one request at a time for being slower than crashes."""
    core = Controller(CEILING, 4, adaptive=True)
    source = SimSource(12, base=0.05, rate=16e6)
    switched = False

    def next_dataset(now: float) -> None:
        nonlocal switched
        if now >= 30 and not switched:
            switched = True
            core.new_dataset()  # what `ConcurrencyLimit.reset_usage` does at a dataset's start
            source.base, source.rate = 0.3, 6e6

    limits = run(core, source, 150, each=next_dataset)
    assert Counter(limits[2000:3000]).most_common(1)[0][0] == CEILING
    assert Counter(limits[-6000:]).most_common(1)[0][0] == CEILING


@pytest.mark.parametrize("page", [40 << 20, 4 << 20], ids=["40MiB", "4MiB"])
def test_a_queue_that_never_drains_is_not_the_new_normal(page: int) -> None:
    """Ten minutes on a source that serves one request at a time: the page kept waiting there
    waits a whole page every time, which never becomes "nothing waits" (only a page that had
    the source to itself re-bases it)."""
    core = Controller(CEILING, 4, adaptive=True)
    source = SimSource(1, page=page)
    limits = run(core, source, 600)
    assert settled(limits) == 2
    assert source.peak <= 4
