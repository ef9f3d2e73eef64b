"""The options commands share, each defined once, and the typed record they make.

`common` gives every command that talks to the source `--source`, `--allow-http`, `--dest`,
`-v`, `--retries`, `--timeout` and `--wire`; the command receives the source's as one
`SourceSettings` (`source`), `dest` and `verbose`. An option left unset takes its environment
variable when it has one, checked (a bad value is one line, exit 2).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from .. import settings
from ..connect import DEFAULT_RETRIES, DEFAULT_TIMEOUT, MAX_TIMEOUT, SourceSettings
from ..errors import UsageError
from ..job import DEFAULT_FILE_ROWS, DEFAULT_PAGE_SIZE, RunOptions
from ..sink.storage import DEFAULT_LOCAL_DEST
from ..socrata.client import DEFAULT_BASE_URL, WIRES

F = TypeVar("F", bound=Callable[..., Any])

LANDED_KEY_HELP = "The dataset's unique key; if given, it must be the key it was landed with."


class _EnvError(click.ClickException):
    """A bad environment variable found while the options are read: one line, exit 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"nyc-collisions: error: {self.message}", err=True)


def _or_env(read: Callable[[], Any]) -> Callable[..., Any]:
    """Option callback: the value given, else `read()` (a checked environment variable, or the
    default)."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if param.name and ctx.get_parameter_source(param.name) is ParameterSource.DEFAULT:
            try:
                value = read()
            except UsageError as exc:
                raise _EnvError(str(exc)) from None
        return value

    return callback


verbose_option = click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log each request and file (-v), or debug (-vv), to stderr; an unforeseen error with "
    "its traceback.",
)


def dest_option(help_text: str) -> Callable[[F], F]:
    """`--dest DEST` (env NYC_COLLISIONS_DEST)."""
    return click.option(
        "--dest",
        envvar=settings.DEST,
        default=DEFAULT_LOCAL_DEST,
        show_default=True,
        metavar="DEST",
        help=help_text,
    )


_SOURCE_OPTIONS: tuple[Callable[[Any], Any], ...] = (
    click.option(
        "--source",
        envvar="SOCRATA_BASE_URL",
        default=DEFAULT_BASE_URL,
        show_default=True,
        metavar="URL",
        help="Socrata base URL (env SOCRATA_BASE_URL). The app token is read from "
        "the environment variable SOCRATA_APP_TOKEN.",
    ),
    click.option(
        "--allow-http",
        is_flag=True,
        callback=_or_env(lambda: settings.env_flag(settings.ALLOW_HTTP)),
        help="Allow a plain http:// --source on another machine (env "
        "NYC_COLLISIONS_ALLOW_HTTP=1): the app token and the data would travel unencrypted.",
    ),
    dest_option("s3://bucket/prefix or a local folder (env NYC_COLLISIONS_DEST)."),
    verbose_option,
    click.option(
        "--retries",
        type=click.IntRange(1, 100),
        default=DEFAULT_RETRIES,
        show_default=True,
        callback=_or_env(lambda: settings.env_int(settings.RETRIES, DEFAULT_RETRIES, 1, 100)),
        help="Attempts per request before giving up (env NYC_COLLISIONS_RETRIES).",
    ),
    click.option(
        "--timeout",
        type=click.FloatRange(min=0.1, max=MAX_TIMEOUT),
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help="Seconds the source may stay silent before the request is retried.",
    ),
    click.option(
        "--wire",
        type=click.Choice(list(WIRES), case_sensitive=False),
        default="auto",
        show_default=True,
        callback=_or_env(lambda: settings.env_choice(settings.WIRE, "auto", WIRES)),
        help="How rows come from the source: auto = CSV for datasets whose columns CSV "
        "carries exactly (persons, vehicles), JSON otherwise (crashes' location); env "
        "NYC_COLLISIONS_WIRE.",
    ),
)


def common(f: F) -> F:
    """Options every command that talks to the source takes: where the source and the
    destination are, how loud to be. The command gets `source: SourceSettings`, `dest` and
    `verbose`."""

    @functools.wraps(f)
    def gather(
        *args: Any,
        source: str,
        allow_http: bool,
        retries: int,
        timeout: float,
        wire: str,
        **kwargs: Any,
    ) -> Any:
        options = SourceSettings(source, retries, timeout, wire.lower(), allow_http)
        return f(*args, source=options, **kwargs)

    decorated: Any = gather
    for option in _SOURCE_OPTIONS:
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


def key_option(help_text: str) -> Callable[[F], F]:
    """`--key FIELD`: the unique key of a dataset given by id (the manifest's key once landed)."""
    return click.option("--key", default=None, metavar="FIELD", help=help_text)


def concurrency_options(workers_help: str) -> Callable[[F], F]:
    """`--max-concurrency N` (the ceiling of what is found at run time) and `--workers N`."""

    def decorate(f: F) -> F:
        f = click.option(
            "--max-concurrency",
            type=int,
            default=None,
            metavar="N",
            help="Requests in flight at most; how many the source serves is found at run time "
            f"up to this (default 8, env {settings.MAX_CONCURRENCY}).",
        )(f)
        return click.option("--workers", type=int, default=None, metavar="N", help=workers_help)(f)

    return decorate


def format_option(default: str | None, help_text: str) -> Callable[[F], F]:
    """`--format csv|parquet`."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["csv", "parquet"], case_sensitive=False),
        default=default,
        show_default=default is not None,
        help=help_text,
    )


def page_size_option() -> Callable[[F], F]:
    return click.option(
        "--page-size",
        type=int,
        default=DEFAULT_PAGE_SIZE,
        show_default=True,
        help="Rows per request.",
    )


def file_rows_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--file-rows", type=int, default=DEFAULT_FILE_ROWS, show_default=True, help=help_text
    )


def _table_format(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from ..settings import TABLE_ENV, check_table_format

    try:
        if value is not None:
            return check_table_format(value, "--table")
        return check_table_format(os.environ.get(TABLE_ENV), TABLE_ENV)
    except UsageError as exc:
        raise _EnvError(str(exc)) from None


def table_option(f: F) -> F:
    """`--table FORMAT`: keep DEST/<dataset>/table/ equal to the current state (table.py)."""
    return click.option(
        "--table",
        default=None,
        metavar="FORMAT",
        callback=_table_format,
        help="Also keep DEST/<dataset>/table/ equal to the current state as a table of this "
        "format: delta (env NYC_COLLISIONS_TABLE; needs the [table] extra).",
    )(f)


def max_seconds_option(help_text: str) -> Callable[[F], F]:
    return click.option("--max-seconds", type=float, default=None, help=help_text)


def run_options(
    *,
    started: float,
    page_size: int = DEFAULT_PAGE_SIZE,
    file_rows: int = DEFAULT_FILE_ROWS,
    max_seconds: float | None = None,
    **kw: Any,
) -> RunOptions:
    """The `RunOptions` of a command started at `started` (`time.monotonic()`)."""
    if max_seconds is not None and not max_seconds > 0:  # (nan too: it would never stop)
        raise UsageError(f"--max-seconds must be a positive number, not {max_seconds}")
    deadline = started + max_seconds if max_seconds else None
    return RunOptions(page_size=page_size, file_rows=file_rows, deadline=deadline, **kw)
