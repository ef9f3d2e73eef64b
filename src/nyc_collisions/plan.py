"""Partitions: split a dataset into `:id` ranges that workers fetch concurrently by keyset paging.

A partition is the range (lower, upper] of `:id` in the server's own order; the first has no
lower bound, the last no upper bound, so the partitions cover every row whatever the server's
id order and whatever changes meanwhile. Boundaries are the `:id`s at evenly spaced positions,
found with one-row probes, each starting after the previous boundary
(`$select=:id&$where=:id > 'b'&$order=:id&$limit=1&$offset=step-1`): so the boundaries increase in
the server's order by construction even while rows are added or deleted, and no probe skips more
than one partition's worth of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Partition:
    index: int
    lower: str | None
    upper: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "lower": self.lower, "upper": self.upper}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Partition:
        return cls(int(d["index"]), d.get("lower"), d.get("upper"))


def partition_count(rows: int, workers: int, page_size: int) -> int:
    """As many partitions as workers, but none smaller than a page."""
    return max(1, min(workers, rows // max(1, page_size)))


def partition_step(rows: int, partitions: int) -> int:
    """Rows per partition: the `$offset` of each boundary probe is `step - 1`."""
    return max(1, -(-rows // partitions))
