#!/usr/bin/env python3
"""How much one costly grammar request slows another client's plain request, in one run.

    python scripts/bench_grammar_stall.py [--model PATH] [--values 500] [--tokens 16] [--rounds 3]

A `localrun serve --parallel 2` on the model (default: the tests' Gemma 3 270M). Each round times
a plain request (greedy, exactly --tokens tokens) alone, then again while another client streams a
reply constrained to an enum of --values strings, with a logit bias that makes every one of its
steps mask the whole vocabulary against the grammar (Gemma's 262k tokens: about a second a step
for 500 open values). Prints the plain request's median wall time alone and alongside, and the
ratio. When the grammar's sampling held the decode step (before issue 16), the plain request
waited out every one of the grammar's steps (10 s instead of 0.1 s in the issue's figures).
Run it on an otherwise idle machine; compare the ratio only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.models import gemma_model  # noqa: E402
from support.serving import ServerProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the tests' Gemma 3 270M)")
    parser.add_argument("--values", type=int, default=500, help="enum values of the costly grammar")
    parser.add_argument("--tokens", type=int, default=16, help="tokens of the plain reply")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = args.model or gemma_model(ROOT / ".cache" / "tests")
    schema = {"enum": [f"v{i:04d}" for i in range(args.values)]}
    alone, beside = [], []
    with ServerProcess([model], "--parallel", "2", "--ctx", "512") as server:
        client = server.client()
        name = client.models.list().data[0].id
        messages = [{"role": "user", "content": "Pick one."}]

        def plain() -> float:
            started = time.perf_counter()
            client.chat.completions.create(
                model=name,
                messages=messages,
                max_tokens=args.tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            return time.perf_counter() - started

        plain()  # warm-up
        for _ in range(args.rounds):
            alone.append(plain())
            stream = client.chat.completions.create(
                model=name,
                messages=messages,
                stream=True,
                temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}},
                logit_bias={"9259": 100},  # Gemma's "Hello": never allowed, so every step masks
            )
            next(iter(stream))
            drain = threading.Thread(target=lambda s=stream: [None for _ in s])
            drain.start()
            beside.append(plain())
            drain.join()
    a, b = statistics.median(alone), statistics.median(beside)
    print(f"plain reply of {args.tokens} tokens: alone {a:.2f} s, beside a {args.values}-value grammar {b:.2f} s")
    print(f"ratio beside/alone: {b / a:.2f}x (median of {args.rounds})")


if __name__ == "__main__":
    main()
