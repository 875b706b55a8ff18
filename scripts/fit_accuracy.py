"""How close localrun.fit's memory estimate is to what llama.cpp really allocates and uses.

For the tiny quants and Gemma 3 270M, at several context sizes, a fresh child process loads the
model (CPU, as localrun does), decodes a full batch of prompt tokens and a few more, and reports
the buffer sizes llama.cpp logs (model, KV, compute, output) and its RSS growth. The parent
compares them with fit.estimate() and prints the error per case.

Target: the estimate is never under, and at most 5% or 64 MiB over (whichever is larger).

    python scripts/fit_accuracy.py                 # all cases
    python scripts/fit_accuracy.py --quick         # two tiny quants and Gemma, two contexts each
    python scripts/fit_accuracy.py --run [--quick] # against real `localrun run` processes (peak RSS)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from localrun.inference.llama import log as llama_log

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def worker(model: str, n_ctx: int, n_batch: int, logits_all: bool) -> None:
    """Child: load, decode a full batch and a few tokens; print buffers and RSS as one JSON line."""
    import psutil

    from localrun.inference.llama.build import llama
    from localrun.inference.llama.runtime import LoadOptions, load
    from localrun.inference.safety import selftest

    proc = psutil.Process()
    llama()  # libraries and backends loaded: the baseline
    llama_log.clear()
    base = proc.memory_info().rss
    extra = selftest.use_extra_bufts()
    loaded = load(
        model, LoadOptions(n_ctx=n_ctx, n_batch=n_batch, use_extra_bufts=extra, logits_all=logits_all, verbose=True)
    )  # llama.cpp's log on stderr
    after_load = proc.memory_info().rss
    words = "the quick brown fox jumps over the lazy dog and " * 200
    tokens = loaded.model.tokenize(words)[: min(n_batch, loaded.ctx.n_ctx - 8)]
    loaded.ctx.decode(tokens)
    for _ in range(4):
        loaded.ctx.decode([loaded.ctx.sample()])
    after = proc.memory_info().rss
    print(
        json.dumps(
            {
                "rss_base": base,
                "rss_load": after_load,
                "rss": max(after, after_load),
                "n_ctx": loaded.ctx.n_ctx,
                "extra_bufts": extra,
                "logits_all": logits_all,
                "prompt": len(tokens),
            }
        )
    )


def measure(model: Path, n_ctx: int, n_batch: int, logits_all: bool) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", str(model), str(n_ctx), str(n_batch), str(int(logits_all))],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["buffers"] = llama_log.buffer_sizes(out.stderr.splitlines())
    return result


# What `localrun run` imports and initialises before it touches a model: the floor of its RSS.
BASELINE = "import localrun.commands.generate, localrun.commands.loading; from localrun.inference.llama.build import llama; llama()"
PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"


def peak_rss(argv: list[str], env: dict) -> int:
    """The peak RSS (VmHWM) of one command, in bytes, as its parent sees it when it ends."""
    out = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


# KV cache types and flash attention, as `run` takes them: (K, V, flash attention)
SHAPES = [("f16", "f16", "auto"), ("q8_0", "q8_0", "auto"), ("q4_0", "q4_0", "auto"), ("f16", "f16", "off")]


def run_process(model: Path, n_ctx: int, home: Path, shape: tuple[str, str, str]) -> tuple[int, int]:
    """Peak RSS growth of a real `localrun run` (a prompt of a few hundred tokens, 4 tokens of
    reply) over the baseline: on the file's first load (its header parsed and checked) and after."""
    import os

    env = {**os.environ, "LOCALRUN_HOME": str(home)}
    base = peak_rss([sys.executable, "-c", BASELINE], env)
    prompt = "the quick brown fox jumps over the lazy dog and " * 60
    kv = ["--cache-type-k", shape[0], "--cache-type-v", shape[1], "--flash-attn", shape[2]]
    argv = [sys.executable, "-m", "localrun", "run", str(model), "--raw", "--ctx", str(n_ctx), "-n", "4", *kv, prompt]
    first = peak_rss(argv, env)
    again = peak_rss(argv, env)
    return first - base, again - base


