"""The control surface shared by the in-process server (`FakeSoda`) and the admin HTTP client
(`FakeSodaClient`): mutations, faults, stats and the request log, all spelled the same way."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any


class AdminError(Exception):
    """An admin call the server refused (unknown dataset, bad fault spec, ...)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class AdminMethods(ABC):
    @abstractmethod
    def _admin(self, method: str, op: str, payload: dict[str, Any] | None = None) -> Any:
        """Perform one admin operation (the `/__admin/{op}` endpoint) and return its JSON."""

    @abstractmethod
    def rows(self, dataset_id: str) -> list[dict[str, Any]]:
        """Current rows in :id order, JSON-style: null fields omitted, system fields included."""

    def insert(self, dataset_id: str, n: int) -> dict[str, Any]:
        """Add n rows at a new :updated_at; returns {dataset, n, updated_at, ids, keys}."""
        return dict(self._admin("POST", "insert", {"dataset": dataset_id, "n": n}))

    def edit(self, dataset_id: str, n: int) -> dict[str, Any]:
        """Change values of n existing rows, which get a new :updated_at."""
        return dict(self._admin("POST", "edit", {"dataset": dataset_id, "n": n}))

    def delete(self, dataset_id: str, n: int) -> dict[str, Any]:
        """Remove n rows; returns {dataset, n, ids, keys}."""
        return dict(self._admin("POST", "delete", {"dataset": dataset_id, "n": n}))

    def replace(self, dataset_id: str) -> dict[str, Any]:
        """Full replace: every row gets one new :updated_at, values and :id unchanged."""
        return dict(self._admin("POST", "replace", {"dataset": dataset_id}))

    def add_column(
        self, dataset_id: str, field: str, soda_type: str, position: int | None = None
    ) -> dict[str, Any]:
        """A new column (text, number, checkbox or floating_timestamp) at 1-based `position`
        (default last), null in existing rows; inserted and edited rows get values in it.
        Returns {dataset, columns: [[field, type], ...]}."""
        payload = {"dataset": dataset_id, "field": field, "type": soda_type, "position": position}
        return dict(self._admin("POST", "add_column", payload))

    def drop_column(self, dataset_id: str, field: str) -> dict[str, Any]:
        """Remove a column (not the key) from the metadata and every row."""
        return dict(self._admin("POST", "drop_column", {"dataset": dataset_id, "field": field}))

    def retype_column(self, dataset_id: str, field: str, soda_type: str) -> dict[str, Any]:
        """Change a column's type; stored values stay (refused if one does not fit the type),
        inserted and edited rows get values of the new type."""
        payload = {"dataset": dataset_id, "field": field, "type": soda_type}
        return dict(self._admin("POST", "retype_column", payload))

    def move_column(self, dataset_id: str, field: str, position: int) -> dict[str, Any]:
        """Move a column to 1-based `position` in the metadata (rows unchanged)."""
        payload = {"dataset": dataset_id, "field": field, "position": position}
        return dict(self._admin("POST", "move_column", payload))

    def add_fault(
        self, kind: str, times: int | None = 1, match: str | None = None, **kw: Any
    ) -> None:
        """Queue a fault for the next `times` matching requests (see faults.py for kinds)."""
        self._admin("POST", "faults", {"kind": kind, "times": times, "match": match, **kw})

    def clear_faults(self) -> None:
        """Drop queued faults and switch the random mode off."""
        self._admin("DELETE", "faults")

    def random_faults(
        self, probability: float, kinds: Iterable[str | Mapping[str, Any]], seed: int = 0
    ) -> None:
        """Inject a random fault of `kinds` (names or spec dicts) into each request with
        `probability`, from a generator seeded with `seed`."""
        self._admin(
            "POST",
            "faults",
            {"random": {"probability": probability, "kinds": list(kinds), "seed": seed}},
        )

    def stats(self) -> dict[str, Any]:
        """Requests by kind/status/dataset, faults injected by kind, rows and bytes served."""
        return dict(self._admin("GET", "stats"))

    def requests(self) -> list[dict[str, Any]]:
        """Recent rows/metadata requests (newest last), never with the app token."""
        return list(self._admin("GET", "requests"))

    def reset_stats(self) -> None:
        """Zero the stats and empty the request log."""
        self._admin("POST", "reset_stats")
