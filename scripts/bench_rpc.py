#!/usr/bin/env python3
"""A model split across two loopback workers against the same model run locally, and against
llama.cpp's own rpc-server + llama-completion on the same split; and what the split sends over
the network, per token.

    python scripts/bench_rpc.py [--model PATH] [--pp 256] [--tg 64] [--reps 3] [--threads N]
        [--rpc-server PATH --llama-completion PATH] [--warmup] [--bytes-only]

- local vs split: `localrun run MODEL --json` (prompt and generation speed from its stats)
  without and with `--rpc` to two `localrun worker`s started here on loopback ports; repetitions
  interleaved, in alternating order; speculative decoding and the prompt cache off, temperature 0
  after run's repeat penalty (1.1, given explicitly, over the last 64 tokens), a fixed-length reply.
- with --rpc-server and --llama-completion (llama.cpp's ggml-rpc-server and llama-completion,
  built from the vendored sources with -DGGML_RPC=ON): two of llama.cpp's servers beside ours,
  and llama-completion run on them in the same repetitions, doing the same work as `localrun run`:
  the same prompt text (the same tokens: the script checks the count), reply length (end of text
  banned), sampler chain (the same repeat penalty, then greedy: top-k 1, as llama.cpp spells it),
  threads for the client and each worker, batch and micro-batch, context (with its full-size
  sliding-window cache, as localrun makes it), and the plan's split (-ngl, -ts, the output layer
  here with -ot); no warm-up run (localrun run has none; --warmup gives llama.cpp its own). Its
  speeds come from its perf print: prefill = prompt tokens / prompt eval time; decode = reply
  tokens / (sampling + eval time), the span localrun's generation speed covers (every token
  sampled, all but the last decoded); eval tokens / eval time is shown beside it. Ratio
  localrun/llama.cpp per phase, of the medians and the median of each repetition's pair (target
  >= 0.95).
- bytes: for the counted runs each worker is reached through a counting TCP proxy in this script
  (the timed runs go straight to the workers). Two runs that differ only in reply length (and two
  in prompt length) give the bytes each generated (and each prompt) token costs, both ways, and
  the request/reply turns per token: what a real network adds, worked out for a few links at the
  end (turns x round-trip time + bytes / bandwidth). llama.cpp's generated-token bytes are counted
  the same way, as a check that both put the output layer in the same place.
Do not trust figures from a machine that other work is using: run it on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCALRUN = [sys.executable, "-m", "localrun"]
WORDS = [
    "the",
    "river",
    "valley",
    "farmers",
    "settled",
    "along",
    "its",
    "banks",
    "built",
    "canals",
    "and",
    "traded",
    "grain",
    "upstream",
]
PENALTY, PENALTY_LAST_N = 1.1, 64  # run's default repeat penalty (its window is not an option of run)
LINKS = [  # name, round-trip time (s), bytes per second
    ("loopback (measured)", None, None),
    ("10 GbE LAN", 50e-6, 1.17e9),
    ("1 GbE LAN", 200e-6, 117e6),
    ("Wi-Fi 6", 3e-3, 60e6),
    ("SSH tunnel over the internet", 20e-3, 10e6),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingProxy:
    """Forwards 127.0.0.1:port to a worker and counts the bytes and turns each way."""

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self.up = self.down = self.turns = 0
        self._last = ""
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> tuple[int, int, int]:
        counts = (self.up, self.down, self.turns)
        self.up = self.down = self.turns = 0
        return counts

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            worker = socket.create_connection(("127.0.0.1", self.target))
            for sock in (client, worker):  # as ggml's transport does: no Nagle delay on small messages
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, worker), daemon=True).start()

    def _pump(self, client: socket.socket, worker: socket.socket) -> None:
        peers = {client: worker, worker: client}
        while True:
            ready, _, _ = select.select(list(peers), [], [])
            for sock in ready:
                data = sock.recv(1 << 20)
                if not data:
                    client.close()
                    worker.close()
                    return
                peers[sock].sendall(data)
                way = "up" if sock is client else "down"
                if way == "up":
                    self.up += len(data)
                    if self._last != "up":
                        self.turns += 1
                else:
                    self.down += len(data)
                self._last = way


def start_worker(argv: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{argv[0]} did not listen on {port}")


def prompt_of(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def run(model: Path, prompt: str, tg: int, threads: int, rpc: str | None) -> dict:
    argv = [*LOCALRUN, "run", str(model), prompt, "--raw", "--json", "--temperature", "0", "--ignore-eos"]
    argv += ["--max-tokens", str(tg), "--speculate", "off", "--no-prompt-cache", "--threads", str(threads)]
    argv += ["--repeat-penalty", str(PENALTY)]
    if rpc:
        argv += ["--rpc", rpc]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"localrun run failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


PERF = re.compile(r"(prompt eval|eval|sampling) time =\s*([\d.]+) ms(?: /\s*(\d+) (?:tokens|runs))?")


def llama_completion(
    path: str, model: Path, prompt: str, tg: int, threads: int, rpc: str, plan: dict, warm: bool
) -> dict:
    """One run of llama.cpp's llama-completion on its servers at `rpc`, doing what `run` does."""
    counts = [s["layers"] for s in plan["split"][1:]]
    counts[-1] += 1  # the output layer, counted with the last device as n_gpu_layers counts it
    argv = [path, "-m", str(model), "-p", prompt, "-n", str(tg), "-no-cnv", "--ignore-eos", "--no-display-prompt"]
    argv += ["--repeat-penalty", str(PENALTY), "--repeat-last-n", str(PENALTY_LAST_N), "--samplers", "penalties;top_k"]
    argv += ["--temp", "0", "--top-k", "1", "-s", "0"]  # greedy, as llama.cpp spells it
    argv += ["-t", str(threads), "-tb", str(threads), "-b", "512", "-ub", "512", "-c", str(plan["n_ctx"])]
    argv += ["--swa-full", "--rpc", rpc, "-ngl", str(plan["n_gpu_layers"]), "-ts", ",".join(map(str, counts))]
    if not any(s["endpoint"] is None and s["where"] != "here" for s in plan["split"]):  # no GPU here
        argv += ["-ot", r"^(output|token_embd)\.=CPU"]  # the output layer here, as localrun keeps it
    if not warm:
        argv += ["--no-warmup"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"llama-completion failed ({done.returncode}): {done.stderr[-2000:]}")
    perf = {name: (float(ms) / 1e3, int(n or 0)) for name, ms, n in PERF.findall(done.stderr)}
    (prompt_s, n_prompt), (eval_s, n_eval), (sample_s, _) = perf["prompt eval"], perf["eval"], perf["sampling"]
    return {
        "prompt_tokens": n_prompt,
        "generated_tokens": n_eval + 1,  # the last token sampled is not decoded
        "pp": n_prompt / prompt_s,
        "tg": (n_eval + 1) / (sample_s + eval_s),
        "tg compute": n_eval / eval_s,
        "text": done.stdout,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / ".cache/tests/gemma/gemma-3-270m-Q4_K_M.gguf")
    ap.add_argument("--pp", type=int, default=256, help="prompt words (about as many tokens)")
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rpc-server", help="llama.cpp's rpc-server binary (built with -DGGML_RPC=ON)")
    ap.add_argument("--llama-completion", help="llama.cpp's llama-completion binary, from the same build")
    ap.add_argument("--warmup", action="store_true", help="let llama-completion warm up first (localrun does not)")
    ap.add_argument("--bytes-only", action="store_true", help="count the traffic per token; time nothing")
    args = ap.parse_args()
    anchor = bool(args.rpc_server and args.llama_completion)

    ports = [free_port(), free_port()]
    workers = [start_worker([*LOCALRUN, "worker", "--port", str(p), "--threads", str(args.threads)], p) for p in ports]
    theirs_ports = [free_port(), free_port()] if anchor else []
    for p in theirs_ports:  # llama.cpp's own servers beside ours, idle while the others run
        workers.append(start_worker([args.rpc_server, "-p", str(p), "-t", str(args.threads)], p))
    proxies = [CountingProxy(p) for p in ports]
    theirs_proxies = [CountingProxy(p) for p in theirs_ports]
    rpc = ",".join(f"127.0.0.1:{p}" for p in ports)  # timed: straight to the workers
    theirs_rpc = ",".join(f"127.0.0.1:{p}" for p in theirs_ports)
    try:
        shown = subprocess.run(
            [*LOCALRUN, "show", str(args.model), "--json", "--rpc", rpc], capture_output=True, text=True
        )
        plan = json.loads(shown.stdout)["plan"]
        print("plan:", ", ".join(f"{s['layers']} {s['where']}" for s in plan["split"]))
        prompt = prompt_of(args.pp)
        speeds: dict[str, list[float]] = {}
        texts: dict[str, str] = {}
        n_prompt = 0
        for rep in range(0 if args.bytes_only else args.reps):
            order = ["local", "split", "llama.cpp"] if anchor else ["local", "split"]
            for where in order if rep % 2 == 0 else order[::-1]:  # neither side always runs first
                if where == "llama.cpp":
                    got = llama_completion(
                        args.llama_completion, args.model, prompt, args.tg, args.threads, theirs_rpc, plan, args.warmup
                    )
                    for phase in ("pp", "tg", "tg compute"):
                        speeds.setdefault(f"llama.cpp {phase}", []).append(got[phase])
                    texts[where] = got["text"]
                    continue
                result = run(args.model, prompt, args.tg, args.threads, rpc if where == "split" else None)
                speeds.setdefault(f"{where} pp", []).append(result["prompt_tps"])
                speeds.setdefault(f"{where} tg", []).append(result["gen_tps"])
                texts[where] = result["text"]
                n_prompt = result["prompt_tokens"]
            if anchor and (got["prompt_tokens"], got["generated_tokens"]) != (n_prompt, args.tg):
                raise SystemExit(
                    f"llama-completion read {got['prompt_tokens']} prompt tokens and generated "
                    f"{got['generated_tokens']}; localrun {n_prompt} and {args.tg}: not the same work"
                )
        med = {key: statistics.median(values) for key, values in speeds.items()}
        if not args.bytes_only:
            print(f"\n{'':12}{'local tok/s':>14}{'split tok/s':>14}{'ratio':>8}")
            for phase in ("pp", "tg"):
                local, split = med[f"local {phase}"], med[f"split {phase}"]
                print(f"{phase:12}{local:14.1f}{split:14.1f}{split / local:8.2f}")
            print(f"({n_prompt} prompt tokens, {args.tg} generated; medians of {args.reps})")
        if anchor and not args.bytes_only:
            # each repetition's two runs are next to each other: the median of their ratios is
            # less moved by a machine that is slower for a while than the ratio of the medians
            print(f"\nsplit{'':7}{'localrun':>12}{'llama.cpp':>12}{'ratio':>8}{'paired':>8}")
            for phase in ("pp", "tg"):
                ours, theirs = med[f"split {phase}"], med[f"llama.cpp {phase}"]
                paired = statistics.median(
                    a / b for a, b in zip(speeds[f"split {phase}"], speeds[f"llama.cpp {phase}"])
                )
                print(f"{phase:12}{ours:12.1f}{theirs:12.1f}{ours / theirs:8.2f}{paired:8.2f}")
            print(f"(llama.cpp's eval tokens / eval time, no sampling: {med['llama.cpp tg compute']:.1f} tok/s)")
            same = texts["llama.cpp"].strip() == texts["split"].strip()
            print(f"replies {'identical' if same else 'differ (a near-tie taken another way)'}")
        if not args.bytes_only:
            print("\nevery repetition, tok/s:")
            for key, values in speeds.items():
                print(f"  {key:21}" + " ".join(f"{v:7.1f}" for v in values))

        def traffic(via: list[CountingProxy], prompt_words: int, tg: int, ours: bool = True):
            for p in via:
                p.reset()
            endpoints = ",".join(f"127.0.0.1:{p.port}" for p in via)  # counted: through the proxies
            if ours:
                run(args.model, prompt_of(prompt_words), tg, args.threads, endpoints)
            else:
                llama_completion(
                    args.llama_completion, args.model, prompt_of(prompt_words), tg, args.threads, endpoints, plan, False
                )
            return [p.reset() for p in via]

        short, long = traffic(proxies, args.pp, 8), traffic(proxies, args.pp, 8 + args.tg)
        small, big = traffic(proxies, 16, 1), traffic(proxies, 16 + args.pp, 1)
        print("\nper worker, bytes up (to it) / down (from it) / request turns")
        per_token = []
        for i, p in enumerate(proxies):
            gen = [(b - a) / args.tg for a, b in zip(short[i], long[i])]
            pre = [(b - a) / args.pp for a, b in zip(small[i], big[i])]
            per_token.append(gen)
            print(f"  {p.port}: per generated token {gen[0]:,.0f} / {gen[1]:,.0f} B, {gen[2]:.1f} turns;")
            print(f"  {'':{len(str(p.port))}}  per prompt token {pre[0]:,.0f} / {pre[1]:,.0f} B")
        if anchor:
            short, long = (
                traffic(theirs_proxies, args.pp, 8, False),
                traffic(theirs_proxies, args.pp, 8 + args.tg, False),
            )
            for i in range(len(theirs_proxies)):
                gen = [(b - a) / args.tg for a, b in zip(short[i], long[i])]
                print(
                    f"  llama.cpp's worker {i + 1}: per generated token {gen[0]:,.0f} / {gen[1]:,.0f} B, {gen[2]:.1f} turns"
                )
        turns = sum(g[2] for g in per_token)
        volume = sum(g[0] + g[1] for g in per_token)
        print("\nwhat a network adds per generated token (turns x RTT + bytes / bandwidth), both workers:")
        for name, rtt, bandwidth in LINKS:
            if rtt is None:
                if not args.bytes_only:
                    added = 1 / med["split tg"] - 1 / med["local tg"]
                    print(f"  {name:32}{added * 1e3:8.2f} ms")
                continue
            added = turns * rtt + volume / bandwidth
            print(f"  {name:32}{added * 1e3:8.2f} ms")
    finally:
        for proc in workers:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
