"""This host and its processes: is a process that left something behind still running?"""

from __future__ import annotations

import functools
import os


@functools.cache
def boot_id() -> str:
    """The kernel's id of this boot ("" when unknown): a pid means something only within it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """The start time of process `pid` in clock ticks since boot ("" when unknown): a reused
    pid has another."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def process_gone(pid: int, started: str = "") -> bool:
    """Whether process `pid` of this boot has ended (False when it cannot be told)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return bool(started) and process_start(pid) not in ("", started)
