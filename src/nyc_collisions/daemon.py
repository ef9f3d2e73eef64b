"""Calls on daemon threads, which a stop leaves behind (`DaemonCalls`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class DaemonCalls(Executor):
    """Each call on a daemon thread of its own: the counts that end ranges, the probes of the
    chain down, a run's first aggregate, an S3 part's upload. A request the source or S3 holds
    (or never answers) is left behind on a stop: nothing waits for it, not even the
    interpreter's exit, as it would for a `ThreadPoolExecutor`'s threads. Callers bound how
    many run at once."""

    def __init__(self, name: str = "source-call") -> None:
        self.name = name

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()

        def call() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=call, daemon=True, name=self.name).start()
        return future
