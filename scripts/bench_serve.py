#!/usr/bin/env python3
"""`localrun serve` under load, against llama.cpp's own server on the same model, in one run.

    python scripts/bench_serve.py [--model PATH] [--clients 1,2,4,8] [--tokens 128] [--threads 2]
                                  [--ctx 1024] [--rounds 3] [--llama-server PATH]

For each number of clients N: a server with N slots (`localrun serve --parallel N`; with
--llama-server, `llama-server -np N` with the same model, threads, per-slot context, batch sizes
and a full-size SWA cache, as localrun keeps), then N streaming clients at once, each with its
own fixed prompt (~100 tokens, made unique per round so no server reuses a cached prefix), greedy,
exactly --tokens tokens (ignore_eos). The servers take turns, round by round, so a busy machine
slows both alike. Figures: aggregate generated tok/s (all tokens / from the first request to the
last token), time to first token p50/p95 over every request, per-stream tok/s (after its first
token). Also `localrun run`'s decode speed on the same prompt, for the one-client ratio.
Targets (issue 12): 4 clients: aggregate >= 1.0x llama-server's, TTFT p95 <= 1.2x llama-server's;
1 client >= 0.97x `localrun run`. Run it on an otherwise idle machine; compare ratios only.
The cases of issue 17 (copy-heavy speculation, a shared prefix, the cost of busy sequences) are in
scripts/bench_serve_cases.py, over this script's helpers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPICS = [
    "the history of the river valley and the towns along it",
    "how bread is baked in a wood-fired oven",
    "the migration of birds across the northern sea",
    "the workings of an old mechanical clock",
    "the building of a stone bridge in a mountain village",
    "the life of bees through one summer",
    "a journey by train across a wide plain",
    "the making of paper from wood and rags",
]


def prompt(i: int, round_no: int) -> str:
    topic = TOPICS[i % len(TOPICS)]
    return (
        f"Notes {round_no}.{i}. What follows is a long and careful account of {topic}, written for readers who "
        f"know nothing about it. It begins with the earliest records, explains each step in plain words, names "
        f"the people involved and the tools they used, and ends with what changed over the centuries. The account "
        f"of {topic} starts here, in the first chapter, with the questions that first led people to study it:"
    )


@dataclass
class Stream:
    sent: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    text: str = ""
    usage: dict | None = None  # the last chunk's, as the server sent it
    timings: dict | None = None  # llama-server's and localrun's own figures, when sent
    stamps: list[float] = field(default_factory=list)  # when each piece of text came


def one_stream(port: int, model: str, text: str, tokens: int, out: Stream, **fields) -> None:
    """One streaming /v1/completions request, greedy and exactly `tokens` long unless `fields`
    (request fields such as ignore_eos) say otherwise."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {
        "model": model,
        "prompt": text,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        **fields,
    }
    out.sent = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    pieces, texts = 0, []
    while line := response.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        for choice in chunk.get("choices") or ():
            if choice.get("text"):
                out.stamps.append(time.perf_counter())
                out.first = out.first or out.stamps[-1]
                pieces += 1
                texts.append(choice["text"])
        if chunk.get("usage"):
            out.usage = chunk["usage"]
            out.tokens = chunk["usage"]["completion_tokens"]
        if chunk.get("timings"):
            out.timings = chunk["timings"]
    out.text = "".join(texts)
    out.end = time.perf_counter()
    out.tokens = out.tokens or pieces
    conn.close()


