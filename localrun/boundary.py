"""The one error boundary: known errors become one line on stderr and a documented exit code."""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from localrun.errors import ExitCode, LocalrunError, NoSpace
from localrun.hub.errors import translate_hub_error
from localrun.output import Output

F = TypeVar("F", bound=Callable[..., Any])


def translate(exc: BaseException) -> LocalrunError | None:
    """Map third-party exceptions we know to LocalrunError; None when unknown."""
    if isinstance(exc, LocalrunError):
        return exc
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return NoSpace(
            "no space left on device" + (f": {exc.filename}" if exc.filename else ""),
            hint="free some disk space; an interrupted download resumes on the next run",
        )
    module = type(exc).__module__ or ""
    if module.split(".")[0] in ("huggingface_hub", "httpx"):  # the Hub, and the network under it
        return translate_hub_error(exc)
    return None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout to redirect (tests)
        pass


def boundary(func: F) -> F:
    """Decorate every command: print known errors in one line, map Ctrl-C to 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = os.environ.get("LOCALRUN_DEBUG") == "1"
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except BrokenPipeError:  # `| head`: the reader has all it wants; end quietly, as cat does
            _silence_stdout()
            raise typer.Exit(ExitCode.PIPE) from None
        except KeyboardInterrupt:
            Output.from_env().error("interrupted")
            raise typer.Exit(ExitCode.INTERRUPTED) from None
        except Exception as exc:  # the boundary: everything ends here, explained
            if debug:
                traceback.print_exc()
            known = translate(exc)
            out = Output.from_env()
            if known is not None:
                out.error(known.message, known.hint)
                raise typer.Exit(known.exit_code) from None
            out.error(
                f"unexpected {type(exc).__name__}: {exc}".splitlines()[0],
                None if debug else "run again with LOCALRUN_DEBUG=1 for the traceback, and please report it",
            )
            raise typer.Exit(ExitCode.ERROR) from None

    return wrapper  # type: ignore[return-value]
