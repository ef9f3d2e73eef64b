"""The command group, and every error turned into one line on stderr and an exit status."""

from __future__ import annotations

import functools
import logging
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from .. import __version__
from ..errors import CTRL_C_LINE, Interrupted, NycCollisionsError, UsageError
from ..redact import redact
from ..runtime import interrupted_status, tune_allocators
from ..socrata.answers import CONTROLS

F = TypeVar("F", bound=Callable[..., Any])


def say(text: str) -> None:
    """Print to stderr, with the app token masked should any message ever carry it, and no
    control character (what the source said is in messages) but line breaks and tabs."""
    click.echo(_masked(text).translate(_CONTROLS), err=True)


_CONTROLS = {c: r for c, r in CONTROLS.items() if chr(c) not in "\t\n"}


def _masked(text: str) -> str:
    """`text` with the app token masked, as set and as sent (without the space around it) and
    as a message may spell it (`redact`), and any URL's user and password."""
    raw = os.environ.get("SOCRATA_APP_TOKEN") or ""
    if raw != raw.strip():
        text = text.replace(raw, "***")
    return redact(text, raw)


def echo(text: str) -> None:
    """Print to stdout (results, status) as `say` does to stderr: what the source or the store
    said is in it."""
    click.echo(_masked(text))


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _MaskToken) for f in handler.filters):
            handler.addFilter(_MaskToken())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)


class _MaskToken(logging.Filter):
    """The app token masked in every log line, and control characters out of it, as `say`
    does for the error line (log lines quote the source: column names, its messages)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a record that does not format: logging's handler reports it
            return True
        shown = _masked(text).translate(_CONTROLS)
        if shown != text:
            record.msg, record.args = shown, None
        return True


def handle_errors(f: F) -> F:
    """Errors -> one clear line on stderr and a non-zero exit; anything unforeseen too, with
    its traceback only under -v."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except Interrupted as exc:
            say(f"nyc-collisions: {exc}")
            sys.exit(interrupted_status())
        except KeyboardInterrupt:
            say(CTRL_C_LINE)
            sys.exit(interrupted_status())
        except UsageError as exc:
            say(f"nyc-collisions: error: {exc}")
            sys.exit(2)
        except NycCollisionsError as exc:
            say(f"nyc-collisions: error: {exc}")
            sys.exit(1)
        except BrokenPipeError as exc:
            if not _stdout_closed():
                _unexpected(exc, bool(kwargs.get("verbose")))
            # the reader of the output went away (`status | head -1`): what it read is what it
            # wanted; quietly, with the status of a program the pipe's signal ended
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
        except Exception as exc:
            _unexpected(exc, bool(kwargs.get("verbose")))

    return wrapper  # type: ignore[return-value]


def _unexpected(exc: Exception, verbose: bool) -> NoReturn:
    if verbose:
        say(traceback.format_exc().rstrip())
    text = " ".join(str(exc).split()) or "(no message)"
    say(
        f"nyc-collisions: error: unexpected {type(exc).__name__}: {text} "
        "(nothing partial was committed; rerun with -v for the traceback, and please report it)"
    )
    sys.exit(1)


def _stdout_closed() -> bool:
    """Whether standard output is a pipe its reader has closed (and not, say, a socket of the
    source or the store that broke)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


class _NeverRaised(click.UsageError):
    pass


# click >= 8.2 raises this for a group called without a command (8.1 shows its help itself)
_NO_ARGS: type[click.UsageError] = getattr(click.exceptions, "NoArgsIsHelpError", _NeverRaised)


class _Commands(click.Group):
    """click's group, with its usage errors (a bad option value, an unknown option) as one line
    like every other error, instead of a usage block."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        def run() -> Any:
            return super(_Commands, self).main(
                args, prog_name, complete_var, standalone_mode=False, **extra
            )

        if not standalone_mode:
            return run()
        try:
            code = run()
        except _NO_ARGS as exc:  # the bare command: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "nyc-collisions"
            say(f"nyc-collisions: error: {exc.format_message()} (see {where} --help)")
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            say(CTRL_C_LINE)
            sys.exit(interrupted_status())
        sys.exit(code if isinstance(code, int) else 0)


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="nyc-collisions")
def main() -> None:
    """Land NYC Motor Vehicle Collisions open data (crashes, persons, vehicles) from Socrata
    into S3 or a local folder: a streaming, resumable backfill, then daily updates.

    DATASET is crashes, persons, vehicles, or any Socrata dataset id (xxxx-xxxx).
    """
    tune_allocators()