def cases(quick: bool) -> list[tuple[str, Path, list[int]]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import CACHE
    from support.models import build_suite, deep_model, gemma_model
    # the same cache the tests build

    suite = build_suite(CACHE / "models")
    gemma = gemma_model(CACHE)
    quants = ["F16", "Q4_K_M"] if quick else list(suite.quants)
    tiny_ctx = [512, 2048] if quick else [512, 1024, 2048]
    gemma_ctx = [2048, 8192] if quick else [1024, 4096, 8192, 32768]
    return (
        [(f"tiny {q}", suite.quants[q], tiny_ctx) for q in quants]
        + [("tiny split F32", suite.split[0], tiny_ctx[:1])]
        + [("gemma3 270M Q4_K_M", gemma, gemma_ctx)]
        + [("llama 30 layers GQA Q8_0", deep_model(CACHE / "models"), [2048] if quick else [2048, 8192])]
    )


def _err(estimate: int, actual: int) -> str:
    diff = estimate - actual
    pct = 100.0 * diff / actual if actual else 0.0
    return f"{diff / MIB:+8.2f} MiB {pct:+6.1f}%"


def _ok(estimate: int, actual: int) -> bool:
    return estimate >= actual and estimate - actual <= max(0.05 * actual, 64 * MIB)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument(
        "--run",
        action="store_true",
        help="compare with real `localrun run` processes (peak RSS growth) instead of bare loads",
    )
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), args.worker[3] == "1")
        return 0
    if args.run:
        return compare_runs(args.quick)

    from localrun import fit
    from localrun.hardware import cpu_info
    from localrun.model.header import read_header

    features = cpu_info().features
    cols = (
        "case",
        "n_ctx",
        "logits",
        "weights est/log",
        "KV est/log",
        "compute est/log",
        "est RAM",
        "log buffers",
        "RSS growth",
        "est vs buffers",
        "est vs RSS",
        "ok",
    )
    print(" | ".join(cols))
    print("|".join("---" for _ in cols))
    failures = 0
    for label, path, contexts in cases(args.quick):
        header = read_header(path)
        for n_ctx in contexts:
            for logits_all in (False, True):
                got = measure(path, n_ctx, args.batch, logits_all)
                rows = min(args.batch, got["prompt"]) if logits_all else 1
                # Generation contexts reserve one logits row (runtime sets n_outputs_max = 1).
                est = fit.estimate(
                    header,
                    n_ctx,
                    0,
                    n_batch=args.batch,
                    n_outputs=rows,
                    logits_rows=None if logits_all else 1,
                    extra_bufts=got["extra_bufts"],
                    cpu_features=features,
                )
                buffers = {k: sum(v.values()) for k, v in got["buffers"].items()}
                # llama.cpp logs the output buffer at its first size only; it grows to the rows kept
                buffers["output"] = max(buffers["output"], 4 * header.n_vocab * rows)
                logged = sum(buffers.values()) + est.overhead
                rss = got["rss"] - got["rss_base"]
                ok = _ok(est.ram - est.overhead, logged - est.overhead) and _ok(est.ram, rss)
                failures += not ok
                print(
                    " | ".join(
                        [
                            label,
                            str(n_ctx),
                            "all" if logits_all else "last",
                            f"{est.weights_ram / MIB:.2f}/{buffers['model'] / MIB:.2f}",
                            f"{est.kv_ram / MIB:.2f}/{buffers['KV'] / MIB:.2f}",
                            f"{est.compute_ram / MIB:.2f}/{buffers['compute'] / MIB:.2f}",
                            f"{est.ram / MIB:.1f}",
                            f"{(logged - est.overhead) / MIB:.1f}",
                            f"{rss / MIB:.1f}",
                            _err(est.ram - est.overhead, logged - est.overhead),
                            _err(est.ram, rss),
                            "yes" if ok else "NO",
                        ]
                    ),
                    flush=True,
                )
    print(
        f"\n{failures} case(s) outside the target. Target: buffers (est without overhead vs logged) "
        "never under and at most 5% or 64 MiB over; the same for RSS growth."
    )
    return 1 if failures else 0


def compare_runs(quick: bool) -> int:
    """The estimate `show` prints (a generation context on this machine) against what a real
    `localrun run` process grows by, first load and cached."""
    import tempfile

    from localrun import fit
    from localrun.cli.options import plan_shape
    from localrun.inference.machine import this_machine
    from localrun.model.header import read_header

    machine = this_machine()
    print("case | n_ctx | K/V, flash | estimate | run, first load | run, cached | est vs first | est vs cached | ok")
    print("---|---|---|---|---|---|---|---|---")
    failures = 0
    for label, path, contexts in cases(quick):
        for n_ctx in contexts:
            for k, v, flash in SHAPES:
                planned = plan_shape(k, v, flash)  # as `run` and `show` plan it
                estimate = fit.plan(read_header(path), machine, n_ctx, planned).estimate.ram
                with tempfile.TemporaryDirectory() as home:
                    first, again = run_process(path, n_ctx, Path(home), (k, v, flash))
                ok = _ok(estimate, first) and _ok(estimate, again)
                failures += not ok
                print(
                    f"{label} | {n_ctx} | {k}/{v}, {flash} | {estimate / MIB:.1f} | {first / MIB:.1f} | "
                    f"{again / MIB:.1f} | {_err(estimate, first)} | {_err(estimate, again)} | {'yes' if ok else 'NO'}",
                    flush=True,
                )
    print(f"\n{failures} case(s) outside the target (never under, at most 5% or 64 MiB over).")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
