"""Conversations: one-shot prompts (`localrun run`, piped `chat`) and the interactive REPL.

A cancelled reply (Ctrl-C) drops both the question and the partial answer, so the conversation
is exactly what it was before; the question stays in the input history to edit and resend.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from localrun.engine import Engine, Progress, Stats
from localrun.errors import LocalrunError, NoSpace, UsageError
from localrun.output import Output
from localrun.render import Renderer, drive, make_renderer, stats_line
from localrun.runtime import SamplingOptions
from localrun.templates import ChatTemplate, Message

if TYPE_CHECKING:
    from prompt_toolkit.input import Input
    from prompt_toolkit.output import Output as PTOutput

    from localrun.engine import EngineConfig

REPLY_RESERVE = 512  # tokens kept free for a reply when trimming old turns


@dataclass
class Settings:
    """What /set changes: sampling, reply length, stop strings."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_tokens: int | None = None  # None: until end of generation or the context is full
    stop: list[str] = field(default_factory=list)

    def set(self, name: str, value: str) -> str:
        key = name.replace("-", "_").lower()
        try:
            if key in _NUMERIC:
                setattr(self.sampling, key, _NUMERIC[key](value))
            elif key == "seed":
                self.sampling.seed = None if value.lower() in ("none", "random", "-1") else int(value)
            elif key == "max_tokens":
                self.max_tokens = None if value.lower() in ("none", "-1", "0") else int(value)
            elif key == "stop":  # one stop string (\n for a newline); "none" clears
                self.stop = [] if value.lower() == "none" else [value.replace("\\n", "\n")]
            else:
                raise UsageError(f"unknown setting {name!r}", hint="settings: " + ", ".join(SETTABLE))
        except ValueError:
            raise UsageError(f"bad value for {name}: {value!r}") from None
        return f"{key} = {self.describe()[key]}"

    def describe(self) -> dict[str, Any]:
        data: dict[str, Any] = {k: v for k, v in asdict(self.sampling).items() if k in SETTABLE}
        data["max_tokens"] = self.max_tokens
        data["stop"] = self.stop
        return data


_NUMERIC = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repeat_penalty": float,
            "repeat_last_n": int}
SETTABLE = (*_NUMERIC, "seed", "max_tokens", "stop")


class _Recorder:
    """Passes events to a renderer and keeps the text, to add the reply to the conversation."""

    def __init__(self, inner: Renderer):
        self.inner = inner
        self.parts: list[str] = []

    def piece(self, text: str) -> None:
        self.parts.append(text)
        self.inner.piece(text)

    def progress(self, event: Progress) -> None:
        self.inner.progress(event)

    def finish(self, stats: Stats) -> None:
        self.inner.finish(stats)


class Conversation:
    """Messages, a template, settings; reply() renders the prompt, trims it, streams the answer."""

    def __init__(self, engine: Engine, template: ChatTemplate | None, settings: Settings, out: Output,
                 system: str | None = None):
        self.engine = engine
        self.template = template  # None: raw completion, no roles
        self.settings = settings
        self.out = out
        self.messages: list[Message] = []
        self.last_stats: Stats | None = None
        self.last_prompt: list[int] = []
        if system:
            self.set_system(system)

    def set_system(self, text: str) -> None:
        self.messages = [m for m in self.messages if m["role"] != "system"]
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    @property
    def system(self) -> str | None:
        return next((m["content"] for m in self.messages if m["role"] == "system"), None)

    def clear(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def tokens(self, messages: list[Message]) -> list[int]:
        if self.template is None:
            return self.engine.tokenize("".join(m["content"] for m in messages))
        return self.engine.tokenize(self.template.render(messages, add_generation_prompt=True))

    def _fit(self) -> list[int]:
        """The prompt tokens; drops the oldest turns (never the system prompt or the new
        question) while the prompt leaves too little room for a reply, and says so."""
        n_ctx = self.engine.n_ctx
        reserve = min(self.settings.max_tokens or REPLY_RESERVE, n_ctx // 4)
        tokens = self.tokens(self.messages)
        dropped = 0
        while len(tokens) + reserve > n_ctx:
            oldest = next((i for i, m in enumerate(self.messages[:-1]) if m["role"] != "system"), None)
            if oldest is None:
                break
            del self.messages[oldest]
            dropped += 1
            # an answer without its question confuses most templates: it goes too
            if oldest < len(self.messages) - 1 and self.messages[oldest]["role"] == "assistant":
                del self.messages[oldest]
                dropped += 1
            tokens = self.tokens(self.messages)
        if dropped:
            self.out.warn(f"the context ({n_ctx} tokens) was nearly full: dropped the {dropped} oldest "
                          f"message{'s' if dropped > 1 else ''}" + (" (the system prompt stays)" if self.system else ""))
        if len(tokens) >= n_ctx:
            raise NoSpace(f"the message is too long for the context ({len(tokens)} of {n_ctx} tokens)",
                          hint="use a larger --ctx, or a shorter message")
        return tokens

    def reply(self, text: str, renderer: Renderer) -> Stats:
        """Ask; stream the answer to the renderer; keep the turn unless it was cancelled."""
        self.messages.append({"role": "user", "content": text})
        try:
            tokens = self._fit()
        except LocalrunError:
            self.messages.pop()
            raise
        self.last_prompt = tokens
        stop = list(self.settings.stop) + list(self.template.stop if self.template else ())
        recorder = _Recorder(renderer)
        stats = drive(self.engine.generate(tokens, self.settings.sampling, self.settings.max_tokens, stop),
                      recorder)
        self.last_stats = stats
        if stats.finish_reason == "cancelled":
            self.messages.pop()
        else:
            self.messages.append({"role": "assistant", "content": "".join(recorder.parts)})
        return stats

    # -- /save and /load -------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        data = {"model": self.engine.info.name, "messages": self.messages, "settings": self.settings.describe()}
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def load(self, path: Path) -> int:
        try:
            data = json.loads(path.read_text())
            messages = data["messages"] if isinstance(data, dict) else data
            if not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                       and isinstance(m.get("content"), str) for m in messages):
                raise ValueError("messages need a role (system/user/assistant) and a content")
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path} is not a saved conversation: {exc}") from None
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return len(self.messages)


