"""What a new user of the chat trips over: a saved conversation lost, settings not restored, text
wrapped for a window that has since been resized, multiline input and the history, hints."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

import pexpect
from wcwidth import wcwidth

from localrun.commands.stream import LiveRenderer, stats_line
from localrun.inference.generation.events import Speculation, Stats
from localrun.output import Output
from test_chat import PROMPT, repl, spawn

ANSI = re.compile(r"\x1b(\[[0-9;?]*[a-zA-Z]|[78DEM])")


def chat_at(columns: int, *args: str) -> pexpect.spawn:
    """`localrun chat` in a terminal `columns` wide that follows its real size ($COLUMNS unset)."""
    env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localrun", "chat", *args],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(30, columns),
    )
    child.expect_exact(PROMPT)
    return child


def leave(child: pexpect.spawn, *, clear: bool = False) -> None:
    if clear:
        child.sendcontrol("c")  # clears the line (Ctrl-D only leaves from an empty one)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def ask(child: pexpect.spawn, line: str, answer: str) -> str:
    """Send a line; what the chat wrote up to `answer` and the next prompt, without escapes."""
    child.sendline(line)
    child.expect_exact(answer)
    said = child.before + child.after
    child.expect_exact(PROMPT)
    return ANSI.sub("", said + child.before)


# -- /save and /load -------------------------------------------------------------------------------
def test_save_never_replaces_a_conversation_unasked_nor_with_an_empty_one(tiny, tmp_path: Path):
    model, folder = str(tiny.quants["Q8_0"]), tmp_path / "chats"
    folder.mkdir()
    saved = folder / "conv.json"
    child = chat_at(250, model, "-n", "2")  # wide: the question about the file fits one line
    ask(child, "hello", "reply 2 tok")
    ask(child, f"/save {saved}", "saved 2 messages")
    leave(child)
    first = saved.read_bytes()

    child = chat_at(250, model, "-n", "2")  # a new chat, nothing said yet
    ask(child, f"/save {saved}", "nothing to save: no message has been sent yet")
    assert saved.read_bytes() == first
    ask(child, "another question", "reply 2 tok")
    child.sendline(f"/save {saved}")
    child.expect_exact(f"{saved} exists (2 messages): replace it with these 2 messages? [y/N]")
    child.send("n")
    child.expect_exact("not saved; /save! ")
    child.expect_exact(PROMPT)
    assert saved.read_bytes() == first
    child.sendline(f"/save {saved}")
    child.expect_exact("[y/N]")
    child.send("y")
    child.expect_exact("saved 2 messages")
    child.expect_exact(PROMPT)
    assert "another question" in saved.read_text()
    ask(child, "and a third", "reply 2 tok")
    ask(child, f"/save! {saved}", "saved 4 messages")  # replaces without asking
    leave(child)
    assert len(json.loads(saved.read_text())["messages"]) == 4
    assert [p.name for p in folder.iterdir()] == ["conv.json"]  # the atomic write left nothing behind


def test_load_restores_the_saved_settings_with_their_types_and_says_so(tiny, tmp_path: Path, capsys):
    saved = tmp_path / "conv.json"
    keys = ["/set temperature 0.2", "/set stop END", "/set seed 7", '/set json_schema {"enum": ["a", "b"]}', "hi"]
    repl(tiny.quants["Q8_0"], "\r".join([*keys, f"/save {saved}"]) + "\r", max_tokens=5)
    settings = json.loads(saved.read_text())["settings"]
    assert settings["temperature"] == 0.2 and settings["seed"] == 7 and settings["max_tokens"] == 5
    assert settings["stop"] == ["END"] and settings["grammar"]["from_schema"] is True
    capsys.readouterr()

    conv = repl(tiny.quants["Q8_0"], f"/load {saved}\r/set\r", max_tokens=9)
    err = capsys.readouterr().err
    assert conv.settings.sampling.temperature == 0.2 and conv.settings.sampling.seed == 7
    assert conv.settings.max_tokens == 5 and conv.settings.stop == ["END"] and conv.settings.grammar
    assert "loaded 2 messages" in err and "settings restored: temperature 0.2 (was 0)" in err
    assert "max_tokens 5 (was 9)" in err and "json_schema = the JSON schema" in err

    settings["temperature"] = -1  # a file edited by hand: refused as /set refuses it, nothing taken
    saved.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}], "settings": settings}))
    conv = repl(tiny.quants["Q8_0"], f"/load {saved}\r")
    assert "a saved setting is refused: temperature must be at least 0" in capsys.readouterr().err
    assert conv.messages == [] and conv.settings.sampling.temperature == 0


# -- the terminal's width --------------------------------------------------------------------------
def test_a_reply_follows_the_terminal_when_it_is_resized_mid_reply(monkeypatch, capsys):
    words = [f"word{i:02d}" for i in range(40)]
    monkeypatch.setenv("COLUMNS", "60")
    renderer = LiveRenderer(Output(stdout_tty=True), show_stats=False)
    for word in words[:20]:
        renderer.piece(word + " ")
    monkeypatch.setenv("COLUMNS", "25")  # what the terminal says after SIGWINCH
    for word in words[20:]:
        renderer.piece(word + " ")
    renderer.finish(Stats(5, 100.0, 40, 50.0, 0.1, 0.5, "eog"))
    text = capsys.readouterr().out
    before, after = text[: text.index("word19") + 6], text[text.index("word19") + 6 :]
    assert max(len(line) for line in before.split("\n")) <= 60
    assert after.split("\n")[1:] and max(len(line.rstrip()) for line in after.split("\n")) <= 25
    assert text.split() == words  # no word broken


def test_a_window_narrowed_mid_reply_wraps_the_rest_of_the_reply_at_its_new_width(tiny):
    child = chat_at(100, str(tiny.quants["Q8_0"]), "--ignore-eos", "--ctx", "2048", "--temp", "0")
    child.sendline("tell me a long story")
    child.expect(r"… \d+ tok")  # the reply is streaming
    child.setwinsize(30, 40)  # the window narrows: SIGWINCH
    after, end = "", time.monotonic() + 30
    while after.count("\r\n") < 8 and time.monotonic() < end:  # a few lines at the new width
        with contextlib.suppress(pexpect.TIMEOUT):
            after += child.read_nonblocking(100_000, timeout=0.2)
    child.sendintr()
    child.expect_exact("reply cancelled")
    child.expect_exact(PROMPT)
    leave(child)
    status = re.compile(r"\x1bD\x1bM\x1b7\x1bE.*?\x1b8", re.S)  # the live line, drawn below the text
    lines = status.sub("", after).replace("\x1b[J", "").split("\r\n")
    # the first lines may have been written before the resize was seen; the last one is cut short
    written = [sum(max(0, wcwidth(ch)) for ch in line) for line in lines[3:-1]]
    assert len(written) >= 3 and max(written) <= 40


def test_stats_in_a_chat_at_80_columns_break_only_between_figures(tiny):
    child = chat_at(80, str(tiny.quants["Q8_0"]), "-n", "3")
    ask(child, "hello", "reply 3 tok")
    lines = ask(child, "/stats", "total").replace("\r", "").split("\n")
    stats = [line for line in lines[lines.index(next(x for x in lines if x.startswith("prompt "))) :] if line]
    assert len(stats) > 1 and all(line.startswith("  ") for line in stats[1:])  # each part whole
    leave(child)


def test_model_in_a_chat_at_80_columns_shows_a_long_path_whole(tiny, tmp_path: Path):
    folder = tmp_path / ("a-folder-with-a-long-name-" * 3)
    folder.mkdir()
    model = folder / "tiny.gguf"
    model.symlink_to(tiny.quants["Q8_0"])
    child = chat_at(80, str(model), "-n", "3")
    assert f"{model} (tiny-llama) ready" in child.before
    child.sendline("/model")
    child.expect_exact(f"{model}  (tiny-llama")  # one piece, for the terminal to wrap and a mouse to copy
    child.expect_exact(PROMPT)
    leave(child)


def test_the_live_line_shows_a_speed_and_an_acceptance_only_once_they_mean_something(capsys):
    renderer = LiveRenderer(Output(stdout_tty=True, stderr_tty=True), show_stats=False)
    renderer.piece("one")
    renderer.speculation(Speculation(drafted=1, accepted=1))
    assert "tok/s" not in renderer._status_text(renderer.first + 1.0)
    assert "spec 1/1" in renderer._status_text(renderer.first + 1.0)
    for word in (" two", " three", " four"):
        renderer.piece(word)
    renderer.speculation(Speculation(drafted=20, accepted=15))
    assert re.search(r"4 tok · 3\.0 tok/s · spec 75%", renderer._status_text(renderer.first + 1.0))
    assert "1 tok · " in capsys.readouterr().err
    assert "spec 1/1 accepted" in stats_line(Stats(5, 100.0, 2, 50.0, 0.1, 0.5, "eog", drafted=1, accepted=1))
    assert "spec 75% accepted" in stats_line(Stats(5, 100.0, 2, 50.0, 0.1, 0.5, "eog", drafted=20, accepted=15))


# -- input and the history -------------------------------------------------------------------------
def test_a_quoted_block_is_one_history_entry_that_up_recalls_whole(tiny, tmp_path: Path):
    child = spawn(str(tiny.quants["Q8_0"]), "-n", "2")
    child.send('"""\rline one\rline two"""\r')
    child.expect(r"reply \d+ tok")
    child.expect_exact(PROMPT)
    child.send("\x1b[A")  # Up: the whole block comes back
    child.expect_exact('line two"""')
    child.send("\r")
    child.expect(r"reply \d+ tok")
    child.expect_exact(PROMPT)
    ask(child, f"/save {tmp_path / 'block.json'}", "saved 4 messages")
    leave(child)
    messages = json.loads((tmp_path / "block.json").read_text())["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["line one\nline two"] * 2
    history = (Path(os.environ["LOCALRUN_HOME"]) / "chat_history").read_text()
    assert '\n+"""\n+line one\n+line two"""\n' in history


def test_continuation_lines_have_a_prompt(tiny):
    child = spawn(str(tiny.quants["Q8_0"]), "-n", "2")
    child.send("first\x1b\r")  # Alt-Enter: a second line
    child.expect(r"first[^\n]*\n[^\n]*\.\.\.")  # the next line starts with "..."
    child.send("second\r")
    child.expect(r"reply \d+ tok")
    child.expect_exact(PROMPT)
    leave(child)


def test_a_question_given_on_the_command_line_is_shown_and_up_recalls_it(tiny):
    question = "a question from the command line"
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localrun", "chat", str(tiny.quants["Q8_0"]), "--ignore-eos", "--ctx", "2048", question],
        env=dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1"),
        encoding="utf-8",
        timeout=60,
        dimensions=(30, 100),
    )
    child.expect_exact(f"{PROMPT} {question}", timeout=20)
    child.expect("tok")  # the reply is streaming
    child.sendintr()
    child.expect_exact("reply cancelled")
    child.expect_exact(PROMPT)
    child.send("\x1b[A")  # Up
    child.expect_exact(question)
    leave(child, clear=True)


