#!/usr/bin/env python3
"""Decode speed of a tool call constrained by its grammar against an unconstrained reply, on Gemma,
in one run (the ratio is what counts; target >= 0.9x).

    python scripts/bench_tool_call.py [--model PATH] [--tokens 128] [--reps 3]

Both are `localrun run ... --json` in child processes on the same prompt and tools, greedy, with
speculation off: the call with `--tool-choice required` (Gemma's template renders no tools, so the
generic JSON call format, its grammar over the whole reply, with a string argument at least long
enough to fill the tokens asked for), the reply with `--tool-choice none --ignore-eos`. Each
reports its decode speed (tokens after the first over their time); the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.models import gemma_model  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper, then save it with the tool."


def tools(chars: int) -> list[dict]:
    story = {"type": "string", "minLength": chars, "maxLength": chars * 2}
    parameters = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40}, "story": story}}
    parameters |= {"required": ["title", "story"], "additionalProperties": False}
    return [{"type": "function", "function": {"name": "save_story", "parameters": parameters}}]


def run(model: Path, tools_file: Path, tokens: int, *extra: str) -> dict:
    command = [sys.executable, "-m", "localrun", "run", str(model), PROMPT, "--json", "--temp", "0"]
    command += ["-n", str(tokens), "--speculate", "off", "--no-prompt-cache", "--tools", str(tools_file), *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: Gemma 3 270M Q4_K_M (the tests' copy)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens each reply generates")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    model = args.model or gemma_model(ROOT / ".cache" / "tests")
    with tempfile.TemporaryDirectory(prefix="localrun-bench-") as folder:
        tools_file = Path(folder) / "tools.json"
        tools_file.write_text(json.dumps(tools(args.tokens * 4)))  # more characters than the tokens hold
        run(model, tools_file, 4, "--tool-choice", "none")  # the one-time checks of the build and the file
        rows: dict[str, list[dict]] = {"free reply": [], "tool call": []}
        for _ in range(args.reps):
            rows["free reply"].append(run(model, tools_file, args.tokens, "--tool-choice", "none", "--ignore-eos"))
            rows["tool call"].append(run(model, tools_file, args.tokens, "--tool-choice", "required"))
    print(f"model {model.name}, {args.reps} repetitions (medians)\n")
    print(f"{'reply':11} {'tokens':>7} {'tok/s':>8} {'vs free':>8}")
    free = statistics.median(r["gen_tps"] for r in rows["free reply"])
    for name, runs in rows.items():
        speed = statistics.median(r["gen_tps"] for r in runs)
        print(f"{name:11} {runs[0]['generated_tokens']:7d} {speed:8.1f} {speed / free:7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
