"""One exception tree for the whole package.

::

    NycCollisionsError                 every error this package raises on purpose
    ├── UsageError                     bad input from the user (options, dataset names, URLs)
    ├── SourceError                    talking to Socrata failed
    │   ├── DatasetNotFound            404: unknown or retired dataset id
    │   ├── InvalidAppToken            403 permission_denied: check SOCRATA_APP_TOKEN
    │   ├── SourceRejected             another 4xx: the server's own message
    │   ├── SourceUnavailable          retries exhausted (5xx, 429, resets, timeouts, cut bodies)
    │   └── BadResponse                the body is not what SODA sends (HTML page, broken JSON)
    ├── SchemaError                    rows do not fit the dataset's columns (drift, bad numbers)
    ├── DestinationError               the destination cannot be used (missing bucket, access, disk)
    │   └── DestinationBusy            another run holds the dataset's lease
    │       ├── LeaseLost              another run took the lease over from this one
    │       └── ManifestChanged        another run committed since this one read the manifest
    ├── StateError                     what is landed is not in the expected state
    │   ├── NothingLanded              no committed backfill yet (run `backfill` first)
    │   └── AlreadyLanded              a backfill is already committed (use --force)
    └── Interrupted                    stopped by the user or by a time budget before the end

Messages name the dataset, the URL without secrets, the status and a clipped body; never the app
token or AWS credentials.
"""

from __future__ import annotations


class NycCollisionsError(Exception):
    """Base class of every error this package raises on purpose."""


class UsageError(NycCollisionsError):
    """Bad input from the user."""


class SourceError(NycCollisionsError):
    """Talking to the Socrata source failed."""


class DatasetNotFound(SourceError):
    """The dataset id is unknown to the source (HTTP 404)."""


class InvalidAppToken(SourceError):
    """The source rejected the app token (HTTP 403 permission_denied)."""


class SourceRejected(SourceError):
    """The source rejected the request (a 4xx other than throttling)."""


class SourceUnavailable(SourceError):
    """The source kept failing after bounded retries."""


class BadResponse(SourceError):
    """The response body is not what SODA sends (an HTML page, a broken JSON document)."""


class SchemaError(NycCollisionsError):
    """Rows do not fit the dataset's columns."""


class DestinationError(NycCollisionsError):
    """The destination cannot be used."""


class DestinationBusy(DestinationError):
    """Another run holds the dataset's lease at the destination."""


class LeaseLost(DestinationBusy):
    """This run lost its lease (another run took it over); it stopped before committing more."""


class ManifestChanged(DestinationBusy):
    """The manifest changed since this run read it; nothing more of this run was committed."""


class StateError(NycCollisionsError):
    """What is landed is not in the state the command needs."""


class NothingLanded(StateError):
    """No backfill has been committed at the destination yet."""


class AlreadyLanded(StateError):
    """A backfill is already committed at the destination."""


class Interrupted(NycCollisionsError):
    """The run stopped before its end (Ctrl-C or a time budget); committed work is kept."""


class RetriesStopped(NycCollisionsError):
    """A request was not tried again because the run had to stop (its time budget, a stop, a
    lost lease) while the source was failing; the run stops there, as at a page's end."""


class WaitStopped(NycCollisionsError):
    """The run had to stop (its time budget, a stop) while it watched a stale lease before
    taking it over: nothing was done, and a rerun watches it again."""


# What the command prints for a Ctrl-C that reached it before or outside a run's own handling.
CTRL_C_LINE = "nyc-collisions: interrupted; nothing partial was committed"
