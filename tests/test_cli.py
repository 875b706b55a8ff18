"""The command line as a new user meets it: help, pipes, bad bytes, options that cannot work here,
and what the terminal shows."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from localrun.cli import app
from localrun.commands.stream import LiveRenderer, WordWrap, stats_line
from localrun.errors import UsageError
from localrun.inference.generation.events import PrefillProgress, Stats
from localrun.inference.generation.settings import Settings
from localrun.output import Output

runner = CliRunner()
GREEDY = ["--temp", "0", "--ignore-eos"]


def test_help_is_minus_h_and_bare_localrun_is_the_help_with_success():
    short = runner.invoke(app, ["-h"])
    assert short.exit_code == 0 and "Commands:" in short.stdout
    bare = runner.invoke(app, [])
    assert bare.exit_code == 0 and bare.stdout == short.stdout
    for line in short.stdout.splitlines():
        if line.startswith("  ") and line.split()[0] in ("pull", "run", "chat", "bench"):
            assert not line.rstrip().endswith("..."), line  # summaries are whole, not cut
    run_help = runner.invoke(app, ["run", "-h"]).stdout
    assert "<int range>" not in run_help and "<float range>" not in run_help and "{model}" not in run_help
    assert "--ctx N" in run_help and "--stop TEXT" in run_help and "--top-p P" in run_help


def test_run_without_a_prompt_points_to_chat(tiny):
    result = runner.invoke(app, ["run", str(tiny.quants["Q8_0"])])
    assert result.exit_code == 2 and "nothing to answer" in result.stderr
    assert f"localrun chat {tiny.quants['Q8_0']}" in result.stderr


def test_set_takes_what_the_options_take_and_shows_plain_values():
    settings = Settings()
    for name, value, words in (
        ("top_p", "5", "top_p must be between 0 and 1"),
        ("top_k", "-3", "top_k must be at least 0"),
        ("temperature", "-1", "temperature must be at least 0"),
        ("max_tokens", "0", "max_tokens must be at least 1, or none"),
        ("top_k", "nope", "bad value for top_k: 'nope'"),
    ):
        with pytest.raises(UsageError, match=words):
            settings.set(name, value)
    assert settings.set("top_p", "0.5") == "top_p = 0.5"
    assert settings.set("seed", "random") == "seed = random"
    assert settings.set("max_tokens", "none") == "max_tokens = none"
    assert settings.set("stop", "END") == 'stop = "END"'
    shown = settings.describe()
    assert "None" not in shown.values() and not any(v.startswith("[") for v in shown.values())
    assert runner.invoke(app, ["run", "x.gguf", "hi", "--top-p", "5"]).exit_code == 2  # the option refuses it too


def test_binary_stdin_and_bad_bytes_in_the_prompt_are_replaced_and_said(tiny):
    exe = [sys.executable, "-m", "localrun", "run", str(tiny.quants["Q8_0"]), "--raw", "-n", "3", *GREEDY]
    piped = subprocess.run([*exe, "summarize"], input=b"\xff\xfe\x00 binary \xc3\x28 data", capture_output=True)
    assert piped.returncode == 0, piped.stderr
    err = piped.stderr.decode()
    assert "stdin is not valid UTF-8" in err and "Traceback" not in err and piped.stdout.strip()
    arg = subprocess.run(
        [*exe, b"caf\xe9".decode("utf-8", "surrogateescape")], capture_output=True, stdin=subprocess.DEVNULL
    )
    assert arg.returncode == 0, arg.stderr
    assert "the prompt is not valid UTF-8" in arg.stderr.decode()


def test_more_threads_than_cores_and_gpu_layers_on_a_cpu_build_are_said(tiny):
    cores = os.cpu_count() or 1
    result = runner.invoke(
        app,
        ["run", str(tiny.quants["Q8_0"]), "hi", "-n", "2", "--threads", str(cores + 30), "--gpu-layers", "5", *GREEDY],
    )
    assert result.exit_code == 0, result.stderr
    assert f"--threads {cores + 30} is more than the {cores} cores here" in result.stderr
    assert "--gpu-layers is ignored: this llama.cpp build runs on the CPU only" in result.stderr


def test_a_base_model_in_chat_suggests_raw_completion(tiny):
    result = runner.invoke(app, ["chat", str(tiny.no_template), "-n", "2", *GREEDY], input="hello\n")
    assert result.exit_code == 0, result.stderr
    assert "no chat template" in result.stderr


# -- the live renderer ---------------------------------------------------------------------------
class Screen(io.StringIO):
    def isatty(self) -> bool:
        return True


def render(text_pieces: list[str], *, stdout_tty: bool, stderr_tty: bool, monkeypatch, columns: int = 40):
    monkeypatch.setenv("COLUMNS", str(columns))
    out_stream, err_stream = Screen(), Screen()
    monkeypatch.setattr(sys, "stdout", out_stream)
    monkeypatch.setattr(sys, "stderr", err_stream)
    renderer = LiveRenderer(Output(stdout_tty=stdout_tty, stderr_tty=stderr_tty))
    for piece in text_pieces:
        renderer.piece(piece)
    renderer.finish(Stats(5, 100.0, len(text_pieces), 50.0, 0.1, 0.5, "eog"))
    return out_stream.getvalue(), err_stream.getvalue()


def test_replies_wrap_at_word_boundaries_on_a_terminal(monkeypatch):
    text = (
        "The river valley was settled by farmers who built canals and traded grain with the towns "
        "upstream, a story told again and again by people who lived there."
    )
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    for columns in (40, 80, 110):
        shown, _ = render(pieces, stdout_tty=True, stderr_tty=False, monkeypatch=monkeypatch, columns=columns)
        lines = shown.rstrip("\n").split("\n")
        assert all(len(line) <= columns for line in lines)
        assert " ".join(line.strip() for line in lines) == text  # no word split, none lost
        assert columns >= len(text) or len(lines) > 1
    piped, _ = render(pieces, stdout_tty=False, stderr_tty=False, monkeypatch=monkeypatch)
    assert piped == text + "\n"  # piped output is exactly the text


def test_the_seconds_count_on_while_the_caller_waits_in_a_long_prompt_read(monkeypatch):
    """One progress event, then the caller blocked (as in llama_decode, for a large model's batch):
    the status line goes on counting; the first piece stops it, and nothing is drawn after."""
    monkeypatch.setenv("COLUMNS", "80")
    err = Screen()
    monkeypatch.setattr(sys, "stdout", Screen())
    monkeypatch.setattr(sys, "stderr", err)
    renderer = LiveRenderer(Output(stdout_tty=True, stderr_tty=True), show_stats=False)
    renderer.progress(PrefillProgress(3614, 0, 0.2))
    time.sleep(1.5)  # a C call that releases the GIL, as llama_decode does
    renderer.piece("The")
    drawn = len(err.getvalue())
    time.sleep(0.5)
    renderer.finish(Stats(3614, 700.0, 1, 50.0, 1.7, 1.7, "length"))
    seconds = set(re.findall(r"reading the prompt: 3614 tokens · ([0-9.]+) s", err.getvalue()))
    assert len(seconds) >= 3 and max(map(float, seconds)) >= 1.0  # counted on from 0.2 s
    assert "reading the prompt" not in err.getvalue()[drawn:]  # the ticker stopped at the first piece


def test_word_wrap_breaks_what_cannot_fit():
    wrap = WordWrap(10)
    out = wrap.feed("abcdefghijklmnopqrstuvwxyz 漢字漢字漢字漢字") + wrap.flush()
    assert all(len(line) <= 10 for line in out.split("\n"))


def test_with_stdout_piped_the_status_line_stops_when_text_flows(monkeypatch):
    _, err = render(["one", " two", " three", " four"], stdout_tty=False, stderr_tty=True, monkeypatch=monkeypatch)
    after_first = err.split("\r\x1b[K", 2)[-1]  # the status drawn for the prompt, then erased at the first piece
    assert "tok/s" not in after_first.split("prompt 5 tok")[0]  # no live line redrawn among the text
    assert "prompt 5 tok" in err


def test_stats_after_a_cancel_show_only_what_finished():
    cancelled = Stats(900, None, 0, 0.0, None, 1.2, "cancelled")
    line = stats_line(cancelled)
    assert "not read to the end" in line and "TTFT" not in line and "tok/s" not in line and "cancelled" in line
    full = Stats(10, 50.0, 20, 10.0, 0.1, 2.0, "length", context_full=True)
    assert stats_line(full).endswith("the context is full")
    assert stats_line(Stats(10, 50.0, 20, 10.0, 0.1, 2.0, "length")).endswith("stopped at the token limit")


def test_a_stats_line_broken_for_a_terminal_fits_it_and_breaks_only_between_parts():
    seen = Stats(25, 1308.2, 2023, 2512.3, 0.02, 0.82, "length", context_full=True, drafted=100, accepted=16)
    parts = stats_line(seen).split(" · ")
    widest = max(map(len, parts)) + 4  # a part never splits: "  " before it, " ·" after
    for width in range(widest, 121):  # 80 columns once left a lone "·" on a line of its own
        lines = stats_line(seen, width=width).split("\n")
        assert all(len(line) <= width for line in lines), (width, lines)
        assert [p.strip() for line in lines for p in line.split(" ·") if p.strip()] == parts


# -- a real terminal -----------------------------------------------------------------------------
def spawn(*args: str, cpr: bool = False, columns: int = 100) -> pexpect.spawn:
    env = dict(os.environ, TERM="xterm", COLUMNS=str(columns), LINES="30")
    if not cpr:
        env["PROMPT_TOOLKIT_NO_CPR"] = "1"
    else:
        env.pop("PROMPT_TOOLKIT_NO_CPR", None)
    return pexpect.spawn(
        sys.executable, ["-m", "localrun", *args], env=env, encoding="utf-8", timeout=60, dimensions=(30, columns)
    )


def test_chat_with_a_prompt_on_a_terminal_starts_the_chat_with_it(tiny):
    child = spawn("chat", str(tiny.quants["Q8_0"]), "hello there", "-n", "3", *GREEDY)
    child.expect(r"reply 3 tok")  # the argument was the first message
    child.expect_exact(">>>")
    child.sendline("/stats")
    child.expect("used by 2 messages")
    child.expect_exact(">>>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_right_after_enter_cancels_the_reply_and_the_chat_goes_on(tiny):
    """pexpect's terminal never answers cursor-position requests, as some terminals don't: a
    Ctrl-C typed at once after Enter must still cancel the reply, not wait to end the chat."""
    child = spawn("chat", str(tiny.quants["Q8_0"]), "--ctx", "2048", *GREEDY, cpr=True)
    child.expect_exact(">>>")
    child.sendline("tell me a long story")
    child.sendintr()
    child.expect_exact("reply cancelled")
    child.expect_exact(">>>")
    child.sendline("/set max_tokens 2")
    child.expect_exact("max_tokens = 2")
    child.expect_exact(">>>")
    child.sendline("hi")
    child.expect(r"reply 2 tok")
    child.expect_exact(">>>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_save_to_a_missing_folder_keeps_the_chat(tiny, tmp_path):
    child = spawn("chat", str(tiny.quants["Q8_0"]), "-n", "2", *GREEDY)
    child.expect_exact(">>>")
    child.sendline("hi")
    child.expect(r"reply \d+ tok")
    child.expect_exact(">>>")
    child.sendline(f"/save {tmp_path}/no/such/folder/chat.json")
    child.expect_exact("cannot save to")
    child.expect_exact(">>>")
    child.sendline(f"/save {tmp_path}/chat.json")
    child.expect_exact("saved 2 messages")
    child.expect_exact(">>>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and len(json.loads(Path(tmp_path / "chat.json").read_text())["messages"]) == 2
    assert not (tmp_path / "no").exists()


def test_ctrl_c_while_the_model_loads_exits_130(tiny, gemma):
    child = spawn("run", str(gemma), "hi", "-n", "2")
    child.expect("loading")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130 or (child.signalstatus is None and child.exitstatus == 130)
    assert "Exception ignored" not in child.before


def test_a_tag_and_another_quant_option_are_refused_and_a_context_past_training_is_said(hub, tiny):
    hub.add_repo("acme/tiny-GGUF", {f"tiny-{q}.gguf": tiny.quants[q] for q in ("Q8_0", "Q2_K")})
    both = runner.invoke(app, ["pull", "acme/tiny-GGUF:Q2_K", "--quant", "Q8_0", "--dry-run"])
    assert both.exit_code == 2 and "names Q2_K and --quant names Q8_0" in both.stderr
    same = runner.invoke(app, ["pull", "acme/tiny-GGUF:Q2_K", "--quant", "q2_k", "--dry-run"])
    assert same.exit_code == 0, same.stderr
    beyond = runner.invoke(app, ["pull", "acme/tiny-GGUF", "--ctx", "8192", "--dry-run"])  # trained with 2048
    assert beyond.exit_code == 0 and "beyond the 2048 tokens this model was trained with" in beyond.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(tiny):
    """`| head -1`: the pipe closes under the writer; it stops as cat does, with nothing on stderr."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localrun",
            "run",
            str(tiny.quants["Q8_0"]),
            "tell me",
            "-n",
            "200",
            *GREEDY,
            "--json",
            "--stream",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child.stdout.readline()
    child.stdout.close()  # the reader leaves after one line
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141, stderr
    assert "unexpected" not in stderr and "Exception ignored" not in stderr and "Traceback" not in stderr


def test_list_on_a_narrow_terminal_keeps_names_whole(hub, tiny, monkeypatch):
    from huggingface_hub import hf_hub_download

    from localrun.commands.listing import show_listing
    from localrun.hub import settings
    from localrun.store.scan import scan

    repo = "acme-with-a-long-organisation/an-even-longer-model-repo-GGUF"  # the name fits, the row does not
    hub.add_repo(repo, {"tiny-llama-Q4_K_M.gguf": tiny.quants["Q4_K_M"]})
    hf_hub_download(repo, "tiny-llama-Q4_K_M.gguf", endpoint=settings.endpoint(), cache_dir=settings.cache_dir())
    for columns in (80, 200):
        screen = Screen()
        monkeypatch.setattr(sys, "stdout", screen)
        monkeypatch.setenv("COLUMNS", str(columns))
        show_listing(Output(stdout_tty=True), scan())
        lines = screen.getvalue().splitlines()
        assert all(len(line) <= columns for line in lines)
        assert any(line.strip() == f"{repo}:Q4_K_M" or line.startswith(f"{repo}:Q4_K_M  ") for line in lines)
