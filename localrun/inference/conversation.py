"""A conversation: messages through a chat template, trimmed to the context, answered by the engine
(LocalConversation) or by anything else that streams the same events (a Conversation, e.g. a server).

A cancelled reply (Ctrl-C) drops both the question and the partial answer, so the conversation
is exactly what it was before.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localrun import paths
from localrun.errors import NoSpace, UsageError
from localrun.inference.engine import Engine
from localrun.inference.generation import grammar as grammars
from localrun.inference.generation.events import (
    Event,
    EventSink,
    Notice,
    Piece,
    PrefillProgress,
    Reasoning,
    Stats,
    ToolCalled,
    drive,
)
from localrun.inference.generation.settings import BOUNDS, UNSET, Settings, check_stops, check_structure
from localrun.inference.prompting.families import ToolFormat, detect
from localrun.inference.prompting.replies import (
    ContentText,
    MalformedCall,
    ReasoningText,
    ToolCallArguments,
    ToolCallStart,
)
from localrun.inference.prompting.reply_parser import ReplyParser
from localrun.inference.prompting.templates import ChatTemplate, Message
from localrun.inference.prompting.tool_use import ToolUse, described, reply_grammar

REPLY_RESERVE = 512  # tokens kept free for a reply when trimming old turns


class _Recorder:
    """Passes events to a sink and keeps the text (the answer, and apart from it the reasoning), to
    add the reply to the conversation."""

    def __init__(self, inner: EventSink):
        self.inner = inner
        self.parts: list[str] = []
        self.thoughts: list[str] = []

    def piece(self, text: str) -> None:
        self.parts.append(text)
        self.inner.piece(text)

    def reasoning(self, event: Reasoning) -> None:
        self.thoughts.append(event.text)
        handler = getattr(self.inner, "reasoning", None)
        if handler is not None:
            handler(event)

    def progress(self, event: PrefillProgress) -> None:
        self.inner.progress(event)

    def __getattr__(self, kind: str):  # the optional handlers (notice, speculation): the inner sink's
        return getattr(self.inner, kind)

    def finish(self, stats: Stats) -> None:
        self.inner.finish(stats)


class Conversation:
    """Messages and settings; reply() asks, streams the answer to a sink, and keeps the turn.
    Subclasses say where answers come from: a loaded engine (LocalConversation) or a server."""

    label = ""  # the model, as the user named it

    def __init__(self, settings: Settings, system: str | None = None, warn: Callable[[str], None] = lambda m: None):
        self.settings = settings
        self.warn = warn
        self.messages: list[Message] = []
        self.last_stats: Stats | None = None
        if system:
            self.set_system(system)

    def set_think(self, on: bool) -> None:
        """/think on|off: whether a thinking model thinks, from the next question on."""
        raise UsageError("/think is for a model loaded here", hint="the server's template decides")

    @property
    def last_reasoning(self) -> str:
        """The last reply's reasoning ("" when it had none)."""
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), None)
        return last.get("reasoning_content", "") if last else ""

    def set_system(self, text: str) -> None:
        self.messages = [m for m in self.messages if m["role"] != "system"]
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    @property
    def system(self) -> str | None:
        return next((m["content"] for m in self.messages if m["role"] == "system"), None)

    def clear(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def drop_oldest_turn(self) -> int:
        return drop_oldest_turn(self.messages)

    def say_dropped(self, dropped: int, n_ctx: int | None) -> None:
        where = f"the context ({n_ctx} tokens)" if n_ctx else "the server's context"
        self.warn(
            f"{where} was nearly full: dropped the {dropped} oldest message{'s' if dropped > 1 else ''}"
            + (" (the system prompt stays)" if self.system else "")
        )

    # -- what subclasses provide -------------------------------------------------------------------
    def answer(self, material: str) -> Iterator[Event]:
        """The events answering self.messages (the last one is the new question)."""
        raise NotImplementedError

    def about(self) -> list[str]:
        """Lines saying what answers: the model, its context, where it runs (/model)."""
        raise NotImplementedError

    def ready(self) -> str:
        """What the REPL says first: the model, and its context."""
        raise NotImplementedError

    def usage(self) -> str:
        """How full the context is (/stats)."""
        raise NotImplementedError

    def facts(self) -> dict[str, object]:
        """What --json output says about the model."""
        return {"model": self.label}

    @property
    def n_ctx(self) -> int | None:
        return None

    def figures(self) -> dict[str, int] | None:
        """The loaded model's figures that bound settings (n_ctx, n_vocab); None when unknown here."""
        return None

    # -- a turn -------------------------------------------------------------------------------------
    def reply(self, text: str, sink: EventSink, material: str = "") -> Stats:
        """Ask; stream the answer to the sink; keep the turn unless it was cancelled. A cancelled
        or failed turn leaves the conversation as it was, trimmed turns included, wherever the
        Ctrl-C lands (rendering the prompt, reading it, or the reply)."""
        before = list(self.messages)
        self.last_stats = None
        try:
            self.messages.append({"role": "user", "content": text})
            recorder = _Recorder(sink)
            stats = drive(self.answer(material), recorder)
        except KeyboardInterrupt:
            self.messages = before
            stats = Stats(self.prompt_size(), None, 0, 0.0, None, 0.0, "cancelled")
            sink.finish(stats)
            self.last_stats = stats
            return stats
        except BaseException:
            self.messages = before
            raise
        self.last_stats = stats
        if stats.finish_reason == "cancelled":
            self.messages = before
        else:  # the reasoning kept apart: /save writes it, templates that want it back read it
            answer: Message = {"role": "assistant", "content": "".join(recorder.parts)}
            if recorder.thoughts:
                answer["reasoning_content"] = "".join(recorder.thoughts)
            self.messages.append(answer)
        return stats

    def prompt_size(self) -> int:
        """Tokens of the last prompt, as far as known (for a cancelled turn's stats)."""
        return 0

    # -- /save and /load -------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """The messages and the settings (typed) as JSON, written atomically: an interrupted save
        leaves the file as it was. Raises OSError."""
        data = {"model": self.label, "messages": self.messages, "settings": saved_settings(self.settings)}
        paths.write_json(path, data, indent=2)

    def load(self, path: Path) -> Loaded:
        """The messages and settings saved in `path`, all checked before any is taken (the
        settings as /set checks them): an unusable file leaves the conversation as it was."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            messages = data["messages"] if isinstance(data, dict) else data
            if not all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                and isinstance(m.get("reasoning_content", ""), str)
                for m in messages
            ):
                raise ValueError("messages need a role (system/user/assistant) and a content")
            settings = self.settings
            if isinstance(data, dict) and "settings" in data:
                settings = restored_settings(self.settings, data["settings"], self.figures())
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            raise UsageError(f"{path} is not a saved conversation: {exc}") from None
        except UsageError as exc:
            raise UsageError(f"{path}: a saved setting is refused: {exc.message}") from None
        before, after = self.settings.describe(), settings.describe()
        changed = [f"{key} {after[key]} (was {before[key]})" for key in after if after[key] != before[key]]
        self.messages = [
            {k: m[k] for k in ("role", "content", "reasoning_content") if m.get(k) is not None} for m in messages
        ]
        self.settings = settings
        return Loaded(len(self.messages), changed)


