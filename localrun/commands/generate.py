"""`localrun run` and `localrun chat`: one answer (a prompt, piped material, or both), or the REPL."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localrun.commands.stream import make_renderer
from localrun.errors import UsageError
from localrun.inference.conversation import Conversation, LocalConversation, compose_prompt
from localrun.inference.engine import Engine
from localrun.inference.generation import grammar as grammars
from localrun.inference.generation.events import Stats
from localrun.inference.generation.settings import Settings, check_structure
from localrun.inference.opening import EngineConfig, choose_template
from localrun.inference.prompting.tool_use import ToolUse, ToolUseError
from localrun.output import Output, isatty
from localrun.text import plural, safe


@dataclass
class PromptOptions:
    """How the prompt is made: the chat template, or none."""

    system: str | None = None
    raw: bool = False
    chat_format: str | None = None
    template_file: Path | None = None
    json_schema: str | None = None  # the reply is JSON following it (a file, or JSON)
    grammar_file: Path | None = None  # the reply follows this GBNF grammar
    think: bool | None = None  # a thinking model thinks (its template's switch); None: as it does by default
    show_thinking: bool = False  # run: the reasoning on stderr (chat always shows it, dimmed)
    reasoning_budget: int | None = None  # reasoning tokens before its end is forced; None: no limit
    tools_file: Path | None = None  # run --tools: OpenAI-style tool definitions (JSON)
    tool_choice: str | None = None  # auto, none, required, or a function's name


def open_conversation(
    engine: Engine,
    out: Output,
    settings: Settings,
    prompt: PromptOptions,
    *,
    chatting: bool = False,
    tool_use: ToolUse | None = None,
) -> LocalConversation:
    """The conversation over a loaded engine, with the template chosen (and announced if guessed:
    in a chat, with what a model without a template is likely to be, in one message)."""
    template = None
    if not prompt.raw:
        said: list[str] = []
        try:
            template = choose_template(engine, prompt.chat_format, prompt.template_file, said.append)
        except BaseException:
            for message in said:  # what was noticed before it failed is said too
                out.warn(message)
            raise
        if chatting and engine.chat_template() is None and not (prompt.chat_format or prompt.template_file):
            label = engine.info.label
            said = said or [f"{label} has no chat template."]
            said[-1] += (
                " It may be a base model, which continues text rather than answers; "
                f'for that: `localrun run {label} --raw "TEXT"`'
            )
        for message in said:
            out.warn(message)
    conv = LocalConversation(engine, template, settings, prompt.system, warn=out.warn)
    conv.think = prompt.think
    if prompt.think is not None and (conv.families is None or conv.families.thinking_switch is None):
        out.warn(f"--{'' if prompt.think else 'no-'}think does nothing: this model's template has no thinking switch")
    conv.reasoning_budget = prompt.reasoning_budget
    conv.tool_use = tool_use
    if prompt.reasoning_budget is not None and (conv.families is None or conv.families.reasoning is None):
        out.warn("--reasoning-budget does nothing: this model's template and vocabulary show no reasoning format")
    return conv


def read_tools(prompt: PromptOptions) -> ToolUse | None:
    """--tools FILE (a JSON list of OpenAI-style tools, or an object holding one as "tools") and
    --tool-choice, checked as the server checks a request's."""
    if prompt.tools_file is None:
        if prompt.tool_choice is not None:
            raise UsageError("--tool-choice goes with --tools", hint="add --tools FILE")
        return None
    if prompt.raw:
        raise UsageError("--tools needs a chat template", hint="drop --raw")
    path = prompt.tools_file
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {safe(path)}: {exc.strerror or exc}") from None
    except ValueError as exc:  # not UTF-8, or not JSON
        raise UsageError(f"{safe(path)} is not JSON: {exc}") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list) or not tools or not all(isinstance(t, dict) for t in tools):
        raise UsageError(
            f"{safe(path)} holds no tools", hint='give a JSON list of {"type": "function", "function": {...}}'
        )
    choice = prompt.tool_choice or "auto"
    named = None if choice in ("auto", "none", "required") else choice
    try:
        return ToolUse.of(tools, "auto" if named else choice, named)
    except ToolUseError as exc:
        if exc.param == "tool_choice":
            raise UsageError(
                f"--tool-choice {safe(choice)} is not auto, none, required or a tool in {safe(path)}"
            ) from None
        raise UsageError(f"--tools {safe(path)}: {exc.message}") from None


def read_stdin(warn: Callable[[str], None]) -> str | None:
    """Piped stdin as text, or None on a terminal. Bytes that are not UTF-8 (a binary file, another
    encoding) are replaced, and said so once: a prompt is text."""
    if sys.stdin is None or isatty(sys.stdin):
        return None
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8", "replace")
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in data:
        bad = text.count("\ufffd")
        warn(f"stdin is not valid UTF-8: {plural(bad, 'undecodable byte sequence')} replaced by �")
    return text


