#!/usr/bin/env python3
"""Speculative decoding against plain decoding, in one run: decode speed, acceptance, exactness.

    python scripts/bench_speculative.py [--model PATH] [--draft PATH] [--reps 3] [--tokens 256]

Three kinds of task, each decoded with speculation off, prompt lookup and auto (and with a draft
model when --draft is given), repetitions interleaved so that a noisy machine slows all alike:
- copy: fix the typos in a ~1,500-token text (the reply mostly repeats the prompt);
- extract: questions about a document, answered from its words;
- free: a story (nothing to look up: auto must not lose).
For each: decode tok/s (generated tokens over the time after the first), the ratio to off
(median of per-repetition ratios), the acceptance of drafted tokens, and whether the tokens are
identical to off at temperature 0 (else: the first difference and the logit gap there; batched
and one-at-a-time kernels differ in the last bits, so only near-ties may flip).

Then the ceiling: what a verify batch of K drafted tokens costs against one decode step on this
machine (K+1 positions with logits each), and the best speed-up any drafter could reach with
every draft accepted, max over K of (K+1)/cost(K), or with acceptance a, E(K)/cost(K).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests' model builder and engine helper

from localrun.inference.engine import Engine  # noqa: E402
from localrun.inference.generation.events import Piece, Stats  # noqa: E402
from localrun.inference.generation.settings import SamplingOptions  # noqa: E402
from localrun.inference.llama.runtime import Batch  # noqa: E402
from support.engines import open_engine  # noqa: E402
from support.models import gemma_model  # noqa: E402

GREEDY = SamplingOptions(temperature=0, repeat_penalty=1.0)
EVAL = (ROOT / "localrun" / "data" / "eval.txt").read_text()


def with_typos(text: str, rate: float = 0.04, seed: int = 1) -> str:
    rng = random.Random(seed)
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) > 3 and rng.random() < rate:
            j = rng.randrange(len(word) - 1)
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def tasks(engine: Engine) -> dict[str, str]:
    """Prompts for a base model (no chat template): the reply continues the text."""
    text = EVAL[:6000]
    while len(engine.tokenize(text)) > 1500:
        text = text[: int(len(text) * 0.95)]
    document = EVAL[6000:10000]
    return {
        # the reply is started with the text's first words, as a chat model's would be: a base
        # model then goes on copying (induction), which is what a "fix the typos" reply does
        "copy": f"{with_typos(text)}\n\nThe same text with its typos fixed:\n\n{text[:60]}",
        "extract": (
            f"{document}\n\nQuestions about the text above, each answered with a quote from it.\n"
            'Q: What does the text say in its first paragraph?\nA: "'
        ),
        "free": "Once upon a time, in a village by the sea, there lived",
    }


def decode(engine: Engine, prompt: str, n: int) -> tuple[list[int], Stats]:
    tokens = engine.tokenize(prompt)
    stats = None
    for event in engine.generate(tokens, GREEDY, n, []):
        if isinstance(event, Stats):
            stats = event
        elif not isinstance(event, Piece):
            continue
    assert stats is not None
    return engine.cached[len(tokens) :], stats


def decode_tps(stats: Stats) -> float:
    """Tokens after the first over the time after the first (prefill and TTFT excluded)."""
    after = stats.total_s - (stats.ttft_s or 0.0)
    return (stats.generated_tokens - 1) / after if after > 0 else 0.0


def first_gap(model: Path, n_ctx: int, prompt: str, reply: list[int], at: int) -> float:
    engine = open_engine(model, n_ctx=n_ctx, speculate="off", prompt_cache=False)
    try:
        engine.ctx.decode(engine.tokenize(prompt) + reply[:at])
        top = np.sort(engine.ctx.logits(-1))[-2:]
        return float(top[1] - top[0])
    finally:
        engine.close()


def cost_curve(engine: Engine, reps: int) -> dict[int, float]:
    """Seconds of a batch of K+1 positions (logits at each) over one position, K = 0..8."""
    ctx = engine.ctx
    base = engine.tokenize(EVAL[:2000])
    ctx.truncate(0)
    ctx.decode(base)
    engine.cached = list(base)
    batch = Batch(9)
    times: dict[int, list[float]] = {k: [] for k in range(9)}
    for _ in range(reps):
        for k in range(9):
            batch.clear()
            for i in range(k + 1):
                batch.add(base[i + 1], len(base) + i, 0, True)
            started = time.perf_counter()
            ctx.decode_batch(batch)
            times[k].append(time.perf_counter() - started)
            ctx.drop(0, len(base))
    batch.close()
    engine.cached = []
    ctx.truncate(0)
    one = statistics.median(times[0])
    return {k: statistics.median(v) / one for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: Gemma 3 270M Q4_K_M (the tests' copy)")
    ap.add_argument("--draft", type=Path, default=None, help="a draft model of the same vocabulary")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256, help="tokens generated per task")
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    model = args.model or gemma_model(ROOT / ".cache" / "tests")
    modes = ["off", "lookup", "auto"] + (["draft"] if args.draft else [])
    engines = {
        mode: open_engine(
            model,
            n_ctx=args.ctx,
            speculate=mode,
            prompt_cache=False,
            **({"draft": str(args.draft)} if mode == "draft" else {}),
        )
        for mode in modes
    }
    try:
        prompts = tasks(engines["off"])
        print(f"model {model.name}, {args.tokens} tokens a task, {args.reps} repetitions, temperature 0\n")
        rows = []
        for task, prompt in prompts.items():
            speeds: dict[str, list[float]] = {m: [] for m in modes}
            drafted = dict.fromkeys(modes, 0)
            accepted = dict.fromkeys(modes, 0)
            replies: dict[str, list[int]] = {}
            for _ in range(args.reps):
                for mode in modes:
                    tokens, stats = decode(engines[mode], prompt, args.tokens)
                    speeds[mode].append(decode_tps(stats))
                    drafted[mode] += stats.drafted
                    accepted[mode] += stats.accepted
                    replies.setdefault(mode, tokens)
            for mode in modes:
                ratios = [s / o for s, o in zip(speeds[mode], speeds["off"])]
                same = replies[mode] == replies["off"]
                note = "identical"
                if not same:
                    at = next(
                        (i for i, (a, b) in enumerate(zip(replies["off"], replies[mode])) if a != b),
                        min(len(replies["off"]), len(replies[mode])),
                    )
                    gap = first_gap(model, args.ctx, prompt, replies["off"], at)
                    note = f"differs at token {at} (logit gap {gap:.2f})"
                rate = f"{100 * accepted[mode] / drafted[mode]:.0f}%" if drafted[mode] else "-"
                rows.append(
                    (task, mode, statistics.median(speeds[mode]), statistics.median(ratios), rate, drafted[mode], note)
                )
        print(f"{'task':8} {'mode':7} {'decode tok/s':>12} {'vs off':>7} {'accepted':>9} {'drafted':>8}  tokens")
        for task, mode, tps, ratio, rate, n, note in rows:
            print(f"{task:8} {mode:7} {tps:12.1f} {ratio:6.2f}x {rate:>9} {n:8d}  {note}")
        curve = cost_curve(engines["lookup"], max(5, args.reps * 2))  # its context has rows for K+1 logits
        print("\nverify cost on this machine: a batch of K drafted tokens (K+1 positions) over one step")
        print("K      " + " ".join(f"{k:>6d}" for k in curve))
        print("cost   " + " ".join(f"{c:6.2f}" for c in curve.values()))
        ceiling = {k: (k + 1) / c for k, c in curve.items()}
        best = max(ceiling, key=ceiling.get)
        print(f"ceiling with every draft accepted: {ceiling[best]:.2f}x at K={best}")
        for a in (0.9, 0.8, 0.6):
            gains = {k: (1 - a ** (k + 1)) / (1 - a) / c for k, c in curve.items()}
            k = max(gains, key=gains.get)
            print(f"ceiling with {a:.0%} of drafted tokens accepted: {gains[k]:.2f}x at K={k}")
    finally:
        for engine in engines.values():
            engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
