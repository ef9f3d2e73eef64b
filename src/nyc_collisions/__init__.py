"""nyc-collisions: land NYC Motor Vehicle Collisions open data into S3 or a local folder."""

from __future__ import annotations

__version__ = "0.1.0"