def prompt_words(words: list[str], warn: Callable[[str], None]) -> list[str]:
    """The prompt arguments as text: bytes the shell passed that are not UTF-8 are replaced."""
    fixed = [w.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for w in words]
    if fixed != words:
        warn("the prompt is not valid UTF-8: undecodable bytes replaced by �")
    return fixed


def one_shot(
    conv: Conversation, prompt: str, out: Output, *, stream: bool = False, material: str = "", thinking: bool = False
) -> Stats:
    """Answer one prompt: live text on a terminal, plain when piped, or JSON; a thinking model's
    reasoning on stderr when `thinking` (in JSON, always apart from the text)."""
    sink = make_renderer(out, stream=stream, extra=conv.facts(), model=conv.label, show_thinking=thinking)
    return conv.reply(prompt, sink, material)


def apply_structure(settings: Settings, options: PromptOptions) -> None:
    """--json-schema or --grammar into the settings, checked before any model loads."""
    if options.json_schema and options.grammar_file:
        raise UsageError("--json-schema and --grammar both shape the reply: give one of them")
    found = None
    if options.json_schema:
        found = grammars.from_json_schema(options.json_schema)
    elif options.grammar_file:
        found = grammars.from_file(options.grammar_file)
    if found is None:
        return
    check_structure(settings.sampling, found.gbnf)
    settings.grammar, settings.grammar_source = found.gbnf, found.source
    settings.from_schema = bool(options.json_schema)


def generate(
    mode: str,
    model: str,
    words: list[str],
    cfg: EngineConfig,
    settings: Settings,
    out: Output,
    prompt_options: PromptOptions,
    *,
    stream: bool,
    draft: str | None = None,
    server: str | None = None,
) -> Stats | None:
    """`run` and `chat`: one answer when there is a prompt or piped stdin (or mode is run), else the
    REPL; from a model loaded here, or from a `localrun serve` at `server`."""
    if stream and not out.json:
        raise UsageError("--stream goes with --json", hint="add --json, or drop --stream")
    stdin_text = read_stdin(out.warn)
    words = prompt_words(words, out.warn)
    interactive = mode == "chat" and stdin_text is None
    if prompt_options.tools_file is not None and (interactive or server):
        raise UsageError(
            "--tools is for one answer from a model loaded here",
            hint="use `localrun run MODEL PROMPT --tools FILE` (a server takes tools in its requests)",
        )
    if interactive and out.json:
        raise UsageError("--json needs a prompt: use `localrun run MODEL PROMPT --json`")
    prompt, material = compose_prompt(words, stdin_text)
    if not interactive and not prompt.strip():
        hint = "pass a prompt after the model, or pipe text into the command"
        if mode == "run" and not stdin_text:
            hint += f"; to chat with it: `localrun chat {model}`"
        raise UsageError("nothing to answer: the prompt is empty", hint=hint)
    apply_structure(settings, prompt_options)
    tool_use = read_tools(prompt_options)
    if server:  # what only --server needs, imported only then (as the REPL and loading are)
        from localrun.commands.remote import RemoteConversation, refuse_local_options
        from localrun.serve.client import Server

        refuse_local_options(cfg, draft, prompt_options.chat_format, prompt_options.template_file)
        if prompt_options.reasoning_budget is not None:
            raise UsageError(
                "--reasoning-budget is for a model loaded here",
                hint="start the server with `localrun serve --reasoning-budget N`, or drop --server",
            )
        if settings.logprobs is not None:
            raise UsageError("--logprobs is for a model loaded here", hint="drop --server, or --logprobs")
        remote = RemoteConversation(
            Server(server), model, settings, prompt_options.system, raw=prompt_options.raw, warn=out.warn
        )
        return converse(remote, out, interactive, prompt, material, stream)
    from localrun.commands.loading import open_engine

    engine = open_engine(model, cfg, out, draft=draft)
    try:
        conv = open_conversation(engine, out, settings, prompt_options, chatting=mode == "chat", tool_use=tool_use)
        return converse(conv, out, interactive, prompt, material, stream, prompt_options.show_thinking)
    finally:
        engine.close()


def converse(
    conv: Conversation, out: Output, interactive: bool, prompt: str, material: str, stream: bool, thinking: bool = False
) -> Stats | None:
    if interactive:  # a prompt given as an argument is the chat's first message, as in Ollama
        from localrun.commands.repl import Repl  # prompt-toolkit: not for one answer

        Repl(conv, out).run(first=prompt or None)
        return None
    return one_shot(conv, prompt, out, stream=stream, material=material, thinking=thinking)
