"""Child side of the self-test: load a model, decode a few tokens, print one JSON line.

Run as `python -m localrun.inference.probe MODEL [--no-extra-bufts] [--tokens N]`. It runs in its own
process because llama.cpp kills the process (SIGSEGV, abort) on some builds and inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from localrun.errors import LocalrunError
from localrun.inference.llama_log import install
from localrun.inference.runtime import Loaded, LoadOptions, load
from localrun.inference.sampling import SamplingOptions


def greedy(loaded: Loaded, prompt: str, n: int) -> tuple[str, int]:
    """Decode `prompt`, then up to n tokens greedily: the text and how many tokens it took."""
    loaded.ctx.set_sampling(SamplingOptions(temperature=0))
    loaded.ctx.decode(loaded.model.tokenize(prompt))
    text, generated = b"", 0
    for _ in range(n):
        token = loaded.ctx.sample()
        if loaded.model.is_eog(token):
            break
        text += loaded.model.piece(token)
        generated += 1
        loaded.ctx.decode([token])
    return text.decode("utf-8", errors="replace"), generated


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
