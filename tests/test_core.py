"""The one generation core, seen from its callers: `serve` gets what `run` has (speculation, the
prompt cache) and `run` what `serve` has (logprobs), with the same tokens; a prefix one slot holds
is copied into another rather than read again."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from support.serving import ServerProcess

TINY = "tiny-llama-Q8_0"
SYSTEM = "You are a careful assistant who answers in full sentences. " * 10  # well over 64 tokens
NEAR_TIE = 0.75  # nats: how far batching moves the top two logits (see test_serve_concurrency)
REPEATING = "the cat sat on the mat and the dog sat on the log; " * 6  # what prompt lookup drafts from


def run_json(model: Path, prompt: str, *args: str, stdin: str | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "localrun", "run", str(model), prompt, "--json", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def tokens_of(logprobs: list) -> list[tuple[bytes, list[tuple[bytes, float]]]]:
    """(token, [(alternative, logprob)...]) from OpenAI's shape, as a client object or a dict."""
    out = []
    for t in logprobs:
        t = t if isinstance(t, dict) else t.model_dump()
        out.append((bytes(t["bytes"]), [(bytes(a["bytes"]), a["logprob"]) for a in t["top_logprobs"]]))
    return out


def assert_same_or_near_tie(plain: list, other: list) -> bool:
    """True when the tokens are identical; else the first difference must sit where plain
    decoding's top two were within NEAR_TIE (batching moves the logits a little)."""
    for i, ((a, tops), (b, _)) in enumerate(zip(plain, other)):
        if a != b:
            assert len(tops) >= 2 and tops[0][1] - tops[1][1] < NEAR_TIE, f"token {i} differs where run was sure"
            return False
    assert len(plain) == len(other)
    return True


def test_run_logprobs_are_the_servers(tiny):
    model = tiny.quants["Q8_0"]
    args = ("--temperature", "0", "--repeat-penalty", "1", "-n", "12", "--ignore-eos", "--no-prompt-cache")
    local = run_json(model, "the weather", *args, "--logprobs", "3")
    with ServerProcess([model], "--parallel", "2") as server:
        reply = server.client().chat.completions.create(
            model=TINY,
            messages=[{"role": "user", "content": "the weather"}],
            max_tokens=12,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
            extra_body={"ignore_eos": True},
        )
    served = reply.choices[0].logprobs.content
    assert reply.choices[0].message.content == local["text"]
    assert [bytes(t.bytes) for t in served] == [bytes(t["bytes"]) for t in local["logprobs"]]
    for mine, theirs in zip(local["logprobs"], served):
        assert mine["logprob"] == pytest.approx(theirs.logprob, abs=1e-3)
        assert [a["token"] for a in mine["top_logprobs"]] == [a.token for a in theirs.top_logprobs]
        assert [a["logprob"] for a in mine["top_logprobs"]] == pytest.approx(
            [a.logprob for a in theirs.top_logprobs], abs=1e-3
        )
    streamed = subprocess.run(
        [sys.executable, "-m", "localrun", "run", str(model), "the weather", "--json", "--stream", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    pieces = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert all("logprobs" not in p for p in pieces)  # only when asked for


def _speculation_matches_run(model: Path, name: str, prompts: list[str], tokens: int, *serve_args: str) -> None:
    args = ("--temperature", "0", "--repeat-penalty", "1", "-n", str(tokens), "--ignore-eos", "--no-prompt-cache")
    plain = [run_json(model, p, *args, "--speculate", "off", "--logprobs", "2") for p in prompts]
    with ServerProcess([model], "--parallel", "2", "--speculate", "lookup", *serve_args) as server:
        client = server.client()
        identical = drafted = 0
        for prompt, want in zip(prompts, plain):
            reply = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=tokens,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
                extra_body={"ignore_eos": True},
            )
            got = tokens_of(reply.choices[0].logprobs.content)
            identical += assert_same_or_near_tie(tokens_of(want["logprobs"]), got)
            drafted += reply.model_extra["timings"]["draft_n"]
    assert identical >= 1 and drafted > 0  # drafts were verified, and most replies match outright


def test_serve_with_speculation_gives_the_tokens_of_run_without(tiny):
    prompts = [f"Repeat this: {REPEATING}", "The history of Paris", f"Copy: {REPEATING.upper()}"]
    _speculation_matches_run(tiny.quants["Q8_0"], TINY, prompts, 48)


@pytest.mark.slow
def test_serve_with_speculation_gives_gemmas_tokens_of_run_without(gemma):
    prompts = [f"Repeat this text exactly: {REPEATING}", "The capital of France is"]
    _speculation_matches_run(gemma, "gemma-3-270m-Q4_K_M", prompts, 40, "--ctx", "1024")


def test_a_system_prompt_in_the_prompt_cache_is_read_only_once(tiny, tmp_path):
    """A request whose system prompt another server run saved reads only the rest."""
    model = tiny.quants["Q8_0"]
    env = {**__import__("os").environ, "LOCALRUN_HOME": str(tmp_path)}

    def ask(question: str):
        with ServerProcess([model], "--parallel", "2", env=env) as server:
            return server.client().chat.completions.create(
                model=TINY,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                max_tokens=4,
                temperature=0,
            )

    first, second = ask("What is the sea?"), ask("Why is the sky blue?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 100 and second.model_extra["timings"]["cached_from_disk"] == cached
    assert second.usage.prompt_tokens - cached < 30  # the question and the template's tail only


def test_a_second_slot_copies_the_prefix_the_first_holds(tiny):
    """While one slot generates after a long system prompt, a request with the same one takes the
    other slot and copies the prefix instead of reading it (the prompt cache off: no disk)."""
    model = tiny.quants["Q8_0"]
    with ServerProcess([model], "--parallel", "2", "--no-prompt-cache") as server:
        client = server.client()
        messages = [{"role": "system", "content": SYSTEM}]
        first = client.chat.completions.create(
            model=TINY,
            messages=[*messages, {"role": "user", "content": "Tell a long story."}],
            max_tokens=400,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        started = threading.Event()
        chunks = []

        def drain():
            for chunk in first:
                chunks.append(chunk)
                started.set()

        reader = threading.Thread(target=drain)
        reader.start()
        assert started.wait(60)
        assert server.health()["models"][0]["busy"] == 1
        second = client.chat.completions.create(
            model=TINY, messages=[*messages, {"role": "user", "content": "Why?"}], max_tokens=4, temperature=0
        )
        busy_meanwhile = not chunks[-1].choices or chunks[-1].choices[0].finish_reason is None
        reader.join(120)
    assert busy_meanwhile  # the first was still generating: the second had the other slot
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 100 and second.model_extra["timings"]["cached_from_disk"] == 0


def test_a_conversation_longer_than_a_slot_loses_its_oldest_turns(tiny):
    """As a chat does: the oldest turns go (never the system prompt or the question), said in the
    server's log; a single message too long for the slot is still a 400."""
    model = tiny.quants["Q8_0"]
    turns = []
    for i in range(12):
        turns += [
            {"role": "user", "content": f"question {i}: " + "the old man and the sea " * 6},
            {"role": "assistant", "content": f"answer {i}: " + "the dog went home " * 6},
        ]
    messages = [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "and now?"}]
    with ServerProcess([model], "--parallel", "1", "--ctx", "512") as server:
        reply = server.client().chat.completions.create(model=TINY, messages=messages, max_tokens=8, temperature=0)
        log = server.stderr
    assert reply.choices[0].finish_reason == "length" and reply.usage.prompt_tokens <= 512 - 8
    assert "dropped its" in log and "oldest messages to fit a slot's context" in log
