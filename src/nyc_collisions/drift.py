"""Schema drift: the source's columns are no longer the ones landed, and the record of a change.

Columns are compared as the metadata lists them (`Schema.from_metadata`, the system fields last),
each as (field, type), in order: a column added, dropped, renamed (a drop and an add), retyped
or moved is a change. `update` and `reconcile` then land a fresh snapshot with the new columns
(see `refresh.py`); its commit makes them the manifest's and records a `SchemaChange`
(`Manifest.change_columns`). See docs/design-drift.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .schema import Column


def column_specs(columns: Sequence[Column]) -> list[dict[str, str]]:
    """Columns as the manifest lists them: `{"field", "name", "type"}`."""
    return [{"field": c.field_name, "name": c.name, "type": c.data_type} for c in columns]


def spec_columns(specs: Sequence[dict[str, str]]) -> tuple[Column, ...]:
    return tuple(Column(s["field"], s["type"]) for s in specs)


@dataclass(frozen=True)
class SchemaChange:
    """The source's columns `before` and `after` a change; once landed, when (`at`, UTC) and by
    which snapshot batch (`batch_id`)."""

    before: tuple[Column, ...]
    after: tuple[Column, ...]
    at: str = ""
    batch_id: str = ""

    @classmethod
    def between(cls, before: Sequence[Column], after: Sequence[Column]) -> SchemaChange | None:
        """The change from `before` to `after`, or None when they are the same columns."""
        if [(c.field_name, c.data_type) for c in before] == [
            (c.field_name, c.data_type) for c in after
        ]:
            return None
        return cls(tuple(before), tuple(after))

    @property
    def added(self) -> list[str]:
        old = {c.field_name for c in self.before}
        return [c.field_name for c in self.after if c.field_name not in old]

    @property
    def removed(self) -> list[str]:
        new = {c.field_name for c in self.after}
        return [c.field_name for c in self.before if c.field_name not in new]

    @property
    def retyped(self) -> list[str]:
        old = {c.field_name: c.data_type for c in self.before}
        return [
            c.field_name for c in self.after if old.get(c.field_name, c.data_type) != c.data_type
        ]

    @property
    def reordered(self) -> bool:
        """Whether the columns kept moved relative to one another."""
        old = [c.field_name for c in self.before]
        new = [c.field_name for c in self.after]
        return [f for f in old if f in new] != [f for f in new if f in old]

    def summary(self) -> dict[str, list[str]]:
        """Fields added, removed and retyped (what the handler's result carries)."""
        return {"added": self.added, "removed": self.removed, "retyped": self.retyped}

    def describe(self) -> str:
        """One line: `added weather; removed borough; retyped zip_code (text -> number)`."""
        types = {c.field_name: c.data_type for c in self.before}
        new = {c.field_name: c.data_type for c in self.after}
        parts = []
        if self.added:
            parts.append("added " + ", ".join(self.added))
        if self.removed:
            parts.append("removed " + ", ".join(self.removed))
        if self.retyped:
            parts.append(
                "retyped " + ", ".join(f"{f} ({types[f]} -> {new[f]})" for f in self.retyped)
            )
        if self.reordered:
            parts.append("columns moved")
        return "; ".join(parts)

    def landed(self, at: str, batch_id: str) -> SchemaChange:
        return SchemaChange(self.before, self.after, at, batch_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "batch_id": self.batch_id,
            "added": self.added,
            "removed": self.removed,
            "retyped": self.retyped,
            "reordered": self.reordered,
            "before": column_specs(self.before),
            "after": column_specs(self.after),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SchemaChange:
        """Read back from `to_dict` (added/removed/retyped are derived, not read)."""
        return cls(
            spec_columns(d["before"]),
            spec_columns(d["after"]),
            str(d.get("at", "")),
            str(d.get("batch_id", "")),
        )


def summary_text(summary: dict[str, Any]) -> str:
    """`SchemaChange.summary()` (or `to_dict()`) in words: `added a; removed b; retyped c`."""
    kinds = ("added", "removed", "retyped")
    said = [f"{k} {', '.join(summary[k])}" for k in kinds if summary.get(k)]
    if summary.get("reordered") or not said:
        said.append("columns moved")
    return "; ".join(said)
