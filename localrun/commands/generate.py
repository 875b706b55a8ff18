"""`localrun run` and `localrun chat`: one answer (a prompt, piped material, or both), or the REPL."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from localrun.commands.loading import open_engine
from localrun.commands.repl import Repl
from localrun.commands.stream import make_renderer
from localrun.errors import UsageError
from localrun.inference import templates
from localrun.inference.conversation import Conversation, Settings, compose_prompt
from localrun.inference.engine import Engine, EngineConfig, Stats
from localrun.output import Output


@dataclass
class PromptOptions:
    """How the prompt is made: the chat template, or none."""

    system: str | None = None
    raw: bool = False
    chat_format: str | None = None
    template_file: Path | None = None


def open_conversation(engine: Engine, out: Output, settings: Settings, prompt: PromptOptions) -> Conversation:
    """The conversation over a loaded engine, with the template chosen (and announced if guessed)."""
    template = None
    if not prompt.raw:
        template = templates.choose(
            engine.chat_template(),
            chat_format=prompt.chat_format,
            template_file=prompt.template_file,
            has_token=engine.has_token,
            bos_token=engine.special_text("bos"),
            eos_token=engine.special_text("eos"),
            notify=out.warn,
        )
    return Conversation(engine, template, settings, prompt.system, warn=out.warn)


def read_stdin() -> str | None:
    """Piped stdin, or None on a terminal."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    return sys.stdin.read()


def one_shot(conv: Conversation, prompt: str, out: Output, *, stream: bool = False) -> Stats:
    """Answer one prompt: live text on a terminal, plain when piped, or JSON."""
    info = conv.engine.info
    extra = {"model": info.label, "name": info.name, "quant": info.quant, **info.timings()}
    return conv.reply(prompt, make_renderer(out, stream=stream, extra=extra, model=info.label))


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
) -> Stats | None:
    """`run` and `chat`: one answer when there is a prompt or piped stdin (or mode is run), else the REPL."""
    stdin_text = read_stdin()
    if stream and not out.json:
        raise UsageError("--stream goes with --json", hint="add --json, or drop --stream")
    interactive = mode == "chat" and stdin_text is None
    if interactive and words:
        raise UsageError(
            "chat takes a prompt argument only with piped stdin",
            hint="use `localrun run MODEL PROMPT` for one answer, or pipe the material in",
        )
    if interactive and out.json:
        raise UsageError("--json needs a prompt: use `localrun run MODEL PROMPT --json`")
    prompt = compose_prompt(words, stdin_text)
    if not interactive and not prompt.strip():
        raise UsageError(
            "nothing to answer: the prompt is empty",
            hint="pass a prompt after the model, or pipe text into the command",
        )
    engine = open_engine(model, cfg, out)
    try:
        conv = open_conversation(engine, out, settings, prompt_options)
        if interactive:
            Repl(conv, out).run()
            return None
        return one_shot(conv, prompt, out, stream=stream)
    finally:
        engine.close()
