"""What a new user trips over (issue 22): commands, paths and log lines printed whole on a terminal,
bench across two models, the server's log, `cache ls`, and the exit codes of pull and rm."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import openai
import pexpect
import pytest
from typer.testing import CliRunner

from localrun.cli import app
from support.serving import ServerProcess

runner = CliRunner()
REPO = "org/tiny-GGUF"


def on_terminal(*args: object, columns: int = 80, until: str | None = None, timeout: int = 120) -> pexpect.spawn:
    """`localrun ARGS` in a pseudo-terminal `columns` wide (stdout and stderr both on it)."""
    env = dict(os.environ, TERM="xterm", COLUMNS=str(columns), LINES="30")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localrun", *map(str, args)],
        env=env,
        encoding="utf-8",
        timeout=timeout,
        dimensions=(30, columns),
    )
    if until:
        child.expect(until)
    return child


ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[78DEM])")


def screen_of(*args: object, columns: int = 80) -> tuple[int, str]:
    """Run to the end on a terminal; the exit code and the text, lines as the program ended them
    (escape sequences removed; of a line redrawn after a carriage return, what was drawn last)."""
    child = on_terminal(*args, columns=columns)
    child.expect(pexpect.EOF)
    child.close()
    lines = ESCAPE.sub("", child.before).replace("\r\n", "\n").split("\n")
    return child.exitstatus, "\n".join(next((p for p in reversed(line.split("\r")) if p), "") for line in lines)


@pytest.fixture
def pulled(hub, tiny):
    """REPO with Q8_0 pulled through localrun."""
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "mmproj-tiny-F16.gguf": tiny.mmproj})
    result = runner.invoke(app, ["pull", f"{REPO}:Q8_0"])
    assert result.exit_code == 0, result.stderr
    return hub


# -- data is never wrapped --------------------------------------------------------------------------
def test_serve_prints_its_curl_example_on_one_line_and_logs_each_request_on_one_line(tiny):
    child = on_terminal("serve", tiny.quants["Q8_0"], "--port", "0", until=r"try: curl [^\r\n]*\r\n")
    try:
        command = child.after.strip().removeprefix("try: ")
        assert len(command) > 80  # longer than the terminal, and still one line
        assert command.endswith('"stream": true}\'') and "-H 'Content-Type: application/json'" in command
        url = re.search(r"(http://\S+)/v1\r\n", child.before).group(1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        client.chat.completions.create(model="tiny-llama-Q8_0", messages=[{"role": "user", "content": "hi"}])
        child.expect(r"([^\r\n]*/v1/chat/completions[^\r\n]*)\r\n")
        line = child.match.group(1)
        # when, the method and the path, the model, the status, the figures: one line, nothing cut
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d POST /v1/chat/completions tiny-llama-Q8_0 200 · ", line)
        assert re.search(r"reply [\d,]+ tok, [\d.]+ tok/s", line) and len(line) > 80
        assert "1 threads" not in child.before and "…" not in line
    finally:
        child.sendintr()
        child.expect(pexpect.EOF)
    assert "stopped" in child.before


def test_a_stream_cut_by_shutdown_is_logged_with_the_200_it_was_sent(tiny):
    with ServerProcess([tiny.quants["Q8_0"]]) as server:
        client = openai.OpenAI(base_url=server.base, api_key="none")
        stream = client.chat.completions.create(
            model="tiny-llama-Q8_0",
            messages=[{"role": "user", "content": "tell me a story"}],
            max_tokens=1900,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
        next(chunks)
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError):
            for _ in chunks:
                pass
        server.proc.wait(60)
        log = server.stderr
    lines = [line for line in log.splitlines() if "POST /v1/chat/completions" in line]
    assert len(lines) == 1, log
    line = lines[0]
    assert " 200 · " in line and "cut short: the server is shutting down" in line, log
    assert " 503 " not in line


def test_auto_pull_prints_the_saved_path_whole(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"]})
    code, screen = screen_of("run", REPO, "hi", "-n", "1")
    assert code == 0, screen
    [saved] = [line for line in screen.splitlines() if line.startswith("saved ")]
    path = Path(saved.removeprefix("saved ").strip())
    assert path.is_file() and path.name == "tiny-Q8_0.gguf"  # not "saved" and the path in pieces


@pytest.mark.parametrize("columns", [80, 120])
def test_show_prints_the_path_whole_on_a_terminal(pulled, columns):
    code, screen = screen_of("show", f"{REPO}:Q8_0", columns=columns)
    assert code == 0, screen
    [line] = [line for line in screen.splitlines() if line.startswith("Path")]
    path = Path(line.removeprefix("Path").strip())
    assert path.is_file() and "…" not in line and len(line) > columns
    # prose still wraps under itself
    assert all(len(line) <= columns for line in screen.splitlines() if not line.startswith(("Path", "Files")))
