"""The errors a user may see, and the exit codes they map to."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # anything known that went wrong and was explained
    USAGE = 2  # bad arguments (Typer/Click also uses 2)
    NOT_FOUND = 3  # model, repo, file or tag that does not exist
    ACCESS = 4  # gated or private repo, missing token
    NETWORK = 5  # Hub unreachable, offline with nothing cached, HTTP failure
    NO_SPACE = 6  # not enough disk, or the model does not fit in memory
    BAD_MODEL = 7  # not a GGUF, corrupt or unsupported file
    CRASH = 8  # llama.cpp died in a child process (self-test, probe, bench)
    INTERRUPTED = 130  # Ctrl-C
    PIPE = 141  # the reader of stdout went away (`| head`): as a command killed by SIGPIPE


class LocalrunError(Exception):
    """An error with a one-line message for the user and, optionally, a hint: what to do next."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, hint: str | None = None, exit_code: ExitCode | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code


class NotFound(LocalrunError):
    exit_code = ExitCode.NOT_FOUND


class AccessDenied(LocalrunError):
    exit_code = ExitCode.ACCESS


class NetworkError(LocalrunError):
    exit_code = ExitCode.NETWORK


class NoSpace(LocalrunError):
    exit_code = ExitCode.NO_SPACE


class BadModel(LocalrunError):
    exit_code = ExitCode.BAD_MODEL


class EngineCrash(LocalrunError):
    exit_code = ExitCode.CRASH


class Interrupted(LocalrunError):
    """Ctrl-C where there is something useful to say about it (what was kept, how to go on)."""

    exit_code = ExitCode.INTERRUPTED


class UsageError(LocalrunError):
    exit_code = ExitCode.USAGE