def compose_prompt(words: list[str], stdin_text: str | None) -> str:
    """The argument is the instruction, piped stdin the material it applies to."""
    instruction = " ".join(words).strip()
    material = (stdin_text or "").strip("\n")
    if instruction and material:
        return f"{instruction}\n\n{material}"
    return instruction or material


def one_shot(conv: Conversation, prompt: str, out: Output, *, stream: bool = False) -> Stats:
    """Answer one prompt: live text on a terminal, plain when piped, or JSON."""
    extra = {"model": conv.engine.info.name, **conv.engine.info.timings()}
    return conv.reply(prompt, make_renderer(out, stream=stream, extra=extra))


# -- the REPL ------------------------------------------------------------------------------------
HELP = """\
Type a message and press Enter. Multiline: start with \"\"\" and end with \"\"\", or press
Esc then Enter (Alt-Enter) for a new line. Ctrl-C stops a reply; Ctrl-C on an empty line or
Ctrl-D exits.

  /help               this help
  /exit               leave (also /bye, Ctrl-D)
  /clear              forget the conversation (keeps the system prompt)
  /system [TEXT]      set the system prompt (show it without TEXT; /system - removes it)
  /set [PARAM VALUE]  change a setting (show them without arguments): {settable}
  /stats              figures of the last reply, and how full the context is
  /save FILE          save the conversation as JSON
  /load FILE          load a saved conversation
  /model              the model, its context, placement and chat template
"""

_COMMAND_RE = re.compile(r"^/[a-z]+(\s|$)")
COMMANDS = ("/help", "/exit", "/bye", "/clear", "/system", "/set", "/stats", "/save", "/load", "/model")


