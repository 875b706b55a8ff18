#!/usr/bin/env python3
"""`localrun search` over 20 repos on the Hub emulator: a cold cache (every listing and header read
over HTTP) against a warm one (the list alone), in one run, as a ratio; and the table at 80 columns.

    python scripts/bench_search.py [--repos 20] [--reps 3] [--slow 0.0]

Real processes (`python -m localrun search --limit N --json`), wall time from spawn to exit, each
repetition with an emptied repo cache for the cold search, then the same search again. The
emulator answers on loopback; `--slow` adds a delay per 64 KiB of file read (seconds) to stand
for a slower link. The ratio is what to compare, never the absolute times. Target: warm <= 0.2x
cold.
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

from support.hub import HubEmulator  # noqa: E402
from support.models import build_suite  # noqa: E402

QUANTS = ("F16", "Q8_0", "Q6_K", "Q4_K_M", "Q2_K")


def search(env: dict[str, str], repos: int, *extra: str) -> tuple[dict | str, float]:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "localrun", "search", "--limit", str(repos), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    elapsed = time.perf_counter() - started
    return (json.loads(done.stdout) if "--json" in extra else done.stdout), elapsed


def table_at_80_columns(env: dict[str, str], repos: int) -> str:
    """The table as an 80-column terminal shows it, rendered here with the same Output policy."""
    import io

    from rich.console import Console

    from localrun.commands.search import search as run_search
    from localrun.commands.search import show_search
    from localrun.output import Output

    os.environ.update(env)
    screen = io.StringIO()
    out = Output(stdout_tty=True, _out=Console(file=screen, width=80, no_color=True))
    show_search(out, run_search(None, out, limit=repos))
    return screen.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repos", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--slow", type=float, default=0.0, help="seconds added per 64 KiB of a file read")
    args = ap.parse_args()
    suite = build_suite(ROOT / ".cache" / "tests" / "models")
    work = Path(tempfile.mkdtemp(prefix="localrun-bench-search-"))
    try:
        with HubEmulator() as hub:
            for i in range(args.repos):  # repos of 1 to 5 quants, different downloads
                quants = QUANTS[: 1 + i % len(QUANTS)]
                files = {f"model{i}-{q}.gguf": suite.quants[q] for q in quants}
                hub.add_repo(f"bench/model{i:02d}-GGUF", files, downloads=1000 - i, likes=i)
            if args.slow:
                hub.inject("slow", times=-1, method="*", delay=args.slow)
            env = {**os.environ, "HF_ENDPOINT": hub.url, "LOCALRUN_HOME": str(work / "home"), "COLUMNS": "80"}
            env["HF_HOME"] = str(work / "hf")
            env.pop("HF_HUB_OFFLINE", None)
            search(env, 1, "--json")  # the one-time self-test of the build, outside the timings
            cold, warm = [], []
            for _ in range(args.reps):
                shutil.rmtree(work / "home" / "repos", ignore_errors=True)
                requests = len(hub.log)
                first, seconds = search(env, args.repos, "--json")
                cold.append(seconds)
                read = len(hub.log) - requests
                second, seconds = search(env, args.repos, "--json")
                warm.append(seconds)
                plans = [
                    [{k: v for k, v in r.items() if k != "from_cache"} for r in s["results"]] for s in (first, second)
                ]
                assert plans[0] == plans[1], "a warm search must give the same plans"
                assert all(r["from_cache"] for r in second["results"]), "a warm search reads the cache"
                assert len(hub.log) - requests - read == 1, "a warm search asks for the list alone"
            table = table_at_80_columns(env, args.repos)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"{args.repos} repos, {args.reps} repetitions, {args.slow * 1000:.0f} ms added per 64 KiB read")
    print(f"cold: median {c:.2f} s ({', '.join(f'{s:.2f}' for s in cold)}); {read} requests")
    print(f"warm: median {w:.2f} s ({', '.join(f'{s:.2f}' for s in warm)}); 1 request")
    print(f"warm / cold: {w / c:.2f}x")
    print("\nthe table on an 80-column terminal (from the warm cache):")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
