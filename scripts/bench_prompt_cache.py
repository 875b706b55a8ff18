#!/usr/bin/env python3
"""The persistent prompt cache: time to first token of a first and a second `localrun run` over
the same piped material (~2,000 tokens), each asked another question, in one run.

    python scripts/bench_prompt_cache.py [--model PATH] [--tokens 2000] [--reps 3]

Each repetition starts from an empty cache: a first run reads the material (and saves its KV
state), a second run with another question loads it and reads only the question, and a run with
--no-prompt-cache reads everything again. Real processes (`python -m localrun run ... --json`),
TTFT as each reports it (from its generate() to the first piece of text) and wall time from spawn
to exit. Target: second-run TTFT <= 0.2x the first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.models import gemma_model  # noqa: E402

EVAL = (ROOT / "localrun" / "data" / "eval.txt").read_text()
QUESTIONS = ["What is the text about? Answer:", "Name one place the text mentions. Answer:"]


def run(model: Path, question: str, material: str, home: Path, *extra: str) -> tuple[dict, float]:
    env = {**os.environ, "LOCALRUN_HOME": str(home)}
    cmd = [sys.executable, "-m", "localrun", "run", str(model), question, "--raw", "--temp", "0", "-n", "8"]
    started = time.perf_counter()
    done = subprocess.run([*cmd, "--json", *extra], input=material, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout), time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: Gemma 3 270M Q4_K_M (the tests' copy)")
    ap.add_argument("--tokens", type=int, default=2000, help="about this many tokens of material")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    model = args.model or gemma_model(ROOT / ".cache" / "tests")
    material = (EVAL * 2)[: args.tokens * 5]  # about 5 characters a token (Gemma, English)
    home = Path(tempfile.mkdtemp(prefix="localrun-bench-"))
    try:
        run(model, "warm up", "x", home)  # the one-time checks of the build and the file
        rows: dict[str, list[tuple[float, float, int, int]]] = {"first": [], "second": [], "no cache": []}
        for _ in range(args.reps):
            shutil.rmtree(home / "kv", ignore_errors=True)
            for name, question, extra in (
                ("first", QUESTIONS[0], ()),
                ("second", QUESTIONS[1], ()),
                ("no cache", QUESTIONS[1], ("--no-prompt-cache",)),
            ):
                data, wall = run(model, question, material, home, *extra)
                rows[name].append((data["ttft_s"], wall, data["prompt_tokens"], data["from_disk"]))
        print(f"model {model.name}, {args.reps} repetitions (medians)\n")
        print(f"{'run':9} {'prompt tok':>10} {'from cache':>10} {'TTFT s':>8} {'wall s':>7} {'TTFT vs first':>14}")
        first = statistics.median(r[0] for r in rows["first"])
        for name, values in rows.items():
            ttft = statistics.median(r[0] for r in values)
            wall = statistics.median(r[1] for r in values)
            print(f"{name:9} {values[0][2]:10,d} {values[0][3]:10,d} {ttft:8.3f} {wall:7.2f} {ttft / first:13.2f}x")
        size = sum(p.stat().st_size for p in (home / "kv").glob("*.kv"))
        print(f"\nthe entry on disk: {size / 2**20:.1f} MiB")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
