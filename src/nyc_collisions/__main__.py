"""The `nyc-collisions` command (also `python -m nyc_collisions`).

Loading the CLI takes a fraction of a second (pyarrow, httpx); a Ctrl-C in that time gets the
same one line and exit status 130 as one during a run, not a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("nyc-collisions: interrupted; nothing partial was committed\n")
        sys.exit(130)
    cli()


if __name__ == "__main__":
    main()
