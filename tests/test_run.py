"""`localrun run` and piped `localrun chat`: one answer, plain or JSON, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from localrun.cli import app

runner = CliRunner()
GREEDY = ["--temp", "0", "--ignore-eos"]


def cli(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_run_prints_the_answer_on_stdout_and_stats_on_stderr(tiny):
    result = cli("run", tiny.quants["Q8_0"], "hello", "there", "-n", "6", *GREEDY)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() and result.stdout.endswith("\n")
    assert "reply 6 tok" in result.stderr and "tok/s" in result.stderr and "TTFT" in result.stderr
    assert "tok/s" not in result.stdout


def test_json_is_one_object_and_stream_is_json_lines(tiny):
    result = cli("run", tiny.quants["Q8_0"], "hello", "-n", "5", "--json", *GREEDY)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == str(tiny.quants["Q8_0"]) and data["name"] == "tiny-llama"
    assert data["quant"] == "Q8_0" and data["generated_tokens"] == 5 and data["finish_reason"] == "length"
    assert data["text"] and data["prompt_tokens"] > 0 and data["gen_tps"] > 0
    assert result.stderr == ""
    streamed = cli("run", tiny.quants["Q8_0"], "hello", "-n", "5", "--json", "--stream", *GREEDY)
    events = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert events[0]["kind"] == "start" and events[0]["name"] == "tiny-llama" and events[0]["load_s"] > 0
    assert events[-1]["kind"] == "stats" and events[-1]["generated_tokens"] == 5
    assert "".join(e["text"] for e in events if e["kind"] == "piece") == data["text"]  # greedy: the same text


def test_piped_stdin_is_the_material_and_the_argument_the_instruction(tiny):
    """The material first, the instruction last (what comes first is what the prompt cache reuses)."""
    model = tiny.quants["Q8_0"]
    combined = cli(
        "run", model, "--raw", "-n", "6", "--json", *GREEDY, "summarize this", input="the old man and the sea\n"
    )
    by_hand = cli("run", model, "--raw", "-n", "6", "--json", *GREEDY, "the old man and the sea\n\nsummarize this")
    only_stdin = cli("run", model, "--raw", "-n", "6", "--json", *GREEDY, input="the old man and the sea\n")
    by_hand_stdin = cli("run", model, "--raw", "-n", "6", "--json", *GREEDY, "the old man and the sea")
    for result in (combined, by_hand, only_stdin, by_hand_stdin):
        assert result.exit_code == 0, result.stderr
    first, second = json.loads(combined.stdout), json.loads(by_hand.stdout)
    assert first["prompt_tokens"] == second["prompt_tokens"] and first["text"] == second["text"]
    assert json.loads(only_stdin.stdout)["text"] == json.loads(by_hand_stdin.stdout)["text"]


def test_chat_with_piped_stdin_answers_once(tiny):
    with_arg = cli("chat", tiny.quants["Q8_0"], "translate:", "-n", "4", *GREEDY, input="the dog\n")
    assert with_arg.exit_code == 0, with_arg.stderr
    assert with_arg.stdout.strip() and "reply 4 tok" in with_arg.stderr
    without = cli("chat", tiny.quants["Q8_0"], "-n", "4", *GREEDY, input="the dog\n")
    assert without.exit_code == 0 and without.stdout.strip() and ">>>" not in without.stdout


def test_a_model_without_template_warns_with_the_override(tiny):
    result = cli("run", tiny.no_template, "hi", "-n", "2", *GREEDY)
    assert result.exit_code == 0
    assert "no chat template; using the built-in 'chatml' format" in result.stderr
    assert "--chat-format" in result.stderr and "--template FILE" in result.stderr
    chosen = cli("run", tiny.no_template, "hi", "-n", "2", "--chat-format", "plain", *GREEDY)
    assert chosen.exit_code == 0 and "no chat template" not in chosen.stderr
    raw = cli("run", tiny.no_template, "hi", "-n", "2", "--raw", *GREEDY)
    assert raw.exit_code == 0 and "no chat template" not in raw.stderr


def test_piped_output_has_no_ansi_and_greedy_output_is_deterministic(tiny):
    argv = [sys.executable, "-m", "localrun", "run", str(tiny.quants["Q4_K_M"]), "the capital of", "-n", "12", *GREEDY]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}  # colour allowed: only the pipe prevents it
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "\x1b" not in first.stdout and "\x1b" not in first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


def test_tty_shows_the_answer_and_a_stats_line(tiny):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localrun", "run", str(tiny.quants["Q8_0"]), "hello", "-n", "40", *GREEDY],
        env=dict(os.environ, TERM="xterm"),
        encoding="utf-8",
        timeout=60,
        dimensions=(24, 100),
    )
    child.expect(r"reply 40 tok, [\d.]+\s+tok/s")  # a long line wraps at words on a terminal
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_verbose_shows_llama_cpp_logs(tiny):
    quiet = cli("run", tiny.quants["Q8_0"], "hi", "-n", "1", *GREEDY)
    loud = cli("run", tiny.quants["Q8_0"], "hi", "-n", "1", "--verbose", *GREEDY)
    assert "llama_model_loader" not in quiet.stderr
    assert "llama_model_loader" in loud.stderr or "print_info" in loud.stderr


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["run", "/nonexistent/model.gguf", "hi"], 3, "no such model file"),
        (["run", "{tiny}", "hi", "--stream"], 2, "--stream goes with --json"),
        (["run", "{tiny}"], 2, "nothing to answer"),
        (["run", "{tiny}", "hi", "--chat-format", "nope"], 2, "unknown chat format"),
        (["run", "{tiny}", "hi", "--template", "/nonexistent.jinja"], 2, "cannot read the template file"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(tiny, args, code, message):
    result = cli(*[a.replace("{tiny}", str(tiny.quants["Q8_0"])) for a in args])
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_gemma_completes_a_fact(gemma: Path):
    result = cli("run", gemma, "--raw", "-n", "3", "--temp", "0", "The capital of France is the city of")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(" Paris")


def test_a_repo_reference_is_pulled_first_then_found_offline(tiny, hub, monkeypatch):
    hub.add_repo("acme/tiny-GGUF", {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]})
    first = cli("run", "acme/tiny-GGUF:Q8_0", "hi", "-n", "3", *GREEDY)
    assert first.exit_code == 0, first.stderr
    assert first.stdout.strip() and "reply 3 tok" in first.stderr
    assert hub.downloads() and "tiny-Q8_0.gguf" in " ".join(map(str, hub.downloads()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = cli("run", "acme/tiny-GGUF:Q8_0", "hi", "-n", "3", *GREEDY)
    assert again.exit_code == 0, again.stderr
    assert again.stdout == first.stdout  # greedy, same file, no network


@pytest.mark.parametrize("k, v", [("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "f16"), ("f16", "f16")])
def test_kv_cache_types_load_and_the_estimate_is_the_buffer_llama_cpp_makes(tiny, k, v):
    import re

    model = tiny.quants["Q8_0"]
    kv = ["--ctx", "1024", "--cache-type-k", k, "--cache-type-v", v]
    result = cli("run", model, "hello", "-n", "4", *GREEDY, *kv, "--verbose")
    assert result.exit_code == 0, result.stderr
    assert f"K ({k})" in result.stderr and f"V ({v})" in result.stderr
    logged = float(re.search(r"CPU KV buffer size = +([\d.]+) MiB", result.stderr).group(1)) * 2**20
    plan = json.loads(cli("show", model, *kv, "--json").stdout)["plan"]
    shown = plan["estimate"]["kv_ram"]
    assert abs(shown - logged) <= 0.005 * 2**20 + 0.01 * logged  # the log rounds to 0.01 MiB
    said = k if k == v else f"{k}/{v}"  # the figures say which cache they assume
    assert plan["kv_cache"] == said and f" {said}, compute" in cli("show", model, *kv).stdout


def test_kv_cache_options_that_cannot_work_are_refused(tiny):
    model = tiny.quants["Q8_0"]
    for args, message in (
        (["--cache-type-v", "q8_0", "--flash-attn", "off"], "a q8_0 V cache needs flash attention"),
        (["--cache-type-k", "q2_k"], "--cache-type-k q2_k: not a KV cache type"),
        (["--flash-attn", "maybe"], "--flash-attn maybe: use auto, on or off"),
    ):
        for command in (["run", model, "hi"], ["show", model], ["pull", model]):
            result = cli(*command, *args)
            assert result.exit_code == 2 and message in result.stderr, (command, args, result.stderr)
