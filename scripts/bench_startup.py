#!/usr/bin/env python3
"""How long a one-shot answer takes from the shell: `localrun run` against llama.cpp's own tools.

    python scripts/bench_startup.py [MODEL] [--runs 10] [--prompt TEXT] [-n 8] [--ctx 4096]
        [--threads N] [--llama-cli PATH] [--llama-completion PATH] [--no-floor] [--chat] [--ref REF]

The commands, on the same model, prompt, token count, context and threads, greedy:
- `localrun run MODEL PROMPT`          against `llama-cli -st` (target: ratio <= 1.0)
- `localrun run MODEL PROMPT --raw`    against `llama-completion -no-cnv`
- the floor: a Python process that imports llama_cpp, then loads, prefills and generates the same
  tokens through its C API (no template): what any Python tool doing this pays.
- with --chat: `localrun chat MODEL` until its first `>>>` prompt, in a pty (needs pexpect).
- with --ref org/repo[:QUANT]: localrun is given that reference to the same file, pulled into the
  HF cache, as a user would type it (resolving it scans the cache); the other tools the path.
Each round runs every command once, wall time from spawn to exit, in an order that rotates from
round to round; one warm-up round first (the file cache, localrun's once-per-build and once-per-file
checks) is not counted, and localrun's bytecode is written before, as an install has it. Printed:
each command's median, min and max over --runs rounds, and the medians' ratios. llama-cli and
llama-completion are built from llama-cpp-python's vendored llama.cpp, the version localrun loads;
a path that is not there is skipped, and said:

    pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps -d /tmp && tar xzf ...
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llama-build -DCMAKE_BUILD_TYPE=Release
    cmake --build /tmp/llama-build -j --target llama-cli llama-completion
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = Path("/tmp/llama-build/bin")  # where scripts/bench_agreement.py looks for llama.cpp's tools too

# Load, prefill and greedy-generate through llama.cpp's C API, nothing else: the floor.
FLOOR = r"""
import ctypes, sys
import llama_cpp as lc
path, prompt, n, n_ctx, threads = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lc.llama_backend_init()
model = lc.llama_model_load_from_file(path.encode(), lc.llama_model_default_params())
params = lc.llama_context_default_params()
params.n_ctx = n_ctx
if threads:
    params.n_threads = params.n_threads_batch = threads
ctx = lc.llama_init_from_model(model, params)
vocab = lc.llama_model_get_vocab(model)
tokens = (lc.llama_token * (len(prompt) + 8))()
count = lc.llama_tokenize(vocab, prompt, len(prompt), tokens, len(tokens), True, True)
sampler = lc.llama_sampler_init_greedy()
batch, piece, text = lc.llama_batch_get_one(tokens, count), ctypes.create_string_buffer(256), []
for _ in range(n):
    if lc.llama_decode(ctx, batch):
        sys.exit("llama_decode failed")
    token = lc.llama_sampler_sample(sampler, ctx, -1)
    if lc.llama_vocab_is_eog(vocab, token):
        break
    text.append(piece.raw[: lc.llama_token_to_piece(vocab, token, piece, len(piece), 0, True)])
    one = (lc.llama_token * 1)(token)
    batch = lc.llama_batch_get_one(one, 1)
sys.stdout.buffer.write(b"".join(text) + b"\n")
"""


def default_model() -> Path:
    return ROOT / ".cache" / "tests" / "gemma" / "gemma-3-270m-Q4_K_M.gguf"


def localrun_argv() -> list[str]:
    return [sys.executable, "-m", "localrun"]


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each measured command by name; a llama.cpp tool that is not there is left out, and said."""
    model, n, ctx = str(args.model), str(args.n), str(args.ctx)
    threads = ["-t", str(args.threads)] if args.threads else []
    run = [*localrun_argv(), "run", args.ref or model, args.prompt, "-n", n, "--temp", "0", "--ctx", ctx, *threads]
    found: dict[str, list[str]] = {"localrun run": run, "localrun run --raw": [*run, "--raw"]}
    llama = ["-m", model, "-p", args.prompt, "-n", n, "--temp", "0", "-c", ctx, *threads]
    for name, path, extra in (
        ("llama-cli -st", args.llama_cli, ["-st"]),
        ("llama-completion", args.llama_completion, ["-no-cnv"]),
    ):
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            found[name] = [str(path), *llama, *extra]
        else:
            print(f"skipped {name}: no executable at {path} (how to build it: --help)")
    if args.floor:
        found["floor (llama_cpp C API)"] = [
            sys.executable,
            "-c",
            FLOOR,
            model,
            args.prompt,
            n,
            ctx,
            str(args.threads or 0),
        ]
    return found