@dataclass(frozen=True)
class Loaded:
    """What /load took from a file: how many messages, and the settings it changed (as said)."""

    messages: int
    changed: list[str]


def saved_settings(settings: Settings) -> dict[str, Any]:
    """The settings as JSON values of their own types: numbers, null where unset, the stop strings
    as a list, the grammar's text with where it came from."""
    grammar = None
    if settings.grammar:
        grammar = {"gbnf": settings.grammar, "source": settings.grammar_source, "from_schema": settings.from_schema}
    return {**settings.values(), "stop": list(settings.stop), "grammar": grammar}


def restored_settings(current: Settings, saved: Any, figures: dict[str, int] | None = None) -> Settings:
    """A copy of `current` with the saved settings: numbers through /set's checks (files from
    earlier versions hold them as text, which reads the same), stops and the grammar as saved
    (none where the file has none)."""
    if not isinstance(saved, dict):
        raise ValueError("its settings are not a JSON object")
    settings = copy.deepcopy(current)
    for key in BOUNDS:
        if key in saved:
            value = saved[key]
            if isinstance(value, bool) or not isinstance(value, (int, float, str, type(None))):
                raise ValueError(f"setting {key} is {json.dumps(value)}, not a number")
            settings.set(key, UNSET.get(key, "null") if value is None else str(value), figures)
    stop = saved.get("stop", [])
    if isinstance(stop, str):  # earlier versions wrote the settings as /set shows them: "a", "b" or none
        try:
            stop = [] if stop == "none" else json.loads(f"[{stop}]")
        except ValueError:
            raise ValueError("setting stop is neither a list of strings nor as /set shows it") from None
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ValueError("setting stop is not a list of strings")
    check_stops(stop)
    settings.stop = list(stop)
    grammar = saved.get("grammar")
    if isinstance(grammar, str):  # earlier versions kept only where a grammar came from, not the grammar
        grammar = None
    if grammar is None:
        settings.grammar, settings.grammar_source, settings.from_schema = None, "", False
    elif isinstance(grammar, dict) and isinstance(grammar.get("gbnf"), str):
        source = str(grammar.get("source") or "the saved grammar")
        settings.grammar = grammars.from_text(grammar["gbnf"], source).gbnf  # within llama.cpp's limits
        settings.grammar_source = source
        settings.from_schema = grammar.get("from_schema") is True
    else:
        raise ValueError("setting grammar is neither null nor a saved grammar")
    check_structure(settings.sampling, settings.grammar)
    return settings


