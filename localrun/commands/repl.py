"""The chat REPL: prompt-toolkit input with history, multiline and slash commands; replies stream
through the live renderer, and Ctrl-C cancels a reply, not the session."""

from __future__ import annotations

import contextlib
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.application import create_app_session, get_app
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory
from prompt_toolkit.input import Input
from prompt_toolkit.input.typeahead import get_typeahead, store_typeahead
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.keys import Keys
from prompt_toolkit.output import Output as PTOutput
from prompt_toolkit.output import create_output
from prompt_toolkit.shortcuts import create_confirm_session

from localrun import paths
from localrun.commands.stream import make_renderer, show_reasoning, show_stats_line
from localrun.errors import LocalrunError, UsageError
from localrun.inference.conversation import Conversation
from localrun.inference.generation.settings import BOUNDS, SETTABLE, UNSET
from localrun.output import Output, isatty
from localrun.text import safe

try:
    import termios
except ImportError:  # not a POSIX system: keys typed during a reply are echoed
    termios = None  # type: ignore[assignment]

HELP = """\
Type a message and press Enter. Multiline: start with \"\"\" and end with \"\"\", or press Esc then Enter (Alt-Enter) for a new line.
Ctrl-C stops a reply; Ctrl-D, /exit or Ctrl-C twice on an empty line exits.

  /help               this help
  /exit               leave (also /bye, Ctrl-D)
  /clear              forget the conversation (keeps the system prompt)
  /system [TEXT]      set the system prompt (no TEXT: show it; - removes it)
  /set [PARAM VALUE]  change a setting (alone: list them); PARAM is one of
{settable}
  /stats              figures of the last reply, and how full the context is
  /save FILE          save the conversation and settings; asks before replacing
  /save! FILE         the same, replacing the file without asking
  /load FILE          load a saved conversation and its settings
  /model              the model, its context, placement and chat template
  /think on|off       a thinking model thinks or not (its template's switch)
  /show thinking      the last reply's reasoning; replies show theirs dimmed
  /hide thinking      replies show their reasoning as one live line
"""  # paragraphs unwrapped: the terminal wraps them at its width


CANCELLED = "reply cancelled; it and its question are left out of the conversation"
_COMMAND_RE = re.compile(r"^/[a-z]+!?(\s|$)")
COMMANDS = (
    "/help",
    "/exit",
    "/bye",
    "/clear",
    "/system",
    "/set",
    "/stats",
    "/save",
    "/save!",
    "/load",
    "/model",
    "/think",
    "/show",
    "/hide",
)
BLOCK = '"""'  # opens and closes a block of lines sent as one message