def compile_localrun() -> None:
    """Write localrun's bytecode, as an install does: with PYTHONDONTWRITEBYTECODE set and no
    __pycache__ in the checkout, every start would compile every module it imports."""
    import compileall

    spec = importlib.util.find_spec("localrun")
    assert spec is not None and spec.submodule_search_locations, "run from the checkout"
    for folder in spec.submodule_search_locations:
        compileall.compile_dir(folder, quiet=1)


def time_command(argv: list[str]) -> float:
    """Seconds from spawn to exit; a failure stops the script with the command's own words."""
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        sys.exit(f"exit {proc.returncode}: {' '.join(argv[:6])} ...\n  " + "\n  ".join(tail))
    return took


def time_chat_prompt(args: argparse.Namespace) -> float:
    """Seconds from spawning `localrun chat MODEL` in a pty to its first `>>>` prompt."""
    import pexpect

    argv = [*localrun_argv(), "chat", args.ref or str(args.model), "--ctx", str(args.ctx)]
    if args.threads:
        argv += ["-t", str(args.threads)]
    env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    start = time.perf_counter()
    child = pexpect.spawn(argv[0], argv[1:], env=env, encoding="utf-8", timeout=120, dimensions=(30, 100))
    child.expect_exact(">>>")
    took = time.perf_counter() - start
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=default_model())
    parser.add_argument("--runs", type=int, default=10, help="counted rounds (after one warm-up)")
    parser.add_argument("--prompt", default="What is 2+2?")
    parser.add_argument("-n", type=int, default=8, help="tokens to generate")
    parser.add_argument("--ctx", type=int, default=4096, help="context size, the same for every command")
    parser.add_argument("--threads", type=int, help="threads for every command (default: each one's own)")
    parser.add_argument("--llama-cli", type=Path, default=BUILD / "llama-cli")
    parser.add_argument("--llama-completion", type=Path, default=BUILD / "llama-completion")
    parser.add_argument("--no-floor", dest="floor", action="store_false", help="skip the bare llama_cpp process")
    parser.add_argument("--chat", action="store_true", help="also time `localrun chat` to its first prompt")
    parser.add_argument("--ref", help="the reference localrun is given for MODEL (org/repo[:QUANT]), pulled")
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"no model at {args.model} (the tests' fixtures assemble Gemma there; or give a .gguf path)")
    if args.chat and importlib.util.find_spec("pexpect") is None:
        sys.exit("--chat needs pexpect (pip install pexpect)")

    compile_localrun()
    measured = commands(args)
    timers = {name: (lambda argv=argv: time_command(argv)) for name, argv in measured.items()}
    if args.chat:
        timers["localrun chat, to its prompt"] = lambda: time_chat_prompt(args)
    names = list(timers)
    times: dict[str, list[float]] = {name: [] for name in names}
    print(f"{args.model.name}: {len(names)} commands, 1 warm-up round + {args.runs} rounds, order rotating")
    for round_ in range(args.runs + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            took = timers[name]()
            if round_ > 0:
                times[name].append(took)

    median = {name: statistics.median(values) for name, values in times.items()}
    width = max(len(name) for name in names)
    print(f"\n{'command':<{width}}  median     min     max")
    for name in names:
        values = times[name]
        print(f"{name:<{width}}  {median[name]:6.3f}  {min(values):6.3f}  {max(values):6.3f}  s")
    print()
    floor = "floor (llama_cpp C API)"
    for ours, theirs in (
        ("localrun run", "llama-cli -st"),
        ("localrun run --raw", "llama-completion"),
        ("localrun chat, to its prompt", "llama-cli -st"),
        ("localrun run", floor),
        ("localrun run --raw", floor),
        ("llama-cli -st", floor),
    ):
        if ours in median and theirs in median:
            print(f"{ours} / {theirs}: {median[ours] / median[theirs]:.2f}x")


if __name__ == "__main__":
    main()
