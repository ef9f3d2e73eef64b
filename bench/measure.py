"""Run one child process and measure it from outside: wall seconds, peak RSS, CPU seconds.

The child runs in its own session (so Ctrl-C in the terminal reaches only the bench, which then
kills the child's whole process group). While it runs, the RSS of the child and all its
descendants is summed every 50 ms with psutil; when it exits, `os.wait4` gives its CPU time
(user + sys, including descendants it waited for).

Peak RSS is the larger of the polled tree sum and, when GNU time is installed, the kernel's
high-water mark of the command (`/usr/bin/time -f %M`), which no sampling can miss. The bench's
own `ru_maxrss` from `wait4` is not used: Linux carries a process's RSS high-water mark across
`execve`, so a child spawned from the (large) bench process would report the bench's size.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

POLL_SECONDS = 0.05
TAIL_CHARS = 2000


def _gnu_time() -> str | None:
    """GNU time, if installed (it understands `-f FORMAT -o FILE`)."""
    path = shutil.which("time", path="/usr/bin:/bin") or None
    if path is None or not os.access(path, os.X_OK):
        return None
    try:
        probe = subprocess.run(
            [path, "-f", "%M", "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if probe.returncode == 0 and probe.stderr.strip().isdigit() else None


_TIME = _gnu_time()


def _read_maxrss_kb(path: Path) -> int:
    try:
        lines = path.read_text(errors="replace").split()
    except OSError:
        return 0
    digits = [x for x in lines if x.isdigit()]
    return int(digits[-1]) if digits else 0


@dataclass
class Measurement:
    """What one child process cost."""

    cmd: list[str]
    wall: float
    peak_rss: int  # bytes
    cpu: float  # user + sys seconds
    returncode: int | None  # None: killed by the bench on timeout or interrupt
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def kill_group(pid: int, grace: float = 5.0, exited: Callable[[], bool] | None = None) -> None:
    """SIGTERM the process group of `pid`; SIGKILL what is left once the leader has exited
    (`exited()`, which should reap it) or after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if exited is not None and exited():
            break
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - TAIL_CHARS))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_measured(
    cmd: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    log_dir: Path,
    name: str,
) -> Measurement:
    """Run `cmd` to completion (or `timeout`), polling its process tree's RSS every 50 ms."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path = log_dir / f"{name}.stdout"
    err_path = log_dir / f"{name}.stderr"
    rss_path = log_dir / f"{name}.maxrss"
    rss_path.unlink(missing_ok=True)
    full = [_TIME, "-f", "%M", "-o", str(rss_path), *cmd] if _TIME else list(cmd)
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.monotonic()
        child = subprocess.Popen(
            full,
            cwd=cwd,
            env=dict(env),
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            ps = psutil.Process(child.pid)
        except psutil.Error:  # already gone
            ps = None
        peak = 0
        timed_out = False
        reaped: list[tuple[int, Any]] = []

        def exited() -> bool:
            if not reaped:
                pid, wait_status, ru = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    reaped.append((wait_status, ru))
            return bool(reaped)

        try:
            while not exited():
                if ps is not None:
                    peak = max(peak, _tree_rss(ps))
                if time.monotonic() - started > timeout:
                    timed_out = True
                    kill_group(child.pid, exited=exited)
                    if not reaped:
                        _, wait_status, ru = os.wait4(child.pid, 0)
                        reaped.append((wait_status, ru))
                    break
                time.sleep(POLL_SECONDS)
        except BaseException:
            kill_group(child.pid, exited=exited)
            if not reaped:
                with contextlib.suppress(ChildProcessError):
                    os.wait4(child.pid, 0)
            child.returncode = -1
            raise
        status, usage = reaped[0]
        wall = time.monotonic() - started
        # the group may have left grandchildren behind (it should not): clean them up
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
    code = os.waitstatus_to_exitcode(status)
    child.returncode = code
    cpu = usage.ru_utime + usage.ru_stime
    maxrss = _read_maxrss_kb(rss_path) * 1024
    return Measurement(
        cmd=list(cmd),
        wall=wall,
        peak_rss=max(peak, maxrss),
        cpu=cpu,
        returncode=None if timed_out else code,
        timed_out=timed_out,
        stdout=_tail(out_path),
        stderr=_tail(err_path),
    )