class Repl:
    """Slash commands and the prompt loop; `handle` is separate from the I/O to keep it testable."""

    def __init__(self, conv: Conversation, out: Output):
        self.conv = conv
        self.out = out
        self.session: Any = None  # the prompt, while run() reads it: /save asks there
        self.show_thinking = True  # a reply's reasoning streams dimmed; else one live line counts it

    def handle(self, line: str) -> bool:
        """Run one slash command; False means exit."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        conv, out = self.conv, self.out
        if cmd in ("/exit", "/bye", "/quit"):
            return False
        if cmd == "/help":
            names = textwrap.fill(", ".join(SETTABLE), width=79, initial_indent=" " * 22, subsequent_indent=" " * 22)
            out.info(HELP.format(settable=names))
        elif cmd == "/clear":
            conv.clear()
            out.info("conversation cleared" + (" (system prompt kept)" if conv.system else ""))
        elif cmd == "/system":
            if not arg:
                out.info(f"system prompt: {conv.system}" if conv.system else "no system prompt")
            else:
                conv.set_system("" if arg == "-" else arg)
                out.info("system prompt removed" if arg == "-" else "system prompt set")
        elif cmd == "/set":
            if not arg:
                for key, value in conv.settings.describe().items():
                    out.line(f"{key} = {value}")
            else:
                name, _, value = arg.partition(" ")
                if not value.strip():
                    raise UsageError(f"/set {name} needs a value", hint=_set_usage(name))
                out.line(conv.settings.set(name, value.strip(), conv.figures()))
        elif cmd == "/stats":
            out.info(conv.usage())
            if conv.last_stats:
                show_stats_line(out, conv.last_stats)
            else:
                out.info("no reply yet")
        elif cmd in ("/save", "/save!", "/load"):
            if not arg:
                raise UsageError(f"{cmd} needs a file name", hint=f"{cmd} chat.json")
            if cmd == "/load":
                loaded = conv.load(Path(arg).expanduser())
                said = "; settings restored: " + ", ".join(loaded.changed) if loaded.changed else ""
                out.line(f"loaded {loaded.messages} messages from {arg}{said}")
            else:
                self.save(arg, replace=cmd == "/save!")
        elif cmd == "/model":  # paths and figures: whole lines, the terminal wraps them
            for line in conv.about():
                out.line(line)
        elif cmd == "/think":
            if arg not in ("on", "off"):
                raise UsageError("/think takes on or off", hint="/think off")
            conv.set_think(arg == "on")
            out.info(f"thinking {arg} from the next question")
        elif cmd in ("/show", "/hide"):
            if arg != "thinking":
                raise UsageError(f"{cmd} takes thinking", hint=f"{cmd} thinking")
            self.show_thinking = cmd == "/show"
            if cmd == "/hide":
                out.info("replies show their reasoning as one live line; /show thinking shows it")
            elif conv.last_reasoning:
                show_reasoning(out, conv.last_reasoning)
            else:
                out.info("the last reply had no reasoning; replies show theirs as they come")
        else:
            raise UsageError(f"unknown command {cmd}", hint="/help lists the commands")
        return True

    def save(self, name: str, *, replace: bool) -> None:
        """/save: never an empty conversation, and an existing file only when told (/save!) or
        answered yes at the prompt. The file is replaced atomically, never half written."""
        path = Path(name).expanduser()
        said = [m for m in self.conv.messages if m["role"] != "system"]
        if not said:
            raise UsageError("nothing to save: no message has been sent yet")
        if not path.parent.is_dir():  # a mistyped folder is said, not made
            raise UsageError(
                f"cannot save to {name}: there is no folder {path.parent}",
                hint="the conversation is still here: /save to another file",
            )
        if path.exists() and not path.is_dir() and not replace:
            question = f"{safe(name, None)} exists{_holding(path)}: replace it with these {len(said)} messages?"
            if not self._confirm(question):
                self.out.line(f"not saved; /save! {name} replaces it, or /save to another file")
                return
        try:
            self.conv.save(path)
        except OSError as exc:
            raise UsageError(
                f"cannot save to {name}: {exc.strerror or exc}",
                hint="the conversation is still here: /save to another file",
            ) from None
        self.out.line(f"saved {len(self.conv.messages)} messages to {name}")

    def _confirm(self, question: str) -> bool:
        """Yes or no at the chat's prompt (Enter, Ctrl-C or Ctrl-D: no)."""
        if self.session is None:
            return False
        with create_app_session(input=self.session.input, output=self.session.output):
            try:
                return bool(create_confirm_session(question, suffix=" [y/N] ").prompt())
            except (EOFError, KeyboardInterrupt):
                return False

    def ask(self, text: str) -> None:
        with _no_echo():
            stats = self.conv.reply(text, make_renderer(self.out, show_thinking=self.show_thinking))
        if stats.finish_reason == "cancelled":
            self.out.warn(CANCELLED)

    def run(self, *, input: Input | None = None, output: PTOutput | None = None, first: str | None = None) -> None:
        """The prompt loop, until /exit, Ctrl-D or a second Ctrl-C on an empty line. `first` is
        asked before the first prompt (`localrun chat MODEL "question"`). No error ends it."""
        session = self.session = _prompt_session(input, output)
        self.out.line(f"{self.conv.ready()}. /help for commands, Ctrl-D to exit.")
        armed = False  # the last key was Ctrl-C on an empty line: one more exits
        pending = first
        while True:
            try:
                # The first question, when given, is shown and kept in the history as if typed.
                given, pending = pending, None
                text = session.prompt(">>> ", default=given or "", accept_default=given is not None)
            except EOFError:
                break
            except (_EmptyInterrupt, KeyboardInterrupt) as exc:  # Ctrl-C on an empty line, or a SIGINT
                # A SIGINT with the line still in the buffer: Enter, then Ctrl-C as the prompt closed
                # (the terminal no longer raw). That cancels the question, as a typed-ahead one does.
                if isinstance(exc, KeyboardInterrupt) and session.default_buffer.text.strip():
                    self.out.warn(CANCELLED)
                    armed = False
                    continue
                if armed:
                    break
                armed = True
                self.out.info("press Ctrl-D or type /exit to quit (or Ctrl-C once more)")
                continue
            armed = False
            if _ctrl_c_typed_ahead(session):  # Enter, then Ctrl-C before the reply could start
                self.out.warn(CANCELLED)
                continue
            if text.lstrip().startswith(BLOCK):
                text = _block_text(text)
            if text.strip() and not self._one(text):
                break

    def _one(self, text: str) -> bool:
        """A slash command or a question; False to leave. Errors are reported, never raised."""
        try:
            if _COMMAND_RE.match(text):
                return self.handle(text)
            self.ask(text)
        except LocalrunError as exc:
            self.out.error(exc.message, exc.hint)
        except KeyboardInterrupt:
            self.out.warn("interrupted")
        except Exception as exc:  # the chat outlives what went wrong in one turn
            self.out.error(
                f"unexpected {type(exc).__name__}: {exc}",
                hint="the conversation is kept; please report this (LOCALRUN_DEBUG=1 shows it)",
            )
        return True


