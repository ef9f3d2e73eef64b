"""Process-wide tuning for a run of the command or the Lambda handler, in one place.

None of it is applied on import: a program that imports the package keeps its own settings;
and importing this module loads nothing else, so `tune_threads` can run first.
What each setting saves is measured in bench/README.md.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from types import FrameType


def tune_threads() -> None:
    """No OpenBLAS threads (unless `OPENBLAS_NUM_THREADS` is set): numpy, which pyarrow loads,
    would start one per core that spins beside the workers, and nothing here uses BLAS. It must
    run before numpy is first imported."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


_TERMINATED = threading.Event()


def stop_on_sigterm() -> None:
    """SIGTERM (`docker stop`, an ECS task stopping, `kill`, `timeout`) stops a run as Ctrl-C
    does: the pages in flight are dropped, nothing partial is committed, the lease is given
    back, and the command exits 143 (`interrupted_status`); a second SIGTERM ends the process
    at once. Without this, Python ends on the spot and leaves the lease for a later run to take
    over, and as a container's first process it ignores SIGTERM until it is killed. A SIGTERM
    ignored by whoever started the command stays ignored, as Python leaves an ignored SIGINT."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        if _TERMINATED.is_set():
            os._exit(128 + signal.SIGTERM)  # the second: no cleanup waited for
        _TERMINATED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def interrupted_status() -> int:
    """The exit status of a command stopped by a signal: 143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + signal.SIGTERM if _TERMINATED.is_set() else 128 + signal.SIGINT


def tune_allocators() -> None:
    """Allocators for pages that come and go in several threads.

    Arrow allocates with jemalloc (else the system allocator): the others kept what a page freed.
    glibc's malloc (Python's bytes: the few-MiB pieces of each page) keeps blocks up to 16 MiB
    in its heap and holds up to 64 MiB freed, instead of mapping each piece afresh (a page
    fault for every received byte), and uses at most 2 arenas, instead of one per thread that
    each kept its freed pieces for itself.
    """
    import pyarrow as pa  # here: importing this module must not load numpy (`tune_threads`)

    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without jemalloc
        pa.set_memory_pool(pa.system_memory_pool())
    _glibc_malloc(mmap=16 << 20, trim=64 << 20, arenas=2)


def _glibc_malloc(mmap: int, trim: int, arenas: int) -> None:
    """`mallopt(M_MMAP_THRESHOLD)`, `mallopt(M_TRIM_THRESHOLD)` and `mallopt(M_ARENA_MAX)`, as
    glibc's `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` / `MALLOC_ARENA_MAX` would set
    them (those win if set); a no-op on other C libraries."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return
    except (ValueError, OSError):  # not a glibc system
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, mmap)
        mallopt(_M_TRIM_THRESHOLD, trim)
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, arenas)


_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