class LocalConversation(Conversation):
    """Over a loaded engine: the messages through a chat template, trimmed to the context."""

    def __init__(
        self,
        engine: Engine,
        template: ChatTemplate | None,
        settings: Settings,
        system: str | None = None,
        warn: Callable[[str], None] = lambda message: None,
    ):
        self.engine = engine
        self.template = template  # None: raw completion, no roles
        # how the model thinks, when its template or vocabulary says (its reasoning kept apart)
        self.families = detect(template.source, engine.special_tokens()) if template is not None else None
        self.think: bool | None = None  # --think/--no-think, through the template's switch; None: its default
        self.reasoning_budget: int | None = None  # reasoning tokens before its end is forced; None: no limit
        self.tool_use: ToolUse | None = None  # run --tools: the tools and how the reply may call them
        self.label = engine.info.label
        self.last_prompt: list[int] = []
        self.material = ""  # what the question being answered starts with: piped text
        super().__init__(settings, system, warn)

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    def set_think(self, on: bool) -> None:
        if self.families is None or self.families.thinking_switch is None:
            raise UsageError(
                "this model's template has no thinking switch", hint="it thinks as its template and training say"
            )
        self.think = on

    def figures(self) -> dict[str, int]:
        return {"n_ctx": self.engine.n_ctx, "n_vocab": self.engine.model.n_vocab}

    def text(self, messages: list[Message]) -> str:
        """The prompt as the model reads it: the messages through the template (or joined, raw)."""
        if self.template is None:
            return "".join(m["content"] for m in messages)
        return self.template.render(self._with_tools(messages), add_generation_prompt=True, **self._context())

    def _context(self) -> dict[str, Any]:
        """What the template is given beside the messages: the tools, its thinking switch."""
        return {"tools": self.tool_use.tools if self.tool_use else None, "variables": self._switches()}

    def _calling(self) -> ToolFormat | None:
        """The tool-call format the reply is read with (None: no tools, or tool choice none)."""
        if self.tool_use is None or self.families is None:
            return None
        return self.tool_use.format(self.families)

    def _with_tools(self, messages: list[Message]) -> list[Message]:
        """The messages, with the tools described in the system prompt when the template cannot."""
        if self._calling() is None or self.families is None or self.families.template_describes_tools:
            return messages
        return described(messages, self.tool_use.tools)  # type: ignore[union-attr] (calling: tool_use set)

    def _switches(self) -> dict[str, object]:
        """The template's thinking switch, set as --think/--no-think say (nothing when unset)."""
        switch = self.families.thinking_switch if self.families else None
        return switch.variables(self.think) if switch is not None and self.think is not None else {}

    def tokens(self, messages: list[Message]) -> list[int]:
        """The prompt's tokens. Through a template, special tokens come from its markup only;
        raw, from what the user wrote as the prompt, never from piped material."""
        if self.template is not None:
            return self.engine.chat_tokens(self.template, self._with_tools(messages), **self._context())
        parts = [(m["content"], False) for m in messages]
        last = messages[-1]["content"] if messages else ""
        if self.material and last.startswith(self.material):
            parts[-1:] = [(self.material, True), (last[len(self.material) :], False)]
        return self.engine.tokenize_parts(parts)

    def cached_prefix(self, text: str, tokens: list[int], material: str) -> int:
        """How many prompt tokens (the rendered `text`) come before the question: the template's
        preamble, the system prompt, earlier turns and the `material` the last message starts
        with. They are what the prompt cache keeps; 0 when the template changed the message
        beyond recognition."""
        return self.engine.prefix_length(text, self.messages[-1]["content"], tokens, len(material))

    def _fit(self) -> list[int]:
        """The prompt tokens; drops the oldest turns while the prompt leaves too little room for a
        reply (see fit_turns), and says so."""
        n_ctx = self.engine.n_ctx
        tokens, dropped = fit_turns(self.messages, self.tokens, n_ctx, self.settings.max_tokens)
        if dropped:
            self.say_dropped(dropped, n_ctx)
        if len(tokens) >= n_ctx:
            raise NoSpace(
                f"the message is too long for the context ({len(tokens)} of {n_ctx} tokens)",
                hint="use a larger --ctx, or a shorter message",
            )
        return tokens

    def answer(self, material: str) -> Iterator[Event]:
        self.material = material
        tokens = self._fit()
        self.last_prompt = tokens
        stop = list(self.settings.stop) + list(self.template.stop if self.template else ())
        # What the prompt cache keeps: a first question's prefix (the preamble, the system prompt,
        # piped material). Later turns reuse the KV cache in memory; saving every conversation
        # so far would fill the bound with entries no other run starts with.
        first = sum(m["role"] == "user" for m in self.messages) == 1
        reasoning = self.families.reasoning if self.families else None
        # rendered once, when the cached prefix or the reasoning's start needs it
        text = self.text(self.messages) if first or reasoning else ""
        opened = reasoning is not None and reasoning.opens_in_prompt(text)
        watch = None
        if reasoning is not None:
            watch = self.engine.reasoning_watch(reasoning, opened=opened, budget=self.reasoning_budget)
        calling, settings = self._calling(), self.settings
        # the reply's grammar: the tool calls', or the answer's after the reasoning (a --grammar
        # file is the whole reply's, reasoning included: its writer knows the format)
        constrained = reply_grammar(
            settings.grammar,
            calling=calling,
            use=self.tool_use,
            thinking=reasoning.closing if opened and reasoning else None,
            whole_reply=settings.grammar is not None and not settings.from_schema,
        )
        events = self.engine.generate(
            tokens,
            settings.sampling,
            settings.max_tokens,
            stop,
            grammar=constrained[0] if constrained else None,
            triggers=constrained[1] if constrained else (),
            cached_prefix=self.cached_prefix(text, tokens, material) if first else 0,
            top_logprobs=settings.logprobs,
            watch=watch,
        )
        if reasoning is None and calling is None:
            return events
        schemas = self.tool_use.schemas() if self.tool_use else None
        return reasoned(events, ReplyParser(reasoning, calling, starts_in_reasoning=opened, schemas=schemas))

    def prompt_size(self) -> int:
        return len(self.last_prompt)

    def usage(self) -> str:
        used = len(self.tokens(self.messages)) if self.messages else 0
        n = len(self.messages)
        return f"context: {used} of {self.n_ctx} tokens used by {n} message{'s' if n != 1 else ''}"

    def facts(self) -> dict[str, object]:
        info = self.engine.info
        return {"model": info.label, "name": info.name, "quant": info.quant, **info.timings()}

    def ready(self) -> str:
        info = self.engine.info
        return f"{info.label} ({info.name}) ready, context {info.n_ctx} tokens"

    def about(self) -> list[str]:
        info = self.engine.info
        # A local file's label is its path as given: the path again only if it says more.
        where = info.name if info.label == str(info.path) else f"{info.name}, {info.path}"
        return [
            f"{info.label}  ({where})",
            f"context {info.n_ctx} tokens (trained {info.n_ctx_train}), GPU layers {info.n_gpu_layers}, "
            f"threads {info.n_threads}, loaded in {info.load_s:.2f} s",
            "chat template: " + (self.template.origin if self.template else "none (--raw)"),
            *info.notes,
        ]


