#!/usr/bin/env python3
"""Three `localrun serve` cases of issue 17, each in one run, against llama.cpp's own server where
it has an answer to the same question. Run it on an otherwise idle machine: compare ratios only.

    python scripts/bench_serve_cases.py --case copy   [--llama-server PATH] [--tokens 400] [--rounds 3]
                                                      [--file notes|code] [--llama-spec TYPE]...
    python scripts/bench_serve_cases.py --case prefix [--llama-server PATH] [--tokens 32] [--rounds 3]
                                                      [--arrive finish|first-token]
    python scripts/bench_serve_cases.py --case busy   [--speculate off,auto] [--tokens 128] [--rounds 3]

Common options: --model PATH (default: the tests' Gemma 3 270M), --threads N, --ctx N (per slot,
default 4096). Requests are raw /v1/completions, greedy (temperature 0), exactly --tokens tokens
(ignore_eos), so every server reads the same tokens and writes as many. Servers start fresh for
each round and take turns, round by round, so a busy machine slows all alike. llama-server is
started as scripts/bench_serve.py starts it (same threads, per-slot context, batch sizes).

copy -- an editor's agent: one client sends a ~1,500-token file and asks for it back with a small
change, the reply started as a model would start it (--file notes: a Markdown file of prose, its
title changed, which Gemma 3 270M copies faithfully; --file code: a Python module, one function
renamed, which that model does not copy: for bigger ones). Decode tok/s (tokens after the first
over the time after the first) of `localrun serve --speculate auto` and `--speculate off`, whether
their texts are identical, and, with --llama-server, llama-server plain and with its own n-gram
speculation (`--spec-type`, one server per --llama-spec value; default ngram-simple, the
prompt-lookup kind, and ngram-mod, what its --spec-default turns on). Targets: auto >= 1.3x off,
token-identical; auto >= 1.0x llama-server with n-gram speculation. Needs `localrun serve
--speculate` (checked first).

prefix -- 4 clients with the same ~2,000-token system prompt (a document) and their own short
question, one after another (each sent when the previous one finished), on 4 slots. Time to first
token of client 1 and of clients 2-4, and their ratio; the cached prompt tokens each reply reports
(usage.prompt_tokens_details.cached_tokens, where the server sends it). Target: clients 2-4 <= 0.2x
client 1, for localrun and against `llama-server --cache-reuse 256`. The prompt differs from its
first words on in every round, so no cache filled by an earlier round helps client 1. With
--arrive first-token, each client comes as soon as the one before has its first token: that slot
is still busy, so the prefix has to be found in another slot (issue 17: copied, not read again).

busy -- the cost curve for the adaptive speculation controller: `localrun serve --parallel 4`,
1, 2 and 4 streaming clients at once, per --speculate mode; each with its own free-text prompt
(nothing to look up) and each with its own copy prompt (much to look up). Per-stream tok/s, the
milliseconds per token of one stream (with speculation off: the decode step time with N busy
sequences), aggregate tok/s, all counted while every stream generates (no prompt being read, none
finished; each streamed piece of text counted as a token); and the time per token at 2 and 4 busy
over 1 busy. No target: it is the
table the controller is tuned from (with 4 busy, speculation should not lose to off).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench_serve import ROOT, Others, Server, Stream, llama_server, load, localrun_server, one_stream, prompt

EVAL = (ROOT / "localrun" / "data" / "eval.txt").read_text()
DOCUMENT = EVAL[: EVAL.rfind("\n\n", 0, 9600)]  # whole paragraphs, ~1,970 tokens
SLOTS = 4  # prefix and busy: a server with 4 slots, as `localrun serve` has by default

# a warehouse module, one block per record kind: (class, its fields, what one is)
RECORDS = [
    ("Item", ["sku", "name", "quantity", "price"], "a thing kept in stock"),
    ("Shelf", ["code", "aisle", "capacity", "weight"], "a place on the floor where items are kept"),
    ("Order", ["number", "customer", "lines", "total"], "what a customer asked for"),
    ("Supplier", ["code", "name", "lead_days", "rating"], "a company the warehouse buys from"),
    ("Invoice", ["number", "supplier", "lines", "amount"], "what a supplier asks to be paid"),
    ("Pallet", ["label", "shelf", "layers", "weight"], "a stack of boxes moved as one"),
]
RENAME = ("restock", "replenish")  # the small change the copy case asks for


def source_file(variant: int) -> str:
    """A plausible Python module of ~1,600 tokens (Gemma's tokenizer), the same for a variant."""
    rng = random.Random(variant)
    low = rng.randrange(5, 50)
    parts = [
        f'"""Stock keeping for warehouse {variant}: what is kept, where, and what moves in and out."""\n\n'
        "from __future__ import annotations\n\nimport csv\nfrom dataclasses import dataclass\n"
        f"from pathlib import Path\n\nLOW_STOCK = {low}\n\n\n"
        f"def {RENAME[0]}(records: list, reason: str) -> None:\n"
        '    """Ask the buyers for more, saying why."""\n'
        '    print(f"restock {len(records)} records: {reason}")\n'
    ]
    for cls, (key, other, count, amount), what in RECORDS:
        name = cls.lower()
        parts.append(
            f'\n\n@dataclass\nclass {cls}:\n    """{what.capitalize()}."""\n\n'
            f"    {key}: str\n    {other}: str\n    {count}: int = 0\n    {amount}: float = 0.0\n\n\n"
            f"def load_{name}s(path: Path) -> list[{cls}]:\n"
            f'    """Every {name} in a CSV file, one a row, after the header."""\n'
            '    with path.open(newline="") as f:\n        rows = list(csv.DictReader(f))\n'
            f'    return [{cls}(r["{key}"], r["{other}"], int(r["{count}"]), float(r["{amount}"])) for r in rows]\n\n\n'
            f"def find_{name}({name}s: list[{cls}], {key}: str) -> {cls} | None:\n"
            f"    for {name} in {name}s:\n        if {name}.{key} == {key}:\n            return {name}\n"
            "    return None\n\n\n"
            f"def {name}_total({name}s: list[{cls}]) -> float:\n"
            f"    total = sum(x.{count} * x.{amount} for x in {name}s)\n"
            f"    if total < LOW_STOCK * {rng.randrange(2, 20)}:\n"
            f'        {RENAME[0]}({name}s, reason="{name} total below the low-stock mark")\n'
            "    return total\n"
        )
    return "".join(parts)


def notes_file(variant: int) -> str:
    """A Markdown file of ~1,500 tokens (Gemma's tokenizer): whole paragraphs of the eval text,
    from a paragraph that depends on the variant, wrapping round at the end."""
    paragraphs = [p for p in EVAL.split("\n\n") if p.strip()]
    parts, k = [f"# Field notes {variant}"], 7 * variant
    while sum(map(len, parts)) < 6600:
        parts.append(paragraphs[k % len(paragraphs)])
        k += 1
    return "\n\n".join(parts) + "\n"


def copy_prompt(variant: int, kind: str = "notes") -> str:
    """A file, a request for a small change, and the start of the reply, as an editor's agent sends
    it: a base model then goes on copying the file, as an instruction-tuned one does. `kind`:
    notes (prose, which Gemma 3 270M copies) or code (a Python module, which it does not: for
    bigger models)."""
    if kind == "notes":
        path, text = f"notes/field_{variant}.md", notes_file(variant)
        change = f'the title changed to "Field notes {variant}, revised"'
        first = text.split("\n\n")[1]  # the title, then the first paragraph as it was
        shown, start = text, f"# Field notes {variant}, revised\n\n{first}\n\n"
    else:
        path, text = f"warehouse/stock_{variant}.py", source_file(variant)
        change = f"the function `{RENAME[0]}` renamed to `{RENAME[1]}` everywhere"
        shown, start = f"```python\n{text}```", f"```python\n{text.splitlines()[0]}\n"
    return (
        f"The file {path}:\n\n{shown}\n\nRewrite {path} with {change}; change nothing else. "
        f"Reply with the whole file.\n\n{start}"
    )


QUESTIONS = [
    "What did the town do when the boats stopped coming?",
    "Who still walked down to the water in the evening, and why?",
    "Name two things the text says were left in the warehouses.",
    "In one sentence, what is the text about?",
]


def prefix_prompt(round_no: int, client: int) -> str:
    """~2,000 tokens of system prompt shared by the 4 clients of a round, then one's question."""
    return (
        f"Session {round_no}. You are the reading assistant of a library. Answer questions about the "
        f"document below in one or two sentences, quoting it where you can.\n\n{DOCUMENT}\n\n"
        f"Question: {QUESTIONS[client % len(QUESTIONS)]}\nAnswer:"
    )


def require_speculate() -> None:
    """The copy and busy cases need the serve option issue 17 adds: say so before starting anything."""
    argv = [sys.executable, "-m", "localrun", "serve", "--help"]
    if "--speculate" not in subprocess.run(argv, capture_output=True, text=True).stdout:
        sys.exit("localrun serve has no --speculate option yet (issue 17): this case needs it")


@contextmanager
def running(server: Server, model_id: str) -> Iterator[int]:
    try:
        server.wait_ready(model_id)
        assert server.port is not None
        yield server.port
    finally:
        server.stop()


def turns(names: list[str], round_no: int) -> list[str]:
    """Each round starts with the next configuration, so none always goes first."""
    k = round_no % len(names)
    return names[k:] + names[:k]


def decode_tps(s: Stream) -> float:
    """Tokens after the first over the time after the first (prefill and TTFT excluded)."""
    assert s.first is not None and s.end is not None
    return (s.tokens - 1) / (s.end - s.first) if s.end > s.first else 0.0


def ttft(s: Stream) -> float:
    assert s.first is not None
    return s.first - s.sent


def cached(s: Stream) -> str:
    details = (s.usage or {}).get("prompt_tokens_details") or {}
    return str(details["cached_tokens"]) if "cached_tokens" in details else "-"


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def copy_case(args, model_id: str, others: Others) -> None:
    require_speculate()
    servers: dict[str, Callable[[], Server]] = {
        "localrun auto": lambda: localrun_server(args, 1, "--speculate", "auto"),
        "localrun off": lambda: localrun_server(args, 1, "--speculate", "off"),
    }
    if args.llama_server:
        servers["llama-server"] = lambda: llama_server(args, 1)
        for kind in args.llama_spec:
            servers[f"llama-server {kind}"] = lambda kind=kind: llama_server(args, 1, "--spec-type", kind)
    runs: dict[str, list[Stream]] = {name: [] for name in servers}
    for r in range(args.rounds):
        for name in turns(list(servers), r):
            with running(servers[name](), model_id) as port:
                stream = Stream(0.0)
                others.start()
                one_stream(port, model_id, copy_prompt(r, args.file), args.tokens, stream)
                others.stop()
                runs[name].append(stream)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    off = runs["localrun off"]
    print(f"model {args.model.name} · threads {args.threads} · {args.tokens} tokens · copy of a file ({args.file})")
    print(f"prompt tokens: {off[0].usage['prompt_tokens'] if off[0].usage else '?'}\n")
    print("| server | decode tok/s | vs localrun off | TTFT s | drafted/accepted | text as localrun off |")
    print("|" + "---|" * 6)
    for name, streams in runs.items():
        ratio = statistics.median(decode_tps(s) / decode_tps(o) for s, o in zip(streams, off))
        t = streams[-1].timings or {}
        drafts = f"{t['draft_n']}/{t['draft_n_accepted']}" if "draft_n" in t else "-"
        same = sum(s.text == o.text for s, o in zip(streams, off))
        print(
            f"| {name} | {statistics.median(map(decode_tps, streams)):.1f} | {ratio:.2f}x | "
            f"{statistics.median(map(ttft, streams)):.3f} | {drafts} | {same}/{len(streams)} |"
        )
    auto = runs["localrun auto"]
    differ = [first_difference(a.text, o.text) for a, o in zip(auto, off) if a.text != o.text]
    verdict = "identical in every round" if not differ else f"DIFFERENT (first at character {differ[0]})"
    ratio = statistics.median(decode_tps(a) / decode_tps(o) for a, o in zip(auto, off))
    print(f"\nspeculation: localrun auto / off {ratio:.2f}x (target >= 1.3x), texts {verdict}")
    for kind in args.llama_spec if args.llama_server else ():
        theirs = runs[f"llama-server {kind}"]
        ratio = statistics.median(decode_tps(a) / decode_tps(t) for a, t in zip(auto, theirs))
        print(f"localrun auto / llama-server --spec-type {kind}: {ratio:.2f}x (target >= 1.0x)")


def one_after_another(port: int, model_id: str, round_no: int, args) -> list[Stream]:
    """The prefix case's clients, each sent when the one before finished (--arrive finish) or
    when it had its first token (--arrive first-token: its slot is still busy, so the next one
    has to take another slot and find the prefix there)."""
    streams, clients = [Stream(0.0) for _ in range(SLOTS)], []
    for i, stream in enumerate(streams):
        text = prefix_prompt(round_no, i)
        clients.append(threading.Thread(target=one_stream, args=(port, model_id, text, args.tokens, stream)))
        clients[-1].start()
        if args.arrive == "finish":
            clients[-1].join()
        while stream.first is None and clients[-1].is_alive():
            time.sleep(0.001)
    for client in clients:
        client.join()
    return streams


def prefix_case(args, model_id: str, others: Others) -> None:
    servers: dict[str, Callable[[], Server]] = {"localrun": lambda: localrun_server(args, SLOTS)}
    if args.llama_server:
        servers["llama-server --cache-reuse 256"] = lambda: llama_server(args, SLOTS, "--cache-reuse", "256")
    runs: dict[str, list[list[Stream]]] = {name: [] for name in servers}
    for r in range(args.rounds):
        for name in turns(list(servers), r):
            with running(servers[name](), model_id) as port:
                others.start()
                runs[name].append(one_after_another(port, model_id, r, args))
                others.stop()
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    print(f"model {args.model.name} · threads {args.threads} · {SLOTS} clients, shared prefix, --arrive {args.arrive}")
    first = runs["localrun"][0][0]
    print(f"prompt tokens: {first.usage['prompt_tokens'] if first.usage else '?'}\n")
    print("| server | TTFT client 1 s | TTFT clients 2-4 s | 2-4 / 1 (target <= 0.2) | cached tokens 1/2/3/4 |")
    print("|" + "---|" * 5)
    later: dict[str, float] = {}
    for name, rounds in runs.items():
        one = statistics.median(ttft(s[0]) for s in rounds)
        later[name] = statistics.median(ttft(c) for s in rounds for c in s[1:])
        ratio = statistics.median(statistics.mean(ttft(c) for c in s[1:]) / ttft(s[0]) for s in rounds)
        reported = "/".join(cached(s) for s in rounds[-1])
        print(f"| {name} | {one:.3f} | {later[name]:.3f} | {ratio:.2f}x | {reported} |")
    if args.llama_server:
        theirs = later["llama-server --cache-reuse 256"]
        print(f"\nTTFT of clients 2-4, localrun / llama-server: {later['localrun'] / theirs:.2f}x")


def steady(streams: list[Stream]) -> tuple[float, float] | None:
    """Per-stream tok/s (median) and aggregate tok/s while every stream was generating: from the
    last first token to the first end, so no prompt is being read and none has finished."""
    start, end = max(s.stamps[0] for s in streams), min(s.end or 0.0 for s in streams)
    if end <= start:
        return None
    rates = [sum(start < t <= end for t in s.stamps) / (end - start) for s in streams]
    return statistics.median(rates), sum(rates)


def busy_case(args, model_id: str, others: Others) -> None:
    require_speculate()
    modes, counts, kinds = args.speculate.split(","), [1, 2, 4], ["free", "copy"]
    results: dict[tuple[str, str, int], list[tuple[float, float]]] = {
        (k, m, n): [] for k in kinds for m in modes for n in counts
    }
    for r in range(args.rounds):
        for mode in turns(modes, r):
            with running(localrun_server(args, SLOTS, "--speculate", mode), model_id) as port:
                for n in counts:
                    for kind in kinds:  # each client its own prompt: no shared prefix, nothing cached
                        variant = r * 100 + n * 10
                        make = prompt if kind == "free" else lambda i, v: copy_prompt(v + i, args.file)
                        texts = [make(i, variant) for i in range(n)]
                        others.start()
                        figures = steady(load(port, model_id, texts, args.tokens))
                        others.stop()
                        if figures is not None:
                            results[kind, mode, n].append(figures)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    print(f"model {args.model.name} · threads {args.threads} · {SLOTS} slots · {args.tokens} tokens/stream")
    print("\n| prompt | speculate | busy | per-stream tok/s | ms/token of a stream | aggregate tok/s |")
    print("|" + "---|" * 6)
    step: dict[tuple[str, str, int], float] = {}
    for (kind, mode, n), figures in results.items():
        if not figures:
            print(f"| {kind} | {mode} | {n} | - | - | - |  (no time when all {n} generated: raise --tokens)")
            continue
        per_stream = statistics.median(f[0] for f in figures)
        step[kind, mode, n] = 1000 / per_stream
        aggregate = statistics.median(f[1] for f in figures)
        print(f"| {kind} | {mode} | {n} | {per_stream:.1f} | {step[kind, mode, n]:.2f} | {aggregate:.1f} |")
    for kind in kinds:
        for mode in modes:
            if (kind, mode, 1) in step:
                curve = ", ".join(
                    f"{n} busy {step[kind, mode, n] / step[kind, mode, 1]:.2f}x"
                    for n in counts[1:]
                    if (kind, mode, n) in step
                )
                print(f"{kind}, --speculate {mode}: time per token over 1 busy: {curve}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["copy", "prefix", "busy"], required=True)
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "tests" / "gemma" / "gemma-3-270m-Q4_K_M.gguf")
    parser.add_argument("--tokens", type=int, help="tokens per reply (copy 400, prefix 32, busy 128)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=4096, help="context per slot")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-server", help="path of llama.cpp's llama-server, to compare with (copy, prefix)")
    parser.add_argument(
        "--llama-spec",
        action="append",
        help="copy: a llama-server --spec-type value to compare with (repeatable; default ngram-simple, ngram-mod)",
    )
    parser.add_argument(
        "--file",
        choices=["notes", "code"],
        default="notes",
        help="copy, busy: the file to rewrite (code: for bigger models)",
    )
    parser.add_argument(
        "--arrive",
        choices=["finish", "first-token"],
        default="finish",
        help="prefix: the next client comes when the one before finished, or once it has its first token",
    )
    parser.add_argument("--speculate", default="off,auto", help="busy: localrun serve --speculate modes to compare")
    args = parser.parse_args()
    args.tokens = args.tokens or {"copy": 400, "prefix": 32, "busy": 128}[args.case]
    args.llama_spec = args.llama_spec or ["ngram-simple", "ngram-mod"]
    model_id = args.model.name.removesuffix(".gguf")
    others = Others()
    {"copy": copy_case, "prefix": prefix_case, "busy": busy_case}[args.case](args, model_id, others)
    print(f"\n{others.note()}")


if __name__ == "__main__":
    main()
