"""Partitions: split a dataset into `:id` ranges that workers fetch concurrently by keyset paging.

A partition is the range (lower, upper] of `:id` in the server's own order; the first has no
lower bound, the last no upper bound, so the partitions cover every row whatever the server's
id order and whatever changes meanwhile. Boundaries are the `:id`s at evenly spaced positions,
found with one-row probes, each starting from the previous boundary of its chain
(`$select=:id&$where=:id > 'b'&$order=:id&$limit=1&$offset=step-1` going up, `$order=:id DESC`
going down; see `chain.py`): so the boundaries follow the server's order by construction even
while rows are added or deleted, and no probe skips more than one partition's worth of rows.

A partition can be split while it is fetched: its worker stops where it is (after the last row
it landed, `after`), probes the `:id` half its remaining rows further (`split_offset`), and the
range beyond that boundary becomes a new partition. The split is recorded in the plan before
either half is fetched, so a rerun resumes both.

The plan (`SnapshotPlan`, stored as `runs/<batch>/plan.json`) and where each partition goes on
(`ResumePoint`, from the run's part records) are typed here; the dicts exist only at storage.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import StateError

if TYPE_CHECKING:
    from .state import PartRecord

MAX_PARTITIONS = 10_000  # data files are named part-PPPP-SSSSSS
MIN_SPLIT_ROWS = 16


@dataclass(frozen=True)
class Partition:
    index: int
    lower: str | None
    upper: str | None
    rows: int | None = None  # rows it held when planned or split (an estimate: rows change)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "lower": self.lower, "upper": self.upper}
        if self.rows is not None:
            d["rows"] = self.rows
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Partition:
        rows = d.get("rows")
        return cls(
            int(d["index"]), d.get("lower"), d.get("upper"), None if rows is None else int(rows)
        )

    def split_at(self, bound: str, index: int, kept: int, rest: int) -> tuple[Partition, Partition]:
        """This partition up to `bound` (holding `kept` rows in all), and a new one (`index`)
        from `bound` to where this one ended (`rest` rows)."""
        return replace(self, upper=bound, rows=kept), Partition(index, bound, self.upper, rest)


@dataclass(frozen=True)
class ResumePoint:
    """Where a partition goes on: after `after` (None: from its lower bound), with file number
    `next_seq`; `done` once its end was confirmed; `rows` landed in its committed files."""

    after: str | None = None
    next_seq: int = 0
    done: bool = False
    rows: int = 0


def resume_points(records: Iterable[PartRecord]) -> dict[int, ResumePoint]:
    """Per partition, where a run goes on from its part records (in (partition, seq) order)."""
    points: dict[int, ResumePoint] = {}
    for rec in records:
        point = points.get(rec.partition, ResumePoint())
        if rec.seq >= point.next_seq:
            point = replace(point, after=rec.last_id, next_seq=rec.seq + 1)
        points[rec.partition] = replace(
            point, done=point.done or rec.done, rows=point.rows + rec.rows
        )
    return points


@dataclass(frozen=True)
class SnapshotPlan:
    """A snapshot run's plan (`runs/<batch>/plan.json`): what the source said when it started,
    and the partitions, added as the planner finds their boundaries and split as they are
    fetched. The planner's chains (see `chain.py`) have made `chain_made` partitions, holding
    the rows up to `chain_after` and those after `chain_before` (None: none yet that side)."""

    batch_id: str
    dataset_id: str
    key: str
    format: str
    columns: tuple[tuple[str, str], ...]
    started: str
    source_count: int
    max_updated_at: str | None
    rows_updated_at: int | None
    page_size: int
    planned: int
    step: int | None  # None: a plan from before steps were kept
    partitions: tuple[Partition, ...] = ()
    complete: bool = False
    splits: int = 0
    chain_after: str | None = None
    chain_made: int = 0
    chain_before: str | None = None

    def fits(self, fmt: str, columns: tuple[tuple[str, str], ...], key: str | None) -> bool:
        """Whether a run landing `fmt` with `columns` (and `key`, None: any) can go on with it."""
        return self.format == fmt and self.columns == columns and key in (None, self.key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "snapshot",
            "batch_id": self.batch_id,
            "dataset_id": self.dataset_id,
            "key": self.key,
            "format": self.format,
            "columns": [list(c) for c in self.columns],
            "started": self.started,
            "source_count": self.source_count,
            "max_updated_at": self.max_updated_at,
            "rows_updated_at": self.rows_updated_at,
            "page_size": self.page_size,
            "planned": self.planned,
            "step": self.step,
            "complete": self.complete,
            "splits": self.splits,
            "partitions": [p.to_dict() for p in self.partitions],
            "chain": chain_doc(self.chain_after, self.chain_before, self.chain_made),
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str) -> SnapshotPlan:
        try:
            if doc.get("kind") != "snapshot":
                raise ValueError(f"kind is {doc.get('kind')!r}")
            step = doc.get("step")
            parts = tuple(Partition.from_dict(p) for p in doc["partitions"])
            if step is not None:  # planned before rows were kept: each held a step
                rows = int(step)
                parts = tuple(replace(p, rows=rows) if p.rows is None else p for p in parts)
            after, before, made = chain_ends(doc.get("chain"), parts)
            updated = doc.get("rows_updated_at")
            return cls(
                batch_id=str(doc["batch_id"]),
                dataset_id=str(doc["dataset_id"]),
                key=str(doc["key"]),
                format=str(doc["format"]),
                columns=tuple((str(f), str(t)) for f, t in doc["columns"]),
                started=str(doc["started"]),
                source_count=int(doc["source_count"]),
                max_updated_at=doc.get("max_updated_at"),
                rows_updated_at=None if updated is None else int(updated),
                page_size=int(doc["page_size"]),
                planned=int(doc.get("planned", len(parts))),
                step=None if step is None else int(step),
                partitions=parts,
                complete=bool(doc["complete"]),
                splits=int(doc.get("splits", 0)),
                chain_after=after,
                chain_made=made,
                chain_before=before,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{where}: a corrupt backfill plan ({exc})") from exc


def chain_doc(after: str | None, before: str | None, made: int) -> dict[str, Any]:
    """The planner's chains' ends as a plan or a scan record stores them (see `chain.py`)."""
    return {"after": after, "before": before, "made": made}


def chain_ends(doc: Any, parts: tuple[Partition, ...]) -> tuple[str | None, str | None, int]:
    """(after, before, made) from `chain_doc`; from a record without one (before the chains),
    the partitions are the chain up and nothing was planned from the top."""
    if isinstance(doc, dict):
        return doc.get("after"), doc.get("before"), int(doc.get("made", 0))
    return (parts[-1].upper if parts else None), None, len(parts)


def partition_count(rows: int, workers: int, page_size: int) -> int:
    """As many partitions as workers, but none smaller than a page."""
    return max(1, min(workers, rows // max(1, page_size)))


def partition_step(rows: int, partitions: int) -> int:
    """Rows per partition: the `$offset` of each boundary probe is `step - 1`."""
    return max(1, -(-rows // partitions))


def min_split_rows(first_byte: float | None, row_seconds: float | None, page_size: int) -> int:
    """The fewest rows left in a partition that are worth a split.

    A split costs about three first bytes (the probe, the page the partition asks again, the
    new partition's first page) and gains the time to stream half the rows left; it is taken
    when that half takes at least four first bytes, so that the tail does not fill with pieces
    that cost as much as they give. Before both are measured, a quarter page.
    """
    if not first_byte or not row_seconds:
        return max(MIN_SPLIT_ROWS, page_size // 4)
    return max(MIN_SPLIT_ROWS, int(8 * first_byte / row_seconds))


def split_offset(remaining: int) -> int:
    """The rows a split partition keeps: the first half of those it has left."""
    return max(1, remaining // 2)