def reasoned(events: Iterator[Event], parser: ReplyParser) -> Iterator[Event]:
    """The events with the reply's text taken apart: the reasoning as Reasoning events, the answer
    as Pieces (each Piece's logprobs go with the first event its text gave, or an empty Piece),
    each tool call as one ToolCalled, and a malformed call's text as answer with a Notice."""
    names: dict[int, ToolCallStart] = {}
    for event in events:
        if isinstance(event, Piece):
            deltas = parser.feed(event.text)
        elif isinstance(event, Stats):
            deltas = parser.finish()
        else:
            yield event
            continue
        tokens = event.tokens if isinstance(event, Piece) else []
        for delta in deltas:
            if isinstance(delta, ReasoningText):
                yield Reasoning(delta.text)
            elif isinstance(delta, ContentText):
                yield Piece(delta.text, tokens=tokens)
                tokens = []
            elif isinstance(delta, ToolCallStart):
                names[delta.index] = delta
            elif isinstance(delta, ToolCallArguments):  # a call's arguments come whole (the parser holds a call)
                start = names[delta.index]
                yield ToolCalled(start.id, start.name, delta.fragment)
            elif isinstance(delta, MalformedCall):
                yield Notice(f"a tool call the model wrote was given back as text: {delta.reason}")
        if tokens:
            yield Piece("", tokens=tokens)
        if isinstance(event, Stats):
            yield event


