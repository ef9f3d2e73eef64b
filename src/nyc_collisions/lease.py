"""The lease: at most one run writes a dataset at a destination, whatever its host or clock.

`<dataset>/lock.json` names the run that holds the lease. It is only ever written with
conditional writes (`Storage.put_if`), so of two runs that race for it exactly one wins:

- take: create it if absent (S3 `If-None-Match: *`);
- renew: every TTL/4 the holder rewrites it, with the next `beat`, on its own version
  (`If-Match`): its version keeps changing while the holder lives. A renewal refused because
  another run took over, or none confirmed for TTL/2, stops the run before it commits more;
- take over: a waiting run watches the lease; when its version has not changed for a whole TTL
  on the waiter's own monotonic clock, its holder is gone (or hung) and the waiter replaces
  exactly that version. No host's wall clock is compared with another's. A holder of this very
  host whose process is gone (pid and start time) is taken over at once;
- release: delete it if it is still at our version.

The holder commits (`check`) only within TTL/4 of a renewal it saw succeed, counted from before
that renewal was sent, while a waiter takes over no sooner than a whole TTL after it saw that
version: a commit cannot land after a take-over unless a request is delayed by over 3/4 TTL.

A second run is told at once that the dataset is busy when the lease was written less than TTL/2
ago by the store's own clock (S3's `Date` against `Last-Modified`, a folder's file times): a live
holder renews every TTL/4. Otherwise it watches: busy as soon as the lease changes, taken over
when it has not changed for a whole TTL.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson

from .errors import (
    DestinationBusy,
    DestinationError,
    Interrupted,
    LeaseLost,
    StateError,
    UsageError,
    WaitStopped,
)
from .host import boot_id, process_gone, process_start
from .sink.storage import Storage, Versioned

logger = logging.getLogger(__name__)

DEFAULT_TTL = 120.0
MAX_TTL = 3600.0  # a taker watches a stale lease this long at most, whatever its file says
TTL_ENV = "NYC_COLLISIONS_LEASE_TTL"


def lease_ttl() -> float:
    """The TTL of the leases this process takes (`NYC_COLLISIONS_LEASE_TTL`, seconds)."""
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_TTL
    try:
        ttl = float(raw)
    except ValueError:
        raise UsageError(f"{TTL_ENV}={raw!r} is not a number of seconds") from None
    if not 0.5 <= ttl <= MAX_TTL:
        raise UsageError(f"{TTL_ENV}={raw!r}: give between 0.5 and {MAX_TTL:.0f} seconds")
    return ttl


@dataclass(frozen=True)
class Holder:
    """What `lock.json` says: who holds the lease, and how often it promises to renew it."""

    token: str
    command: str
    host: str
    boot: str
    pid: int
    started: str  # the process's start time on its host (a reused pid has another)
    user: str
    since: str
    ttl: float
    beat: int = 0

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Holder:
        """Read a lease, also one written by an earlier version (no `ttl`, an `expires`)."""
        try:
            doc = orjson.loads(data)
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            token = _field(doc, "token", str, required=True)
            pid = _field(doc, "pid", int, required=True)
            ttl = float(_field(doc, "ttl", int | float) or DEFAULT_TTL)
            _field(doc, "expires", int | float)  # an earlier version's: only checked
            if pid <= 0 or not 0 < ttl <= MAX_TTL:
                raise ValueError(f"pid {pid}, ttl {ttl}")
            return cls(
                token=token,
                command=str(doc.get("command", "?")),
                host=str(doc.get("host", "?")),
                boot=str(doc.get("boot", "")),
                pid=pid,
                started=str(doc.get("started", "")),
                user=str(doc.get("user", "?")),
                since=str(doc.get("since", "?")),
                ttl=ttl,
                beat=_field(doc, "beat", int) or 0,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StateError(
                f"{where}: not a lease this tool can read ({type(exc).__name__}: {exc}); if no "
                "run is writing this dataset, delete the file and run again"
            ) from exc

    def describe(self) -> str:
        return f"{self.command} on {self.host} pid {self.pid} since {self.since}"

    def is_gone_here(self) -> bool:
        """Whether this holder is a process of this host (since its boot) that no longer runs."""
        if not self.boot or self.host != socket.gethostname() or self.boot != boot_id():
            return False
        return process_gone(self.pid, self.started)


class Lease:
    """Holds a dataset's lease for a `with` block, renewing it in the background.

    A lost lease sets `stop` (the run's workers end) and is raised as `LeaseLost` when the block
    ends; `check()` raises it at once, before a commit.
    """

    def __init__(
        self,
        storage: Storage,
        folder: str,
        command: str,
        stop: threading.Event | None = None,
        deadline: float | None = None,  # `time.monotonic()` value a watch gives up at
    ) -> None:
        self.storage = storage
        self.deadline = deadline
        self.key = f"{folder}/lock.json"
        self.where = f"{storage.url}/{self.key}"
        self.command = command
        self.stop = stop
        self.ttl = lease_ttl()
        self._holder: Holder | None = None
        self._version = ""
        self._confirmed = 0.0  # `_holder_clock` time at which the last confirmed renewal was sent
        self._lost: str | None = None
        self._failed = False
        self._finished = False
        self._io = threading.Lock()  # one write of the lease at a time: renewer, check, release
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> str | None:
        return self._lost

    # -- taking it ------------------------------------------------------------------------------
    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._renewing, daemon=True, name="lease")
        self._thread.start()
        return self

    def acquire(self) -> None:
        """Take the lease, or raise `DestinationBusy` while another run holds it."""
        self.storage.check_conditional()
        mine = Holder(
            token=uuid.uuid4().hex,
            command=self.command,
            host=socket.gethostname(),
            boot=boot_id(),
            pid=os.getpid(),
            started=process_start(os.getpid()),
            user=_user(),
            since=_utc_now(),
            ttl=self.ttl,
        )
        for _attempt in range(5):
            sent = _holder_clock()
            version = self.storage.put_if(self.key, mine.to_bytes(), expect=None)
            if version is not None:
                self._took(mine, version, sent)
                return
            got = self.storage.get_versioned(self.key, with_age=True)
            if got is None:
                continue  # released meanwhile: try again
            held = Holder.from_bytes(got.data, self.where)
            if held.is_gone_here():
                logger.warning(
                    "%s: taking over the lease of a run that is gone (%s)",
                    self.where,
                    held.describe(),
                )
            elif got.age is not None and got.age < held.ttl / 2:
                raise self._busy(held)
            else:
                seen = self._watch(got, held)
                if seen is None:
                    continue
            mine = replace(mine, since=_utc_now())
            sent = _holder_clock()
            version = self.storage.put_if(self.key, mine.to_bytes(), expect=got.version)
            if version is None:
                raise DestinationBusy(
                    f"{self.where}: another run took over the lease first; wait for it to end"
                )
            self._took(mine, version, sent)
            return
        raise DestinationBusy(f"{self.where}: the lease kept changing hands; try again")

    def _watch(self, got: Versioned, held: Holder) -> Versioned | None:
        """Wait until the lease changes (busy), vanishes (None) or stays as it is for a whole
        TTL on this process's monotonic clock (returned: its holder is gone); `WaitStopped` at
        the run's deadline or stop, whichever comes first."""
        since = "" if got.age is None else f", last written {got.age:.0f}s ago by the store's clock"
        logger.warning(
            "%s: held by %s%s; watching it for up to %.0fs: busy if it is renewed, taken over "
            "if not",
            self.where,
            held.describe(),
            since,
            held.ttl,
        )
        end = time.monotonic() + held.ttl
        while (now_t := time.monotonic()) < end:
            if (self.stop is not None and self.stop.is_set()) or (
                self.deadline is not None and now_t >= self.deadline
            ):
                raise WaitStopped(
                    f"{self.where}: stopped before the end (time budget or stop) while watching "
                    f"the lease of {held.describe()} before taking it over; a rerun goes on"
                )
            wake = min(end, self.deadline if self.deadline is not None else end)
            time.sleep(max(0.0, min(1.0, held.ttl / 8, wake - now_t)))
            now = self.storage.get_versioned(self.key)
            if now is None:
                return None
            if now.version != got.version:
                raise self._busy(Holder.from_bytes(now.data, self.where), "renewed it")
        return got

    def _busy(self, held: Holder, what: str = "") -> DestinationBusy:
        detail = f"; it {what}" if what else ""
        return DestinationBusy(
            f"{self.where}: another run holds the lease ({held.describe()}{detail}); "
            "wait for it to end"
        )

    def _took(self, holder: Holder, version: str, sent: float) -> None:
        self._holder, self._version, self._confirmed = holder, version, sent

    # -- keeping it -----------------------------------------------------------------------------
    def _renewing(self) -> None:
        while True:
            due = self._confirmed + self.ttl / 4 - _holder_clock()
            wait = self.ttl / 16 if self._failed else max(0.0, due)
            if self._done.wait(wait):
                return
            try:
                self._renew()
                self._failed = False
            except LeaseLost:
                return
            except (DestinationError, OSError) as exc:
                self._failed = True
                unconfirmed = _holder_clock() - self._confirmed
                logger.warning("%s: could not renew the lease: %s", self.where, exc)
                if unconfirmed > self.ttl / 2:
                    self._lose(f"could not renew it for {unconfirmed:.0f}s ({exc})")
                    return

    def _renew(self) -> None:
        with self._io:
            if self._lost is not None:
                raise LeaseLost(self._lost)
            assert self._holder is not None
            holder = replace(self._holder, beat=self._holder.beat + 1)
            sent = _holder_clock()
            version = self.storage.put_if(self.key, holder.to_bytes(), expect=self._version)
            if version is None:
                self._lose("another run took it over (this run had not renewed it for a TTL)")
                raise LeaseLost(self._lost or "")
            self._took(holder, version, sent)

    def _lose(self, why: str) -> None:
        self._lost = (
            f"{self.where}: lost the lease: {why}; this run stopped before committing more, "
            "run it again"
        )
        logger.warning("%s", self._lost)
        if self.stop is not None:
            self.stop.set()

    def check(self) -> None:
        """Before a commit or a deletion: raise `LeaseLost` unless the lease is surely ours now
        (renewed within TTL/4, or renewed here and now)."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        if _holder_clock() - self._confirmed > self.ttl / 4:
            self._renew()

    def finished(self) -> None:
        """The run has committed all it will: losing the lease from now on only ends its
        cleanup (`tidy`), and is not the run's failure."""
        self._finished = True

    # -- giving it back ---------------------------------------------------------------------------
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._lost is None and isinstance(exc, Exception) and not self._still_mine():
            self._lose("another run took it over")
        if self._lost is None:
            self._release()
            return
        if exc is None and self._finished:
            return
        if exc is None or (
            isinstance(exc, Exception) and not isinstance(exc, Interrupted | LeaseLost)
        ):
            raise LeaseLost(self._lost) from exc

    def _still_mine(self) -> bool:
        try:
            now = self.storage.get_versioned(self.key)
        except DestinationError:
            return True  # cannot tell: the run's own error is the better message
        return now is not None and now.version == self._version

    def _release(self) -> None:
        with self._io:
            try:
                if not self.storage.delete_if(self.key, expect=self._version):
                    logger.warning("%s: the lease had been taken over by another run", self.where)
            except DestinationError as exc:
                logger.warning(
                    "%s: could not release the lease (%s); the next run takes it over",
                    self.where,
                    exc,
                )


def _field(doc: dict[str, Any], name: str, kind: Any, required: bool = False) -> Any:
    value = doc.get(name)
    if value is None:
        if required:
            raise KeyError(name)
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} is {value!r}")
    return value


# The holder's clock counts the time its host was suspended (a laptop's lid closed): on Linux
# `time.monotonic()` does not, so a holder that woke after a take-over would trust for TTL/4 a
# renewal made before it slept. A waiter's clock may lag (it only waits longer).
_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


def _holder_clock() -> float:
    return time.monotonic() if _BOOTTIME is None else time.clock_gettime(_BOOTTIME)


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"


__all__ = ["DEFAULT_TTL", "Holder", "Lease", "lease_ttl"]
