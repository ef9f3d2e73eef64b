"""Settings read from environment variables, each checked: a bad value is one `UsageError` that
names the variable and says what it must be, never a traceback or a silent default.

An empty variable counts as unset (as `VAR= command` and templates with blank values mean).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import UsageError

DEST = "NYC_COLLISIONS_DEST"
RETRIES = "NYC_COLLISIONS_RETRIES"
RETRY_BASE = "NYC_COLLISIONS_RETRY_BASE"
WIRE = "NYC_COLLISIONS_WIRE"
ALLOW_HTTP = "NYC_COLLISIONS_ALLOW_HTTP"
MAX_CONCURRENCY = "NYC_COLLISIONS_MAX_CONCURRENCY"
MAX_IN_FLIGHT = 64  # requests at once at most, fixed or found (a thread each)
TABLE_ENV = "NYC_COLLISIONS_TABLE"
TABLE_FORMATS = ("delta",)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _raw(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def env_int(name: str, default: int, low: int, high: int) -> int:
    """A whole number from `low` to `high`, or `default` when unset."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise UsageError(f"{name}={raw!r}: must be a whole number from {low} to {high}")
    return value


def env_float(name: str, default: float, low: float, high: float) -> float:
    """A number (seconds, say) from `low` to `high`, or `default` when unset."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also refuses nan
        raise UsageError(f"{name}={raw!r}: must be a number from {low:g} to {high:g}")
    return value


def env_choice(name: str, default: str, choices: Iterable[str]) -> str:
    """One of `choices` (any case), lower-cased; `default` when unset."""
    raw = _raw(name)
    if raw is None:
        return default
    allowed = list(choices)
    if raw.lower() not in allowed:
        raise UsageError(f"{name}={raw!r}: must be one of {', '.join(allowed)}")
    return raw.lower()


def env_flag(name: str) -> bool:
    """A yes/no switch: 1/true/yes/on or 0/false/no/off; off when unset."""
    raw = _raw(name)
    if raw is None:
        return False
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise UsageError(f"{name}={raw!r}: must be 1/true/yes/on or 0/false/no/off")


def user_path(path: str | Path, where: str) -> Path:
    """`path` with a leading `~` or `~user` expanded; `where` names the option it came from
    (`~user` of no user is a usage error, not a traceback)."""
    try:
        return Path(path).expanduser()
    except RuntimeError as exc:
        raise UsageError(f"{where} {str(path)!r}: {exc}") from None


def check_table_format(fmt: str | None, where: str = TABLE_ENV) -> str | None:
    """`--table FORMAT` / NYC_COLLISIONS_TABLE (`where`): `delta`, or None (empty: no table)."""
    if fmt is None or not fmt.strip():
        return None
    value = fmt.strip().lower()
    if value not in TABLE_FORMATS:
        raise UsageError(f"{where} {fmt!r} is not a table format: use {' or '.join(TABLE_FORMATS)}")
    try:
        import deltalake  # noqa: F401
    except ImportError:
        raise UsageError(
            "a delta table needs the deltalake package: pip install 'nyc-collisions[table]' "
            "(the Lambda image: sam build --parameter-overrides Table=delta)"
        ) from None
    return value
