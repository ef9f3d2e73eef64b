"""`python -m nyc_collisions.cli`: the command line, as `nyc-collisions` runs it."""

from __future__ import annotations

from ..__main__ import main

if __name__ == "__main__":
    main()
