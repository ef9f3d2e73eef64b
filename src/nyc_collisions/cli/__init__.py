"""The command line: parse options, call the orchestrator, print. Errors become one clear line.

- `app.py`: the command group, and errors turned into one line and an exit status;
- `options.py`: the options commands share (where the source and the destination are, how a
  run goes), each defined once, and the typed record they make;
- `landing.py`: the commands that write (backfill, update, reconcile, compact);
- `reading.py`: the commands that read (export, status, verify);
- `summary.py`: what the commands print (a summary after a write, a status, a mismatch).
"""

from __future__ import annotations

from . import landing, reading  # noqa: F401  (the commands join the group as they load)
from .app import main

__all__ = ["main"]
