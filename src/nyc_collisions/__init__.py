"""nyc-collisions: land NYC Motor Vehicle Collisions open data into S3 or a local folder."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import export, fetch, read
from .errors import (
    DatasetNotFound,
    DestinationError,
    InvalidAppToken,
    NothingLanded,
    NycCollisionsError,
    SourceError,
    UsageError,
)

__all__ = [
    "DatasetNotFound",
    "DestinationError",
    "InvalidAppToken",
    "NothingLanded",
    "NycCollisionsError",
    "SourceError",
    "UsageError",
    "__version__",
    "export",
    "fetch",
    "read",
]