def test_set_without_a_value_hints_that_setting_and_the_list_shows_the_schema(tiny, capsys):
    keys = ["/set stop", "/set top_p", '/set json_schema {"enum": ["a"]}', "/set"]
    repl(tiny.quants["Q8_0"], "\r".join(keys) + "\r")
    err = capsys.readouterr().err
    assert "hint: /set stop TEXT: one stop string (\\n for a newline), or none" in err
    assert "hint: /set top_p VALUE: a number between 0 and 1" in err
    assert "temperature 0.2" not in err
    assert "json_schema = the JSON schema" in err and "grammar = made from the json_schema" in err


def test_save_bang_is_a_command_not_a_question(tiny, capsys):
    conv = repl(tiny.quants["Q8_0"], "/save!\r")
    assert "/save! needs a file name" in capsys.readouterr().err and conv.messages == []


def test_load_takes_a_conversation_saved_by_the_previous_version():
    """Earlier versions saved the settings as /set shows them: the stops as quoted text, the
    grammar only by where it came from. The messages load; what can be read is restored."""
    from localrun.inference.conversation import restored_settings
    from localrun.inference.generation.settings import Settings

    old = {"temperature": "0.2", "seed": "random", "stop": '"END", "x"', "grammar": "schema.json"}
    settings = restored_settings(Settings(), old)
    assert settings.stop == ["END", "x"] and settings.sampling.temperature == 0.2
    assert settings.grammar is None and settings.sampling.seed is None


def test_set_refuses_at_once_what_the_loaded_model_does_not_allow(tiny, capsys):
    """A bound that follows from the model (the context, the vocabulary) is checked by /set
    itself, not at the next reply, which would fail until the setting was changed again."""
    conv = repl(tiny.quants["Q8_0"], "/set repeat_last_n 99999999\r/set top_k 99999999\r/set repeat_last_n 32\r")
    err = capsys.readouterr().err
    assert "repeat_last_n must be at most the context size (got 99999999)" in err
    assert "top_k must be at most the vocabulary size (got 99999999)" in err
    assert conv.settings.sampling.repeat_last_n == 32 and conv.settings.sampling.top_k == 40
