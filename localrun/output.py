"""One output policy: data on stdout, everything else on stderr, TTY- and NO_COLOR-aware."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from localrun.errors import UsageError
from localrun.text import safe

if TYPE_CHECKING:  # rich is imported on first use: `--help` must stay fast
    from rich.console import Console
    from rich.text import Text

MESSAGE_LIMIT = 1000  # characters of one error or warning line


# A word for wrapping: what lies between spaces, where a `quoted` span (a command) counts as part
# of the word it is in, spaces and all.
_WORD = re.compile(r"(?:`[^`\n]*`|\S)+")


def word_breaks(plain: str, width: int) -> list[int]:
    """Where to break `plain` so that no line is wider than `width` cells: before a word, never
    inside one (nor inside a `quoted` span); a word wider than a line keeps a line to itself."""
    from rich.cells import cell_len

    breaks: list[int] = []
    start = 0
    for word in _WORD.finditer(plain):
        if word.start() > start and cell_len(plain[start : word.end()]) > width:
            breaks.append(word.start())
            start = word.start()
    return breaks


def isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Whole(str):
    """A value that is data (a path, a command, a URL): Output.fields writes it whole, never
    wrapped or cut with an ellipsis, so that a copy of it from the terminal works."""


@dataclass
class Output:
    """Knows where things go and how they may look. Tests construct it with the flags they need."""

    json: bool = False
    stdout_tty: bool = False
    stderr_tty: bool = False
    color: bool = False
    verbose: bool = False
    _out: Console | None = field(default=None, repr=False)
    _err: Console | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, *, json: bool = False, verbose: bool = False) -> Output:
        stdout_tty, stderr_tty = isatty(sys.stdout), isatty(sys.stderr)
        color = "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
        return cls(json=json, stdout_tty=stdout_tty, stderr_tty=stderr_tty, color=color, verbose=verbose)

    # Consoles are made on first use so that `--help` never pays for them, and so that they
    # write to whatever sys.stdout/sys.stderr are at that moment (pytest and CliRunner swap them).
    @property
    def out(self) -> Console:
        if self._out is None:
            self._out = self._console(sys.stdout, self.stdout_tty)
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            # Messages on a terminal wrap at word boundaries; piped they stay whole lines.
            self._err = self._console(sys.stderr, self.stderr_tty, soft_wrap=not self.stderr_tty)
        return self._err

    def _console(self, file: Any, tty: bool, soft_wrap: bool = True) -> Console:
        from rich.console import Console

        # Piped, a line is as long as it is: rich would otherwise pad and wrap it to 80 columns.
        return Console(
            file=file,
            force_terminal=tty,
            no_color=not self.color,
            highlight=False,
            soft_wrap=soft_wrap,
            width=None if tty else 10_000,
        )

    @property
    def interactive(self) -> bool:
        """Live displays and prompts are allowed: a human is watching stderr and no JSON is asked for."""
        return self.stderr_tty and not self.json

    # -- data (stdout) --------------------------------------------------------------------------
    def data(self, obj: Any) -> None:
        """Machine-readable result: one JSON document on stdout."""
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()

    def json_line(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
        sys.stdout.flush()

    def text(self, piece: str) -> None:
        """Model text: written as is (never interpreted as markup), flushed at once."""
        sys.stdout.write(piece)
        sys.stdout.flush()

    def binary(self, data: bytes) -> None:
        """Binary data (a .npy array) on stdout: refused on a terminal, where it would be noise."""
        if self.stdout_tty:
            raise UsageError("binary output is not written to a terminal", hint="pipe it, or use -o FILE")
        sys.stdout.buffer.write(data)
        sys.stdout.flush()

    def show(self, renderable: Any) -> None:
        """A human-readable result (a table, a report) on stdout."""
        self.out.print(renderable)

    def table(self, table: Any, *, console: Console | None = None) -> None:
        """A rich Table on stdout (or `console`): sized to a terminal; piped, at its natural width with
        no padding at the ends of lines, never cut."""
        console = console or self.out
        if console.is_terminal:
            console.print(table)
            return
        with console.capture() as captured:
            console.print(table)
        console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
        console.file.flush()

    def fields(self, rows: list[tuple[str, str]]) -> None:
        """Label / value lines on stdout. On a terminal prose values wrap at word boundaries under
        themselves; a Whole value (a path) is written whole, to copy; piped, every value is one
        plain line, nothing padded or cut. Values are plain text."""
        from rich.text import Text

        indent = max((len(key) for key, _ in rows), default=0) + 2
        width = self.out.width - indent if self.stdout_tty else 0
        for key, value in rows:
            if isinstance(value, Whole) or width < 20:
                lines = [value]
            else:  # the one word breaker prose uses: a long word (a URL) stays whole
                lines = [line.plain.rstrip() for line in Text(value).divide(word_breaks(value, width))] or [""]
            for i, line in enumerate(lines):
                label = key if i == 0 else ""
                self.show(Text.assemble((label.ljust(indent), "bold"), line) if line else Text(label, style="bold"))

    def columns(self, header: list[str], rows: list[list[str]], *, right: tuple[str, ...] = ()) -> None:
        """Aligned plain columns on stdout, never cut: the first cell of a row (a model name) is
        what you type next, and a rich Table would shrink it to "…". On a terminal too narrow for
        a row, the first cell gets a line of its own (whole, to copy) and the other columns follow
        it, indented, instead of wrapping inside words. Columns named in `right` align right."""
        from rich.text import Text

        def aligned(names: list[str], row: list[str], widths: list[int]) -> str:
            cells = [c.rjust(w) if name in right else c.ljust(w) for name, c, w in zip(names, row, widths)]
            return "  ".join(cells).rstrip()

        widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
        if not self.stdout_tty or sum(widths) + 2 * (len(widths) - 1) <= self.out.width:
            for i, row in enumerate([header, *rows]):
                self.show(Text(aligned(header, row, widths), style="bold" if i == 0 else ""))
            return
        self.show(Text(header[0], style="bold"))
        self.show(Text("  " + aligned(header[1:], header[1:], widths[1:]), style="bold"))
        for row in rows:
            self.show(Text(row[0]))
            self.show(Text("  " + aligned(header[1:], row[1:], widths[1:])))

    # -- messages (stderr) ----------------------------------------------------------------------
    def info(self, message: str) -> None:
        """Prose on stderr: on a terminal, wrapped at word boundaries."""
        from rich.text import Text

        self._prose(Text(safe(message, None, multiline=True)))

    def line(self, text: str) -> None:
        """A line that is data, on stderr: a command to copy, a path, a URL, a log line. localrun
        never wraps it (a newline inside a quoted header breaks the command pasted); the terminal
        soft-wraps it, and a copy of it is what was printed."""
        self.err.print(safe(text, None), markup=False, soft_wrap=True)

    def status(self, markup: str) -> None:
        """A styled message on stderr; the caller escapes any outside text it includes."""
        self.err.print(markup)

    def warn(self, message: str) -> None:
        self._labelled("warning: ", "yellow", message)

    def error(self, message: str, hint: str | None = None) -> None:
        self._labelled("error: ", "bold red", message)
        if hint:
            self._labelled("hint: ", "dim", hint)

    def _labelled(self, label: str, style: str, message: str) -> None:
        """One message with its label, as one line (wrapped at words on a terminal)."""
        from rich.text import Text

        self._prose(Text.assemble((label, style), safe(message, MESSAGE_LIMIT)))

    def _prose(self, text: Text) -> None:
        """Prose on stderr. On a terminal it wraps between words, never inside a `quoted` span: a
        command in a hint stays on one line, to copy; a word longer than a line keeps a line to
        itself, whole, for the terminal to wrap. Piped, each paragraph is one line."""
        if not self.stderr_tty:
            self.err.print(text)
            return
        for paragraph in text.split("\n", allow_blank=True):
            for line in paragraph.divide(word_breaks(paragraph.plain, self.err.width)):
                line.rstrip()
                self.err.print(line, soft_wrap=True)

    def confirm(self, question: str, *, refuse_hint: str = "add --yes to go ahead without asking") -> bool:
        """Ask yes/no on stderr. Nobody can answer when stdin or stderr is not a terminal, or with
        --json: then raise UsageError rather than guess."""
        if not (self.interactive and isatty(sys.stdin)):
            raise UsageError("refusing to ask for confirmation: not on a terminal", hint=refuse_hint)
        self.err.print(f"{question} [y/N] ", end="", markup=False)
        try:
            answer = input()
        except EOFError:
            answer = ""
        return answer.strip().lower() in ("y", "yes")
