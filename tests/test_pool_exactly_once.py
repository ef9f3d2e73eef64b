"""The pool, its splits, the chains and the ranges' ends against a source whose rows change before
every request (tests/memsource.py): stops and time budgets at random, then resumes from what was
recorded until the end; every row present throughout lands once, and no row twice."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest

from nyc_collisions import workers
from nyc_collisions.plan import Partition
from tests.memsource import MemSource, MemStore, check, new_plan, rid, run_once


@pytest.mark.parametrize("seed", range(60))
def test_exactly_once_with_changes_stops_and_resumes(seed: int) -> None:
    rng = random.Random(seed)
    rows = rng.choice([0, 1, 5, 60, 300, 900, 2000])
    change = rng.choice([0, 1, 3, 8])
    n = rng.choice([1, 2, 4, 6, 8])
    page = rng.choice([7, 20, 50])
    file_rows = rng.choice([5, 30, 1000])
    cut, pause = rng.choice([0.0, 0.2]), rng.choice([0.0, 0.002])
    source = MemSource(rows, change, seed, cut=cut, pause=pause)
    store = MemStore()
    plan = new_plan(source, n, page)
    store.plan = plan.to_dict()
    finished = False
    for attempt in range(40):
        late = attempt >= 30  # the last runs go to the end
        stop_after = None if late else rng.choice([None, 0.005, 0.02, 0.05, 0.2])
        deadline = None if late or stop_after else rng.choice([None, 0.01, 0.03, 0.1])
        plan, finished = run_once(
            source,
            store,
            plan,
            workers=n,
            page=page,
            file_rows=file_rows,
            stop_after=stop_after,
            deadline=deadline,
        )
        if finished:
            break
    assert finished
    check(source, store)


def test_idle_workers_stay_to_split_the_last_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run with one large range left and four workers: the idle ones split it. A worker
    that took the range was not yet counted active while it set up its fetch, and the others,
    seeing nothing queued, planned nor active, ended for good (the setup slowed down here to
    show it)."""
    source = MemSource(3000, 0, 1, pause=0.002)
    store = MemStore()
    plan = replace(
        new_plan(source, 4, 50), complete=True, partitions=(Partition(0, None, None, 3000),)
    )
    store.plan = plan.to_dict()
    real = workers.PartitionFetch

    def slow_setup(*args: object, **kwargs: object) -> object:
        time.sleep(0.3)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(workers, "PartitionFetch", slow_setup)
    plan, finished = run_once(source, store, plan, workers=4, page=50, file_rows=1000)
    assert finished
    check(source, store)
    assert plan.splits > 0, "3000 rows in one range, 4 workers: no split was ever asked"


def test_a_plan_as_full_as_file_names_can_number_is_not_cut_further(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """File names number partitions in four digits: a plan at that many is neither split for
    an idle worker nor its last queued range cut to a share; the ranges it has land whole."""
    from nyc_collisions import partition

    most = 3
    monkeypatch.setattr(workers, "MAX_PARTITIONS", most)
    monkeypatch.setattr(partition, "MAX_PARTITIONS", most, raising=False)
    source = MemSource(3000, 0, 1, pause=0.01)  # the third range is taken after the plan's read
    store = MemStore()
    parts = (
        Partition(0, None, rid(100), 100),
        Partition(1, rid(100), rid(200), 100),
        Partition(2, rid(200), None, 2800),  # the last queued: much more than a share
    )
    plan = replace(new_plan(source, 2, 50), complete=True, partitions=parts)
    store.plan = plan.to_dict()
    plan, finished = run_once(source, store, plan, workers=2, page=50, file_rows=1000)
    assert finished
    check(source, store)
    assert len(plan.partitions) == most, plan.partitions
