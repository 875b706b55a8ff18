#!/usr/bin/env python3
"""Embeddings throughput of `localrun serve` against llama.cpp's own server on the same model.

    python scripts/bench_embed.py [--model PATH] [--inputs 256] [--threads 2] [--rounds 3]
                                  [--ctx 512] [--llama-server PATH] [--llama-parallel 8]

Each round sends --inputs texts of ~100 tokens (made unique per round) in one /v1/embeddings
request to each server in turn, so that a busy machine slows both alike, and times it: texts/s.
`localrun serve` embeds with its default pooling (mean for a generative model whose GGUF names
none), --embed-ctx --ctx tokens per decode; llama-server runs with --embeddings, the same pooling,
threads, and --ctx tokens per decode (-b/-ub), with --llama-parallel slots to batch inputs across
(sharing one KV buffer, --kv-unified).
The vectors of both are compared too (cosine of each input's pair): they should agree.
Target (issue 19): localrun >= 1.0x llama-server's texts/s. Run it on an otherwise idle machine;
compare ratios only. The default llama-server is the one built beside llama-cpp-python's sources.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench_serve import ROOT, TOPICS, Server, free_port

DEFAULT_LLAMA_SERVER = "/tmp/anchors/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"
POOLING = {"none": None, "mean": "mean", "cls": "cls", "last": "last"}


def texts(n: int, round_no: int) -> list[str]:
    """n texts of about 100 tokens, unique per round (no server can reuse an earlier one)."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        out.append(
            f"Entry {round_no}.{i}: a short account of {topic}. It tells where the practice began, who took it up "
            f"and why, which tools and materials it needed, how each step was done by hand, what went wrong when "
            f"it was hurried, and how the people of later centuries changed it, until it became what we know of "
            f"{topic} today, in the towns and in the countryside alike."
        )
    return out


def embed(port: int, model: str, inputs: list[str]) -> tuple[float, list[list[float]]]:
    """Seconds for one /v1/embeddings request of all `inputs`, and the vectors."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    body = json.dumps({"model": model, "input": inputs, "encoding_format": "float"})
    started = time.perf_counter()
    conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    seconds = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"/v1/embeddings answered {response.status}: {data[:300]!r}")
    rows = sorted(json.loads(data)["data"], key=lambda d: d["index"])
    return seconds, [row["embedding"] for row in rows]


def ready(server: Server) -> int:
    """Wait until the server answers /health with 200; its port."""
    if server.port is None:  # localrun prints its URL once it listens
        assert server.proc.stdout is not None
        url = server.proc.stdout.readline().decode().strip()
        server.port = int(url.rsplit(":", 1)[1].split("/")[0])
    deadline = time.monotonic() + 300
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return server.port
        except OSError:
            pass
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise RuntimeError(f"{server.argv[0]} did not start")
        time.sleep(0.2)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / ((sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "tests" / "gemma" / "gemma-3-270m-Q4_K_M.gguf")
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=512, help="tokens per decode (and at most per input)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pooling", default="mean", help="llama-server's --pooling: localrun's choice for the model")
    parser.add_argument("--llama-server", default=DEFAULT_LLAMA_SERVER, help="llama.cpp's llama-server ('' to skip)")
    parser.add_argument("--llama-parallel", type=int, default=8, help="llama-server's slots (-np)")
    args = parser.parse_args()

    model = args.model.stem
    argv = [sys.executable, "-m", "localrun", "serve", str(args.model), "--port", "0", "--parallel", "1"]
    argv += ["--ctx", "256", "--threads", str(args.threads), "--keep-alive", "forever", "--embed-ctx", str(args.ctx)]
    mine = Server(argv, None)
    servers = {"localrun": mine}
    if args.llama_server and Path(args.llama_server).exists():
        port, n = free_port(), args.llama_parallel
        argv = [args.llama_server, "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--embeddings", "--pooling", args.pooling, "-np", str(n), "-c", str(n * args.ctx)]
        argv += ["-b", str(args.ctx), "-ub", str(args.ctx), "-t", str(args.threads), "-tb", str(args.threads)]
        # one KV buffer for every slot, as localrun's embedding context has: without it this build's
        # llama-server pools some inputs of a multi-slot batch wrongly (cosine 0.7-0.9 against the
        # same input alone, on the tiny model)
        argv += ["-ngl", "0", "--no-webui", "--kv-unified"]
        servers["llama-server"] = Server(argv, port)
    elif args.llama_server:
        print(f"no llama-server at {args.llama_server}: timing localrun alone", file=sys.stderr)
    try:
        ports = {name: ready(server) for name, server in servers.items()}
        for port in ports.values():  # warm up: the embedding context is made on first use
            embed(port, model, texts(4, -1))
        rates: dict[str, list[float]] = {name: [] for name in servers}
        agreement: list[float] = []
        for round_no in range(args.rounds):
            inputs = texts(args.inputs, round_no)
            vectors = {}
            order = list(ports) if round_no % 2 == 0 else list(reversed(ports))
            for name in order:
                seconds, vectors[name] = embed(ports[name], model, inputs)
                rates[name].append(len(inputs) / seconds)
                print(f"round {round_no + 1} {name}: {len(inputs) / seconds:.1f} texts/s", file=sys.stderr)
            if len(vectors) == 2:
                agreement.append(min(cosine(a, b) for a, b in zip(*vectors.values())))
    finally:
        for server in servers.values():
            server.stop()

    print(f"\n{args.inputs} inputs of ~100 tokens, {args.threads} threads, {args.model.name}\n")
    print("| server | texts/s (median) | rounds |\n|---|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    if "llama-server" in rates:
        ratio = statistics.median(rates["localrun"]) / statistics.median(rates["llama-server"])
        print(f"\nlocalrun / llama-server: {ratio:.2f}x; vectors agree: min cosine {min(agreement):.5f}")


if __name__ == "__main__":
    main()