@contextlib.contextmanager
def _no_echo() -> Iterator[None]:
    """Keys typed during a reply are not echoed into its text (they wait for the next prompt)."""
    saved = None
    if termios is not None and isatty(sys.stdin):
        try:
            saved = termios.tcgetattr(sys.stdin.fileno())
        except (termios.error, OSError, ValueError):  # not a terminal after all
            saved = None
    if saved is None:
        yield
        return
    fd = sys.stdin.fileno()
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _open_block(text: str) -> bool:
    """Whether the input opens a \"\"\" block and has not closed it: Enter adds a line."""
    text = text.lstrip()
    return text.startswith(BLOCK) and BLOCK not in text[len(BLOCK) :]


def _block_text(text: str) -> str:
    """The message in a \"\"\" block: the lines between the quotes."""
    body = text.lstrip()[len(BLOCK) :]
    return body.partition(BLOCK)[0].strip("\n")


def _set_usage(name: str) -> str:
    """How to give a value to one setting (for /set NAME without one)."""
    key = name.replace("-", "_").lower()
    if key in BOUNDS:
        unset = f", or {UNSET[key]}" if key in UNSET else ""
        return f"/set {key} VALUE: a number {BOUNDS[key].describe()}{unset}"
    usage = {
        "stop": "/set stop TEXT: one stop string (\\n for a newline), or none",
        "grammar": "/set grammar FILE: a GBNF grammar file, or none",
        "json_schema": "/set json_schema SCHEMA: JSON text or a file holding it, or none",
    }
    return usage.get(key, "settings: " + ", ".join(SETTABLE))


def _holding(path: Path) -> str:
    """What a file about to be replaced holds, as far as a look can tell."""
    data = paths.read_json(path)
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list):
        return f" ({len(messages)} messages)"
    return " (not a saved conversation)"


def _prompt_session(input: Input | None, output: PTOutput | None) -> Any:
    class SlashCompleter(Completer):
        def get_completions(self, document: Any, complete_event: Any):  # type: ignore[override]
            text = document.text_before_cursor
            if not text.startswith("/"):
                return
            if " " not in text:
                for cmd in COMMANDS:
                    if cmd.startswith(text):
                        yield Completion(cmd, start_position=-len(text))
            elif text.startswith("/set ") and text.count(" ") == 1:
                word = text[5:]
                for key in SETTABLE:
                    if key.startswith(word):
                        yield Completion(key, start_position=-len(word))

    keys = KeyBindings()

    @keys.add("escape", "enter")
    @keys.add("enter", filter=Condition(lambda: _open_block(get_app().current_buffer.text)))
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _interrupt(event: Any) -> None:
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()
        else:
            event.app.exit(exception=_EmptyInterrupt())

    if output is None:
        # No cursor-position requests: on a terminal that ignores them, prompt-toolkit keeps the
        # terminal raw for a while after Enter, and a Ctrl-C typed then is read as a key (lost to
        # the reply, and taken as "exit" at the next prompt) instead of interrupting.
        output = create_output()
        if hasattr(output, "enable_cpr"):
            output.enable_cpr = False
    return PromptSession(
        history=_History(str(_private_history())),
        completer=SlashCompleter(),
        key_bindings=keys,
        # the lines after the first of one message (not a long line the terminal wraps)
        prompt_continuation=lambda width, line, wrapped: "... " if not wrapped else "",
        input=input,
        output=output,
        complete_while_typing=False,
    )


def _ctrl_c_typed_ahead(session: Any) -> bool:
    """Whether Ctrl-C came right after the Enter that sent the line: in the same read (prompt-toolkit
    keeps such keys for the next prompt, where it would be taken for Ctrl-C on an empty line), or
    after that read but while the terminal was still raw (then it waits in the terminal's queue as a
    key, not a signal, for the next prompt to read)."""
    keys = get_typeahead(session.input)
    with session.input.raw_mode():  # what is queued is read as it was typed, without waiting
        keys += session.input.read_keys()
    ctrl_c = [k for k in keys if k.key == Keys.ControlC]
    store_typeahead(session.input, [k for k in keys if k.key != Keys.ControlC])
    return bool(ctrl_c)


class _EmptyInterrupt(Exception):
    """Ctrl-C on an empty line."""


def _private_history() -> Path:
    """The history file, for its owner alone (it holds every question asked)."""
    path = paths.home() / "chat_history"
    try:
        paths.private_file(path)
    except OSError:  # an unwritable home: the history fails quietly (see _History)
        pass
    return path


class _History(FileHistory):
    """The input history; a disk that cannot take it costs the history, never the chat."""

    def store_string(self, string: str) -> None:
        try:
            super().store_string(string)
        except OSError:
            pass
