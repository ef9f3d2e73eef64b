"""nyc-collisions: land NYC Motor Vehicle Collisions open data into S3 or a local folder."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from .errors import (
    DatasetNotFound,
    DestinationError,
    InvalidAppToken,
    NothingLanded,
    NycCollisionsError,
    SourceError,
    UsageError,
)

if TYPE_CHECKING:
    from .api import export, fetch, read

_API = ("export", "fetch", "read")


def __getattr__(name: str) -> Any:
    """`fetch`, `read` and `export` load pyarrow and httpx when first used, not on import, so
    the command starts without them and a Ctrl-C while they load is handled (`__main__`)."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
