"""What the chat and tool tests share: a tool to call, and the real REPL typed into over a pipe."""

from __future__ import annotations

from pathlib import Path

from localrun.commands.generate import PromptOptions, open_conversation
from localrun.commands.repl import Repl
from localrun.inference.conversation import LocalConversation
from localrun.inference.generation.settings import Settings
from localrun.output import Output
from support.engines import open_engine

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def typed_into_repl(
    model: Path, keys: str, settings: Settings, options: PromptOptions, n_ctx: int
) -> LocalConversation:
    """Type `keys` into the real REPL (prompt-toolkit over a pipe) until they run out; the
    conversation it leaves, with `sent`: what the engine was last sent, as text."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    out = Output()
    engine = open_engine(model, n_ctx=n_ctx)
    conv = open_conversation(engine, out, settings, options)
    try:
        with create_pipe_input() as pipe:
            pipe.send_text(keys)
            pipe.close()
            Repl(conv, out).run(input=pipe, output=DummyOutput())
        # read while the model is still loaded
        conv.sent = b"".join(engine.model.piece(t, special=True) for t in conv.last_prompt).decode("utf-8", "replace")
    finally:
        engine.close()
    return conv