def drop_oldest_turn(messages: list[Message]) -> int:
    """Forget the oldest question and its answer (never the system prompt or the last message):
    how many messages went, 0 when there is nothing left to drop."""
    oldest = next((i for i, m in enumerate(messages[:-1]) if m["role"] != "system"), None)
    if oldest is None:
        return 0
    del messages[oldest]
    # an answer without its question confuses most templates: it goes too
    if oldest < len(messages) - 1 and messages[oldest]["role"] == "assistant":
        del messages[oldest]
        return 2
    return 1


def fit_turns(
    messages: list[Message], tokens_of: Callable[[list[Message]], list[int]], n_ctx: int, max_tokens: int | None
) -> tuple[list[int], int]:
    """The prompt's tokens once the oldest turns (never the system prompt or the last message) are
    dropped from `messages`, in place, while the prompt leaves too little room for a reply; and
    how many messages went. Shared by chat and the server's chat completions."""
    reserve = min(max_tokens or REPLY_RESERVE, n_ctx // 4)
    tokens = tokens_of(messages)
    dropped = 0
    while len(tokens) + reserve > n_ctx:
        gone = drop_oldest_turn(messages)
        if not gone:
            break
        dropped += gone
        tokens = tokens_of(messages)
    return tokens, dropped


def compose_prompt(words: list[str], stdin_text: str | None) -> tuple[str, str]:
    """The prompt and the material it starts with. The argument is the instruction, piped stdin
    the material it applies to; the material comes first, so that asking the same document
    another question reuses its KV state (the prompt cache), and the question is read last."""
    instruction = " ".join(words).strip()
    material = (stdin_text or "").strip("\n")
    if instruction and material:
        return f"{material}\n\n{instruction}", material
    return instruction or material, material
