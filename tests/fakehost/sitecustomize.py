"""Makes a CLI subprocess look like it runs on another host whose clock is off.

Put this folder on PYTHONPATH and set FAKEHOST_NAME (the host name the process reports) and
FAKEHOST_SKEW (seconds added to its wall clock, `time.time()`). Used by the contention tests to
run "hosts" that disagree about the time, on one machine.
"""

from __future__ import annotations

import os

_name = os.environ.get("FAKEHOST_NAME")
_skew = float(os.environ.get("FAKEHOST_SKEW") or 0)

if _name:
    import socket

    socket.gethostname = lambda: _name

if _skew:
    import time

    _real_time = time.time
    time.time = lambda: _real_time() + _skew
