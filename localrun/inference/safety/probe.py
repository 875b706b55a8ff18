"""Child side of the self-test: load a model, decode a few tokens, print one JSON line.

Run as `python -m localrun.inference.safety.probe MODEL [--no-extra-bufts] [--tokens N]`. It runs in its own
process because llama.cpp kills the process (SIGSEGV, abort) on some builds and inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import closing

from localrun.errors import LocalrunError
from localrun.inference.generation.events import Piece, Stats
from localrun.inference.generation.sampler import Sampler
from localrun.inference.generation.scheduler import Scheduler
from localrun.inference.generation.sequence import Failed, Request, Update
from localrun.inference.generation.settings import SamplingOptions
from localrun.inference.llama.log import install
from localrun.inference.llama.runtime import Loaded, LoadOptions, load


def greedy(loaded: Loaded, prompt: str, n: int) -> tuple[str, int]:
    """Decode `prompt`, then up to n tokens greedily (the generation core's one sequence): the
    text and how many tokens it took."""
    tokens = loaded.model.tokenize(prompt)
    room = loaded.ctx.n_ctx - len(tokens)
    updates: list[Update] = []
    with closing(Sampler(loaded.model, SamplingOptions(temperature=0), n_ctx=loaded.ctx.n_ctx)) as sampler:
        core = Scheduler(loaded, 1)
        try:
            core.run(Request(tokens, sampler, min(n, room), room, [], updates.append))
        finally:
            core.close()
    text = "".join(u.text for u in updates if isinstance(u, Piece))
    failed = next((u for u in updates if isinstance(u, Failed)), None)
    if failed is not None:
        raise failed.error
    stats = next(u for u in updates if isinstance(u, Stats))
    return text, stats.generated_tokens - (stats.finish_reason == "eog")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localrun.probe")
    parser.add_argument("model")
    parser.add_argument("--no-extra-bufts", action="store_true")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--prompt", default="The capital of France is")
    args = parser.parse_args(argv)
    install(echo=True)  # the parent keeps our stderr: llama.cpp's last words explain a crash
    start = time.perf_counter()
    try:
        loaded = load(
            args.model, LoadOptions(n_ctx=256, n_batch=64, use_extra_bufts=not args.no_extra_bufts, verbose=True)
        )
        try:
            text, generated = greedy(loaded, args.prompt, args.tokens)
        finally:
            loaded.close()
    except LocalrunError as exc:  # llama.cpp refused the file: a clean failure, not a crash
        sys.stderr.write(f"error: {exc.message}\n")
        return 1
    result = {"ok": True, "generated": generated, "text": text, "seconds": round(time.perf_counter() - start, 3)}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