class Repl:
    """Slash commands and the prompt loop; `handle` is separate from the I/O to keep it testable."""

    def __init__(self, conv: Conversation, out: Output):
        self.conv = conv
        self.out = out

    def handle(self, line: str) -> bool:
        """Run one slash command; False means exit."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        conv, out = self.conv, self.out
        if cmd in ("/exit", "/bye", "/quit"):
            return False
        if cmd == "/help":
            out.info(HELP.format(settable=", ".join(SETTABLE)))
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
                    out.info(f"{key} = {value}")
            else:
                name, _, value = arg.partition(" ")
                if not value.strip():
                    raise UsageError(f"/set {name} needs a value", hint="/set temperature 0.2")
                out.info(conv.settings.set(name, value.strip()))
        elif cmd == "/stats":
            used = len(conv.tokens(conv.messages)) if conv.messages else 0
            n = len(conv.messages)
            out.info(f"context: {used} of {conv.engine.n_ctx} tokens used by {n} message{'s' if n != 1 else ''}")
            out.info(stats_line(conv.last_stats) if conv.last_stats else "no reply yet")
        elif cmd in ("/save", "/load"):
            if not arg:
                raise UsageError(f"{cmd} needs a file name", hint=f"{cmd} chat.json")
            path = Path(arg).expanduser()
            if cmd == "/save":
                conv.save(path)
                out.info(f"saved {len(conv.messages)} messages to {path}")
            else:
                out.info(f"loaded {conv.load(path)} messages from {path}")
        elif cmd == "/model":
            info = conv.engine.info
            out.info(f"{info.name}  ({info.path})")
            out.info(f"context {info.n_ctx} tokens (trained {info.n_ctx_train}), GPU layers {info.n_gpu_layers}, "
                     f"threads {info.n_threads}, loaded in {info.load_s:.2f} s")
            out.info("chat template: " + (conv.template.origin if conv.template else "none (--raw)"))
            for note in info.notes:
                out.info(note)
        else:
            raise UsageError(f"unknown command {cmd}", hint="/help lists the commands")
        return True

    def ask(self, text: str) -> None:
        with _no_echo():
            stats = self.conv.reply(text, make_renderer(self.out))
        if stats.finish_reason == "cancelled":
            self.out.warn("reply cancelled; it and its question are left out of the conversation")

    def run(self, *, input: "Input | None" = None, output: "PTOutput | None" = None) -> None:
        session = _prompt_session(input, output)
        info = self.conv.engine.info
        self.out.info(f"{info.name} ready (context {info.n_ctx} tokens). /help for commands, Ctrl-D to exit.")
        while True:
            try:
                text = session.prompt(">>> ")
            except EOFError:
                break
            except KeyboardInterrupt:  # Ctrl-C with text on the line: start over
                continue
            if text.strip().startswith('"""'):
                text = _read_block(session, text)
            if not text.strip():
                continue
            try:
                if _COMMAND_RE.match(text):
                    if not self.handle(text):
                        break
                else:
                    self.ask(text)
            except LocalrunError as exc:
                self.out.error(exc.message, exc.hint)


@contextlib.contextmanager
def _no_echo() -> Iterator[None]:
    """Keys typed during a reply are not echoed into its text (they wait for the next prompt)."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def _read_block(session: Any, first: str) -> str:
    """A \"\"\"-delimited block: keep reading lines until one holds the closing quotes."""
    body = first.strip()[3:]
    lines = []
    while '"""' not in body:
        lines.append(body)
        try:
            body = session.prompt("... ")
        except (EOFError, KeyboardInterrupt):
            return ""
    lines.append(body[: body.index('"""')])
    return "\n".join(lines).strip("\n")


def _prompt_session(input: "Input | None", output: "PTOutput | None") -> Any:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    from localrun import paths

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
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _interrupt(event: Any) -> None:
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()
        else:
            event.app.exit(exception=EOFError())

    return PromptSession(history=FileHistory(str(paths.home() / "chat_history")), completer=SlashCompleter(),
                         key_bindings=keys, input=input, output=output, complete_while_typing=False)


def open_conversation(engine: Engine, out: Output, *, raw: bool, chat_format: str | None,
                      template_file: Path | None, system: str | None, settings: Settings) -> Conversation:
    """The conversation over a loaded engine, with the template chosen (and announced if guessed)."""
    from localrun import templates

    template = None
    if not raw:
        template = templates.choose(engine.chat_template(), chat_format=chat_format, template_file=template_file,
                                    has_token=engine.has_token, bos_token=engine.special_text("bos"),
                                    eos_token=engine.special_text("eos"), notify=out.warn)
    return Conversation(engine, template, settings, out, system)


def read_stdin() -> str | None:
    """Piped stdin, or None on a terminal."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return sys.stdin.read()



def command(mode: str, model: str, words: list[str], cfg: "EngineConfig", settings: Settings, out: Output, *,
            system: str | None, raw: bool, chat_format: str | None, template_file: Path | None,
            stream: bool) -> Stats | None:
    """`run` and `chat`: one answer when there is a prompt or piped stdin (or mode is run), else the REPL."""
    from localrun.engine import open_model

    stdin_text = read_stdin()
    if stream and not out.json:
        raise UsageError("--stream goes with --json", hint="add --json, or drop --stream")
    interactive = mode == "chat" and stdin_text is None
    if interactive and words:
        raise UsageError("chat takes a prompt argument only with piped stdin",
                         hint="use `localrun run MODEL PROMPT` for one answer, or pipe the material in")
    if interactive and out.json:
        raise UsageError("--json needs a prompt: use `localrun run MODEL PROMPT --json`")
    prompt = compose_prompt(words, stdin_text)
    if not interactive and not prompt.strip():
        raise UsageError("nothing to answer: the prompt is empty",
                         hint="pass a prompt after the model, or pipe text into the command")
    engine = open_model(model, cfg, out)
    try:
        conv = open_conversation(engine, out, raw=raw, chat_format=chat_format, template_file=template_file,
                                 system=system, settings=settings)
        if interactive:
            Repl(conv, out).run()
            return None
        return one_shot(conv, prompt, out, stream=stream)
    finally:
        engine.close()