class Others:
    """CPU time taken by processes outside this benchmark (other people's test runs) while it
    measured: figures taken on a busy machine are not comparable, and the table says so."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.busy = 0.0  # CPU seconds of others
        self.wall = 0.0

    def _times(self) -> dict[int, float]:
        psutil = self._psutil
        mine = {psutil.Process().pid, *(c.pid for c in psutil.Process().children(recursive=True))}
        times = {}
        for proc in psutil.process_iter(["pid"]):
            if proc.pid in mine:
                continue
            try:
                t = proc.cpu_times()
                times[proc.pid] = t.user + t.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return times

    def start(self) -> None:
        self._before, self._t0 = self._times(), time.perf_counter()

    def stop(self) -> None:
        after = self._times()
        self.busy += sum(t - self._before.get(pid, 0.0) for pid, t in after.items())
        self.wall += time.perf_counter() - self._t0

    @property
    def share(self) -> float:
        return self.busy / (self.wall * (os.cpu_count() or 1)) if self.wall else 0.0

    def note(self) -> str:
        note = f"other processes took {100 * self.share:.0f}% of the CPU while the load ran"
        return note + (": the machine was busy, these figures are noise" if self.share > 0.1 else "")


def load(port: int, model: str, texts: list[str], tokens: int) -> list[Stream]:
    """One streaming client per prompt, all at once."""
    streams = [Stream(0.0) for _ in texts]
    threads = [
        threading.Thread(target=one_stream, args=(port, model, text, tokens, stream))
        for text, stream in zip(texts, streams)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return streams


class Server:
    def __init__(self, argv: list[str], port: int | None, env: dict[str, str] | None = None):
        self.argv, self.port = argv, port
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)

    def wait_ready(self, model: str) -> None:
        if self.port is None:  # localrun prints its URL once it listens
            assert self.proc.stdout is not None
            url = self.proc.stdout.readline().decode().strip()
            self.port = int(url.rsplit(":", 1)[1].split("/")[0])
        deadline = time.monotonic() + 300
        while True:  # llama-server answers 503 while it loads
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} did not start")
            time.sleep(0.2)
        one_stream(self.port, model, "warm up", 4, Stream(0.0))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def localrun_server(args, n: int, *extra: str) -> Server:
    """`localrun serve` with n slots of args.ctx tokens each; `extra`: more of its options."""
    argv = [sys.executable, "-m", "localrun", "serve", str(args.model), "--port", "0", "--parallel", str(n)]
    argv += ["--ctx", str(args.ctx), "--threads", str(args.threads), "--keep-alive", "forever", *extra]
    return Server(argv, None)


def llama_server(args, n: int, *extra: str) -> Server:
    """`llama-server -np n` set up as localrun serve is; `extra`: more of its options."""
    port = free_port()
    argv = [args.llama_server, "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port), "-np", str(n)]
    argv += ["-c", str(n * args.ctx), "-t", str(args.threads), "-tb", str(args.threads), "-ngl", "0"]
    argv += ["-b", "2048", "-ub", "512", "--swa-full", "--no-webui", "-cram", "0", *extra]
    return Server(argv, port)


def run_decode_speed(args) -> float:
    """`localrun run`'s generation speed on the same model, threads and a prompt of the same kind."""
    argv = [sys.executable, "-m", "localrun", "run", str(args.model), "--raw", "--json", "--temp", "0"]
    argv += ["--ignore-eos", "-n", str(args.tokens), "--threads", str(args.threads), "--repeat-penalty", "1"]
    argv += ["--ctx", str(args.ctx), "--no-prompt-cache", "--speculate", "off", prompt(0, 999)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout)["gen_tps"])


@dataclass
class Figures:
    aggregate: list[float]
    ttft: list[float]
    per_stream: list[float]

    def add(self, streams: list[Stream]) -> None:
        start = min(s.sent for s in streams)
        end = max(s.end or 0.0 for s in streams)
        self.aggregate.append(sum(s.tokens for s in streams) / (end - start))
        for s in streams:
            assert s.first is not None and s.end is not None
            self.ttft.append(s.first - s.sent)
            if s.end > s.first:
                self.per_stream.append((s.tokens - 1) / (s.end - s.first))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "tests" / "gemma" / "gemma-3-270m-Q4_K_M.gguf")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=1024, help="context per slot")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-server", help="path of llama.cpp's llama-server, to compare with")
    args = parser.parse_args()
    model_id = args.model.name.removesuffix(".gguf")
    counts = [int(c) for c in args.clients.split(",")]
    kinds = ["localrun"] + (["llama-server"] if args.llama_server else [])
    results = {(k, n): Figures([], [], []) for k in kinds for n in counts}
    run_tps: list[float] = []
    others = Others()
    for n in counts:
        for r in range(args.rounds):
            order = kinds if r % 2 == 0 else kinds[::-1]  # take turns: neither always goes first
            for kind in order:
                server = localrun_server(args, n) if kind == "localrun" else llama_server(args, n)
                try:
                    server.wait_ready(model_id)
                    assert server.port is not None
                    others.start()
                    texts = [prompt(i, r * 100 + n) for i in range(n)]
                    results[kind, n].add(load(server.port, model_id, texts, args.tokens))
                    others.stop()
                finally:
                    server.stop()
            if n == 1:
                run_tps.append(run_decode_speed(args))
            print(f"clients {n}, round {r + 1}/{args.rounds} done", file=sys.stderr)

    print(f"model {args.model.name} · threads {args.threads} · ctx {args.ctx}/slot · {args.tokens} tokens/stream")
    header = "| clients | server | aggregate tok/s | TTFT p50 s | TTFT p95 s | per-stream tok/s |"
    print(header + "\n|" + "---|" * 6)
    for n in counts:
        for kind in kinds:
            f = results[kind, n]
            print(
                f"| {n} | {kind} | {statistics.median(f.aggregate):.1f} | {pct(f.ttft, 0.5):.3f} | "
                f"{pct(f.ttft, 0.95):.3f} | {statistics.median(f.per_stream):.1f} |"
            )
    if args.llama_server:
        print("\n| clients | aggregate localrun/llama-server | TTFT p95 localrun/llama-server |\n|---|---|---|")
        for n in counts:
            mine, theirs = results["localrun", n], results["llama-server", n]
            agg = statistics.median(mine.aggregate) / statistics.median(theirs.aggregate)
            print(f"| {n} | {agg:.2f}x | {pct(mine.ttft, 0.95) / pct(theirs.ttft, 0.95):.2f}x |")
    print(f"\n{others.note()}")
    if run_tps:
        one = statistics.median(results["localrun", 1].per_stream)
        run = statistics.median(run_tps)
        print(f"\none client: {one:.1f} tok/s served, `localrun run` {run:.1f} tok/s: {one / run:.2f}x")


if __name__ == "__main__":
    main()
