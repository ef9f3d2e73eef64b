"""This host and its processes: is a process that left something behind still running?"""

from __future__ import annotations

import functools
import hashlib
import os

# a leftover whose writer looks alive goes after this many seconds untouched all the same: its
# pid may be another process's now (a restarted container's entrypoint gets the same one), and
# no run writes or reads one file for a day
LEFTOVER_AGE = 24 * 3600.0


@functools.cache
def boot_id() -> str:
    """This boot and this process's pid namespace, as one id ("" when unknown): a pid means
    something only within both (containers of one host that share its name and boot have
    their own pids; a holder seen from another namespace can never be judged gone by its pid)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return ""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return boot
    return hashlib.blake2b(f"{boot} {namespace}".encode(), digest_size=16).hexdigest()


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
