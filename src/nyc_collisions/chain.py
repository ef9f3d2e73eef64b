"""Partition boundaries of a snapshot or a key scan, found by two chains of probes at once.

One chain goes up from the first row (`$order=:id`), the other down from the last
(`$order=:id DESC`); each probe skips one partition's rows from its chain's last boundary and
never more, because a deep `$offset` is slow on the real service. Between the chains lies the
gap (`chain_after`, `chain_before`] that no partition holds yet; every partition is made from
the gap's ends, so none overlaps another, and the last is the gap itself.

A boundary found going down is used only once the server has shown a row between the up
chain's end and it: the next probe up, bounded by it, found one (or, when that probe found
fewer rows than a step, a probe for the first row of the range). Rows deleted meanwhile could
otherwise let the chains cross and two partitions overlap; a boundary not shown to be above is
dropped, and the gap stays as it was. So the partitions going down start a probe after those
going up, and the two chains still start the partitions about twice as early as one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import Field, replace
from typing import Any, ClassVar, Protocol, TypeVar

from .plan import Partition
from .source import DatasetSource


class ChainPlan(Protocol):
    """What the chains read of a plan (a snapshot's `SnapshotPlan`, a key scan's `ScanPlan`)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def partitions(self) -> tuple[Partition, ...]: ...
    @property
    def complete(self) -> bool: ...
    @property
    def planned(self) -> int: ...
    @property
    def step(self) -> int | None: ...
    @property
    def source_count(self) -> int: ...
    @property
    def chain_after(self) -> str | None: ...
    @property
    def chain_before(self) -> str | None: ...
    @property
    def chain_made(self) -> int: ...


PlanT = TypeVar("PlanT", bound=ChainPlan)


class ChainBook(Protocol):
    """Where the chains record each partition before it is used."""

    @property
    def plan(self) -> ChainPlan: ...

    def extend(
        self, lower: str | None, upper: str | None, rows: int, *, down: bool = False
    ) -> Partition: ...


def extended(
    plan: PlanT, lower: str | None, upper: str | None, rows: int, *, down: bool = False
) -> tuple[PlanT, Partition]:
    """`plan` with its next partition, numbered here: found going up (its upper bound is the new
    `chain_after`), going down (`down`: its lower bound is the new `chain_before`), or the last:
    the rest between the two chains (the plan is then complete)."""
    partition = Partition(len(plan.partitions), lower, upper, rows)
    last = (lower, upper) == (plan.chain_after, plan.chain_before)
    grown = replace(
        plan,
        partitions=(*plan.partitions, partition),
        chain_after=upper if not (down or last) else plan.chain_after,
        chain_before=lower if down else plan.chain_before,
        chain_made=plan.chain_made + 1,
        complete=last,
    )
    return grown, partition


def plan_partitions(
    book: ChainBook,
    source: DatasetSource,
    calls: Executor,
    go_on: Callable[[], bool],
    *,
    down_too: bool = True,
) -> Iterator[Partition]:
    """The plan's partitions as their boundaries are found, each recorded in the plan before
    it is yielded; from where the plan's chains ended when it is resumed. `calls` runs the
    probes down beside those up; without `down_too`, only the chain up runs (key scans: at a
    capacity of 3 the probes down, beside the first pages, made them slower)."""
    unproven: str | None = None  # the last boundary found going down, not yet shown above
    while not book.plan.complete and go_on():
        plan = book.plan
        step = plan.step or 1
        after, before = plan.chain_after, plan.chain_before
        left = plan.planned - 1 - plan.chain_made  # partitions to make before the last
        if left <= 0:
            yield book.extend(after, before, _rest(book))
            continue
        bound = unproven if unproven is not None else before
        down: Future[str | None] | None = None
        # one more partition going down only while this round, that one and the last fit
        if down_too and left >= 3 + (unproven is not None):
            down = calls.submit(source.probe_below, bound, step, after)
        found = source.probe(after, step - 1, upper=bound)
        if unproven is not None:
            if found is not None or source.probe(after, 0, upper=unproven) is not None:
                yield book.extend(unproven, before, step, down=True)
                before = unproven
            unproven = None
        if found is None or found == before:
            yield book.extend(after, before, _rest(book))
            return
        yield book.extend(after, found, step)
        unproven = down.result() if down is not None else None


def _rest(book: ChainBook) -> int:
    """The rows thought left for the last partition."""
    plan = book.plan
    return max(0, plan.source_count - (plan.step or 1) * plan.chain_made)
