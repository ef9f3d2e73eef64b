"""The `nyc-collisions` command (also `python -m nyc_collisions`).

Loading the CLI takes a fraction of a second (pyarrow, httpx); a Ctrl-C (or SIGTERM) in that
time gets the same one line and exit status as one during a run, not a traceback. Python's
cycle collector is off while the modules load, and what loaded is then frozen out of its later
passes, as a long-running process would do (measured in bench/README.md).
"""

from __future__ import annotations

import gc
import sys

from .errors import CTRL_C_LINE
from .runtime import interrupted_status, stop_on_sigterm, tune_threads


def main() -> None:
    tune_threads()
    stop_on_sigterm()
    gc.disable()
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write(CTRL_C_LINE + "\n")
        sys.exit(interrupted_status())
    gc.freeze()
    gc.enable()
    cli()


if __name__ == "__main__":
    main()
