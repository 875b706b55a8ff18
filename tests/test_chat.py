"""The REPL, driven for real: prompt-toolkit pipe input in-process, and a pty (pexpect) for Ctrl-C and history."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

from localrun.commands.generate import PromptOptions
from localrun.inference.conversation import LocalConversation
from localrun.inference.generation.settings import SamplingOptions, Settings
from support.chat import typed_into_repl


def repl(
    model: Path,
    keys: str,
    *,
    n_ctx: int = 512,
    max_tokens: int = 8,
    system: str | None = None,
    chat_format: str | None = None,
    ignore_eos: bool = False,
) -> LocalConversation:
    """Type `keys` into the real REPL (prompt-toolkit over a pipe) until they run out."""
    settings = Settings(SamplingOptions(temperature=0, ban_eog=ignore_eos), max_tokens)
    return typed_into_repl(model, keys, settings, PromptOptions(system=system, chat_format=chat_format), n_ctx)


@pytest.mark.slow
def test_two_turns_keep_context_and_reuse_the_cache(gemma: Path, capsys):
    conv = repl(gemma, "My name is Alice.\rWhat is my name?\r")
    err = capsys.readouterr().err
    assert "no chat template; using the built-in 'gemma' format" in err
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    sent = conv.sent
    # the second prompt carries the whole first exchange, in the gemma turn format
    assert sent.startswith("<bos><start_of_turn>user\nMy name is Alice.<end_of_turn>\n<start_of_turn>model\n")
    assert sent.endswith("<start_of_turn>user\nWhat is my name?<end_of_turn>\n<start_of_turn>model\n")
    assert conv.messages[1]["content"].strip() in sent
    # only the new suffix was decoded: the first turn came from the KV cache
    assert conv.last_stats.cached_tokens > 10
    assert err.count("prompt ") >= 2 and "tok/s" in err  # a stats line after each reply


def test_every_slash_command(tiny, tmp_path: Path, capsys):
    saved = tmp_path / "conv.json"
    keys = (
        "\r".join(
            [
                "/help",
                "/set temperature 0",
                "/set max_tokens 5",
                "/set top_k nope",
                "/set",
                "/system Be brief.",
                "/system",
                "/model",
                "hello there",
                "/stats",
                f"/save {saved}",
                "/clear",
                "/stats",
                f"/load {saved}",
                "/bogus",
                "/system -",
                "/exit",
                "never sent",
            ]
        )
        + "\r"
    )
    conv = repl(tiny.quants["Q8_0"], keys, max_tokens=20)
    out, err = capsys.readouterr()
    assert "/save FILE" in err and "Esc then Enter" in err  # /help, with the multiline key
    assert "temperature = 0.0" in err and "max_tokens = 5" in err
    assert "bad value for top_k: 'nope'" in err
    assert "repeat_penalty = 1.1" in err  # /set without arguments lists the settings
    assert "system prompt: Be brief." in err
    assert "tiny-llama" in err and "context 512 tokens" in err and "chat template: model" in err
    assert f"\n{tiny.quants['Q8_0']}  (tiny-llama)\n" in err  # /model: a path given is said once
    table = [line for line in err[err.index("Type a message") : err.index("/model ")].splitlines() if line[:2] == "  "]
    assert len(table) > 8 and max(map(len, table)) < 80  # /help's table fits 80 columns (a terminal wraps prose)
    assert "reply 5 tok" in err  # the max_tokens set above was used
    assert re.search(r"context: \d+ of 512 tokens used by 1 message\n", err)  # /stats after /clear: the system prompt
    assert "loaded 3 messages" in err
    assert "unknown command /bogus" in err
    assert "system prompt removed" in err
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    assert data["messages"][0]["content"] == "Be brief."
    assert [m["role"] for m in conv.messages] == ["user", "assistant"]  # /load, then /system -
    assert out.strip()  # the reply text went to stdout
    assert "never sent" not in json.dumps(conv.messages)  # /exit left the loop


def test_multiline_input_by_quotes_and_by_escape_enter(tiny):
    conv = repl(tiny.quants["Q8_0"], '"""\rline one\rline two"""\rfirst\x1b\rsecond\r', max_tokens=2)
    asked = [m["content"] for m in conv.messages if m["role"] == "user"]
    assert asked == ["line one\nline two", "first\nsecond"]


def test_ctrl_c_on_an_empty_prompt_says_how_to_quit_and_a_second_exits(tiny, capsys):
    conv = repl(tiny.quants["Q8_0"], "\x03\x03hello\r")
    assert conv.messages == []  # the second Ctrl-C left before "hello"
    assert "press Ctrl-D or type /exit to quit" in capsys.readouterr().err
    conv = repl(tiny.quants["Q8_0"], "\x03hello\r")
    assert [m["content"] for m in conv.messages if m["role"] == "user"] == ["hello"]  # one Ctrl-C does not quit


def test_context_overflow_drops_the_oldest_turns_but_keeps_the_system_prompt(tiny, capsys):
    long = " ".join(["the old man said the sea was very big"] * 8)
    keys = "".join(f"{i} {long}\r" for i in range(6))
    conv = repl(tiny.quants["Q8_0"], keys, n_ctx=256, max_tokens=16, system="Be brief.")
    err = capsys.readouterr().err
    assert "was nearly full: dropped the 2 oldest messages (the system prompt stays)" in err
    assert conv.messages[0] == {"role": "system", "content": "Be brief."}
    assert conv.messages[-2]["content"].startswith("5 ")
    assert not any(m["content"].startswith("0 ") for m in conv.messages)
    assert len(conv.last_prompt) + 16 <= 256


# -- a real terminal -----------------------------------------------------------------------------
PROMPT = ">>>"


def spawn(*args: str) -> pexpect.spawn:
    env = dict(os.environ, TERM="xterm", COLUMNS="100", LINES="30", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(
        sys.executable, ["-m", "localrun", "chat", *args], env=env, encoding="utf-8", timeout=60, dimensions=(30, 100)
    )
    child.expect_exact(PROMPT)
    return child


def test_ctrl_c_mid_reply_returns_to_the_prompt_and_the_next_turn_works(tiny):
    child = spawn(str(tiny.quants["Q8_0"]), "--ignore-eos", "--ctx", "2048", "--temp", "0")
    child.sendline("tell me a long story")
    child.expect("tok/s")  # the live status line: the reply is streaming
    child.sendintr()
    child.expect_exact("reply cancelled")
    child.expect_exact(PROMPT)
    child.sendline("/set max_tokens 4")
    child.expect_exact("max_tokens = 4")
    child.expect_exact(PROMPT)
    child.sendline("hello")
    child.expect(r"reply 4 tok, [\d.]+ tok/s")
    child.expect_exact(PROMPT)
    child.sendline("/stats")
    child.expect(r"used by 2 messages")  # the cancelled turn was dropped, the last one kept
    child.expect_exact(PROMPT)  # (a Ctrl-D typed before the prompt is up would be lost by the tty)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_history_persists_across_runs(tiny):
    model = str(tiny.quants["Q8_0"])
    child = spawn(model, "-n", "2")
    child.sendline("remember this line")
    child.expect(r"reply \d+ tok")  # the reply is over: the prompt that follows is the next one
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    history = Path(os.environ["LOCALRUN_HOME"]) / "chat_history"
    assert "+remember this line" in history.read_text()
    child = spawn(model, "-n", "2")
    child.send("\x1b[A")  # Up: the previous session's line comes back
    child.expect_exact("remember this line")
    child.sendcontrol("c")  # clears the line
    child.sendcontrol("c")  # on an empty line: says how to quit
    child.expect_exact("press Ctrl-D or type /exit to quit")
    child.expect_exact(PROMPT)
    child.sendcontrol("c")  # and a second one quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
