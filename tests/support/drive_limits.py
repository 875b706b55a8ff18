"""Drive `run` and a scripted chat over small and odd contexts in one process, printing one JSON
line per case. Run as a child: if llama.cpp aborts, the parent sees this process die by a signal
and the last case printed says where. Usage: python drive_limits.py MODEL"""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from localrun.commands.generate import PromptOptions, generate, open_conversation
from localrun.commands.loading import open_engine
from localrun.commands.repl import Repl
from localrun.errors import LocalrunError
from localrun.inference.generation.settings import SamplingOptions, Settings
from localrun.inference.llama.runtime import padded_ctx
from localrun.inference.opening import EngineConfig
from localrun.output import Output

CONTEXTS = (16, 100, 160, 255, 256, 257, 300, 511, 512, 513, 700)


def say(**data: object) -> None:
    sys.__stdout__.write(json.dumps(data) + "\n")
    sys.__stdout__.flush()


def one_run(model: str, ctx: int, words: int) -> dict:
    """`localrun run MODEL --raw --ctx CTX -n 3 PROMPT` in this process; its exit code."""
    settings = Settings(SamplingOptions(temperature=0), 3, [])
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            stats = generate(
                "run",
                model,
                [" ".join(["a"] * words)],
                EngineConfig(n_ctx=ctx),
                settings,
                Output(),
                PromptOptions(raw=True),
                stream=False,
            )
        prompt = stats.prompt_tokens if stats else None
    except LocalrunError as exc:
        code, prompt = int(exc.exit_code), None
    return {"code": code, "prompt_tokens": prompt, "stderr": err.getvalue()[-300:]}


def scripted_chat(model: str, ctx: int, turns: int) -> dict:
    """A REPL with long messages that fill a small context: trimming, turn after turn."""
    out = Output()
    engine = open_engine(model, EngineConfig(n_ctx=ctx), out)
    conv = open_conversation(engine, out, Settings(SamplingOptions(temperature=0), 40, []), PromptOptions())
    message = " ".join(["the old man said the sea was very big"] * 6)
    try:
        with create_pipe_input() as pipe, redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            pipe.send_text("".join(f"{i} {message}\r" for i in range(turns)))
            pipe.close()
            Repl(conv, out).run(input=pipe, output=DummyOutput())
    finally:
        engine.close()
    return {"messages": len(conv.messages)}


def main() -> int:
    model = sys.argv[1]
    for ctx in CONTEXTS:
        real = padded_ctx(ctx)
        batch = min(real, 512)
        # " a" is one token and BOS one more: prompts of batch-1 .. batch+1 and real-2 .. real+1 tokens
        lengths = sorted({n - 1 for n in (batch - 1, batch, batch + 1, real - 2, real - 1, real, real + 1) if n > 1})
        for words in lengths:
            say(case="run", ctx=ctx, words=words, **one_run(model, ctx, words))
    for ctx in (160, 300):
        say(case="chat", ctx=ctx, **scripted_chat(model, ctx, 5))
    say(case="done")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
