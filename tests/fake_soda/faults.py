"""Fault injection: a queue of fault specs for the next matching requests, and a seeded random mode.

A spec applies to rows (`/resource/...`) and metadata (`/api/views/...`) requests whose path and
query (raw or URL-decoded) contain `match` (any when None), `times` times (None: until cleared).
Kinds and their knobs:

| kind | effect |
|---|---|
| `429` | 429 throttled; `Retry-After: retry_after` when given (a string is sent as it is) |
| `403_throttle` | 403 with a throttle message (not `permission_denied`) |
| `500`, `502`, `503` | server errors (502 is an HTML gateway page; 503 honours `retry_after`) |
| `202` | 202 `{"message":"processing"}` |
| `html` | an HTML error page with `status` (503 by default, 200 possible) |
| `slow` | `seconds` (2) of extra delay, then the normal answer |
| `stall` | headers, then `seconds` (10) of silence, then the body |
| `reset` | `after_rows` rows (default half the page), part of the next, then a TCP RST |
| `truncate_rows` | `after_rows` rows, then a clean end: a well-formed shorter page (rows only) |
| `truncate_mid` | `after_rows` rows and half of the next, then a clean end |
| `redirect` | `status` (302) to `location` (a base URL) + the request's own path and query |
| `body` | `status` (200) with `body` (empty by default) as `application/json` |
| `bad_row` | JSON row `after_rows` (mid-page; < 0 from the end) is `text` (`null`) + `pad` blanks |
| `bad_header` | a CSV page whose header has `text` after its first field name |
| `duplicate_field` | metadata whose `columns` name `field` (the first column by default) twice |

With `together=N`, a request that drew the fault waits until N requests have drawn it (or 10 s)
and they are answered at once: one event seen by N requests in flight.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

KINDS = (
    "429",
    "403_throttle",
    "500",
    "502",
    "503",
    "202",
    "html",
    "slow",
    "stall",
    "reset",
    "truncate_rows",
    "truncate_mid",
    "redirect",
    "body",
    "bad_row",
    "bad_header",
    "duplicate_field",
)
IMMEDIATE = ("429", "403_throttle", "500", "502", "503", "202", "html", "redirect", "body")
"""Kinds answered at once, instead of the real answer."""
CUTTING = ("reset", "truncate_rows", "truncate_mid")
"""Kinds that cut the body after `after_rows` rows."""
ROWS_ONLY = ("truncate_rows", "bad_row", "bad_header")
"""Kinds that need a rows response (a well-formed shorter metadata document does not exist)."""
METADATA_ONLY = ("duplicate_field",)
"""Kinds that change a metadata document."""


@dataclass(frozen=True)
class Fault:
    kind: str
    times: int | None = 1
    match: str | None = None
    after_rows: int | None = None
    retry_after: float | str | None = None
    seconds: float | None = None
    status: int | None = None
    location: str | None = None
    body: str | None = None
    together: int | None = None
    text: str | None = None
    pad: int | None = None
    field: str | None = None

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Fault:
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fault option(s) {sorted(unknown)}")
        fault = cls(**spec)
        if fault.kind not in KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}; known: {', '.join(KINDS)}")
        if fault.times is not None and fault.times < 1:
            raise ValueError("times must be >= 1 (or None for unlimited)")
        if fault.kind == "redirect" and not fault.location:
            raise ValueError("a redirect needs a location")
        if fault.together is not None and fault.together < 1:
            raise ValueError("together must be >= 1")
        return fault

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "times"}

    def applies(self, target: str, rows: bool) -> bool:
        if (self.kind in ROWS_ONLY and not rows) or (self.kind in METADATA_ONLY and rows):
            return False
        return self.match is None or self.match in target


class FaultPlan:
    """Thread-safe queue of faults plus the random mode; `pick` consumes one per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[Fault] = []
        self._random: tuple[float, list[Fault], random.Random] | None = None
        self._groups: dict[tuple[str, str | None, int], threading.Barrier] = {}

    def add(self, fault: Fault) -> None:
        with self._lock:
            self._queue.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._random = None

    def set_random(
        self, probability: float, kinds: Iterable[str | Mapping[str, Any]], seed: int = 0
    ) -> None:
        specs = [Fault.from_dict({"kind": k} if isinstance(k, str) else k) for k in kinds]
        if not 0 <= probability <= 1 or not specs:
            raise ValueError("random faults need 0 <= probability <= 1 and at least one kind")
        with self._lock:
            self._random = (probability, specs, random.Random(seed))

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.to_dict() for f in self._queue]

    def gather(self, fault: Fault) -> None:
        """Hold a request that drew a `together` fault until that many have (10 s at most)."""
        if not fault.together or fault.together < 2:
            return
        key = (fault.kind, fault.match, fault.together)
        with self._lock:
            group = self._groups.setdefault(key, threading.Barrier(fault.together))
        try:
            group.wait(timeout=10)
        except threading.BrokenBarrierError:
            group.reset()

    def pick(self, target: str, rows: bool) -> Fault | None:
        """The fault to inject into this request, if any (consuming one use of it)."""
        with self._lock:
            for i, fault in enumerate(self._queue):
                if fault.applies(target, rows):
                    if fault.times is not None:
                        if fault.times <= 1:
                            del self._queue[i]
                        else:
                            self._queue[i] = replace(fault, times=fault.times - 1)
                    return fault
            if self._random is not None:
                probability, specs, rnd = self._random
                if rnd.random() < probability:
                    usable = [f for f in specs if f.applies(target, rows)]
                    if usable:
                        return rnd.choice(usable)
        return None
