"""A run's stop and deadline as the client's requests see them.

A run that has to stop (its `--max-seconds`, the Lambda's deadline, a failure in another worker)
does not wait out retries: a retry's pause ends at once, and a request the source holds silent
times out soon after the deadline rather than after the whole read timeout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import httpx

RETRY_TICK = 0.1  # seconds between looks at `stopping` while a retry waits
DEADLINE_GRACE = 1.0  # seconds of silence a request is allowed past the run's deadline


def _never() -> bool:
    return False


class RunStop:
    """Whether the run is stopping, and its deadline (`time.monotonic()`), while one is set."""

    def __init__(self) -> None:
        self.stopping: Callable[[], bool] = _never
        self.deadline: float | None = None

    @contextlib.contextmanager
    def during(self, stopping: Callable[[], bool], deadline: float | None) -> Iterator[None]:
        """`stopping` and `deadline` hold while in it; what held before comes back after."""
        before = self.stopping, self.deadline
        self.stopping, self.deadline = stopping, deadline
        try:
            yield
        finally:
            self.stopping, self.deadline = before

    def timeout(self, read: float, connect: float) -> httpx.Timeout:
        """The timeouts, the silence allowed cut to the deadline and a grace."""
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            read = min(read, max(DEADLINE_GRACE, left + DEADLINE_GRACE))
        return httpx.Timeout(read, connect=connect)

    def lingering(self, seconds: float) -> float:
        """`seconds`, but never past the deadline: a stopping run's last requests (its commit,
        the Lambda's lag) are not held up by the slot of one it gave up on."""
        if self.deadline is None:
            return seconds
        return min(seconds, max(0.0, self.deadline - time.monotonic()))

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds` before a retry; False (at once) when the run has to stop."""
        end = time.monotonic() + seconds
        while not self.stopping():
            left = end - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(RETRY_TICK, left))
        return False
