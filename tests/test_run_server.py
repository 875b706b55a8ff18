"""`run` and `chat` with --server: answered by a running `localrun serve`, the same text as a local
run, nothing loaded here; what only shapes a local load is refused; a server that is not there is
a network error."""

from __future__ import annotations

import json
import socket

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from typer.testing import CliRunner

from localrun.cli import app
from localrun.commands.remote import RemoteConversation
from localrun.commands.repl import Repl
from localrun.errors import NetworkError
from localrun.inference.generation.settings import SamplingOptions, Settings
from localrun.output import Output
from localrun.serve.client import Server
from support.serving import ServerProcess

runner = CliRunner()
GREEDY = ["--temp", "0", "--ignore-eos", "--repeat-penalty", "1.0", "-n", "8"]


@pytest.fixture(scope="module")
def server(tiny):
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "2", "--ctx", "4096") as proc:
        yield proc


def cli(*args, input: str | None = None, env: dict | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input, env=env)


def test_run_through_the_server_answers_as_a_local_run(tiny, server: ServerProcess):
    model = tiny.quants["Q8_0"]
    for extra in (["--raw"], ["--system", "Be brief."]):
        remote = cli("run", model, "tell me about the sea", *GREEDY, *extra, "--json", "--server", server.url)
        assert remote.exit_code == 0, remote.output
        local = cli("run", model, "tell me about the sea", *GREEDY, *extra, "--json", "--speculate", "off")
        got, want = json.loads(remote.stdout), json.loads(local.stdout)
        assert got["server"] == server.url and got["model"] == "tiny-llama-Q8_0"  # the id it serves it as
        assert got["text"] == want["text"] and got["generated_tokens"] == 8
        assert got["prompt_tokens"] == want["prompt_tokens"]
        assert "load_s" not in got  # nothing was loaded here
    # piped material, stats on stderr, text on stdout; LOCALRUN_SERVER instead of --server
    piped = cli(
        "run", model, "summarize:", *GREEDY, input="the old man and the sea\n", env={"LOCALRUN_SERVER": server.url}
    )
    assert piped.exit_code == 0 and piped.stdout.strip() and "reply 8 tok" in piped.stderr


def test_chat_through_the_server_keeps_the_conversation(tiny, server: ServerProcess, capsys):
    """The real REPL (prompt-toolkit over a pipe) over a RemoteConversation, as `chat --server` makes it."""
    conv = RemoteConversation(Server(server.url), str(tiny.quants["Q8_0"]), Settings(SamplingOptions(temperature=0), 6))
    with create_pipe_input() as pipe:
        pipe.send_text("hello\r/stats\r/model\rand then?\r")
        pipe.close()
        Repl(conv, Output()).run(input=pipe, output=DummyOutput())
    err = capsys.readouterr().err
    assert f"at {server.url} ready, context 4096 tokens" in err  # each slot may use the whole context
    assert "a slot on the server, 2 messages" in err and f"served by {server.url}" in err
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user", "assistant"]
    assert conv.last_stats.cached_tokens > 0  # the server's slot kept the first turn


def test_local_options_are_refused_with_a_server(tiny, server: ServerProcess):
    model = tiny.quants["Q8_0"]
    result = cli("run", model, "hi", "--server", server.url, "--ctx", "1024", "--cache-type-k", "q8_0")
    assert result.exit_code == 2
    assert "--ctx, --cache-type-k shape a model loaded here" in result.stderr


def test_a_model_the_server_does_not_have_and_a_server_that_is_not_there(tiny, server: ServerProcess):
    missing = cli("run", "org/other:Q4_K_M", "hi", "--server", server.url)
    assert missing.exit_code == 3 and "not served here" in missing.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    gone = cli("run", tiny.quants["Q8_0"], "hi", "--server", f"http://127.0.0.1:{port}")
    assert gone.exit_code == 5 and "no server answers" in gone.stderr and "Traceback" not in gone.output
    bad = cli("run", tiny.quants["Q8_0"], "hi", "--server", "ftp://x")
    assert bad.exit_code == 2 and "not a server URL" in bad.stderr


def test_a_grammar_with_ignore_eos_is_a_400_and_the_server_lives_on(server: ServerProcess):
    """One request must not take the server down for every client (llama.cpp's grammar aborts
    when nothing may end a complete reply)."""
    body = {
        "model": "tiny-llama-Q8_0",
        "messages": [{"role": "user", "content": "hi"}],
        "ignore_eos": True,
        "response_format": {"type": "json_object"},
        "max_tokens": 64,
    }
    status, _, answer = server.post("/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and "cannot go with a grammar" in answer["error"]["message"]
    del body["ignore_eos"]
    status, _, answer = server.post("/v1/chat/completions", json.dumps(body).encode())
    assert status == 200 and answer["choices"][0]["message"]["content"].startswith("{")


def test_a_chat_too_long_for_the_servers_context_loses_its_oldest_turns(tiny, capsys):
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "1", "--ctx", "256") as small:
        settings = Settings(SamplingOptions(temperature=0, ban_eog=True), 16)
        conv = RemoteConversation(
            Server(small.url), str(tiny.quants["Q8_0"]), settings, "Be brief.", warn=Output().warn
        )
        sink = Collect()
        for turn in range(4):
            stats = conv.reply(f"question {turn}: " + "tell me about the sea " * 4, sink)
            assert stats.finish_reason == "length"
    err = capsys.readouterr().err
    assert "the context (256 tokens) was nearly full: dropped the 2 oldest messages (the system prompt stays)" in err
    assert conv.messages[0] == {"role": "system", "content": "Be brief."}
    assert conv.messages[-2]["content"].startswith("question 3") and len(conv.messages) < 9


def test_a_server_that_dies_mid_reply_is_a_network_error_not_a_cancel(tiny):
    import signal

    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "1") as doomed:
        conv = RemoteConversation(Server(doomed.url), str(tiny.quants["Q8_0"]), Settings(SamplingOptions(ban_eog=True)))
        sink = Collect(on_piece=lambda n: n == 5 and doomed.stop(signal.SIGKILL))
        with pytest.raises(NetworkError, match="closed the connection in the middle of the reply|broke off the reply"):
            conv.reply("tell me a story", sink)
    assert conv.messages == []  # the question is not kept without its answer


class Collect:
    def __init__(self, on_piece=lambda n: None):
        self.pieces, self.on_piece = 0, on_piece

    def piece(self, text):
        self.pieces += 1
        self.on_piece(self.pieces)

    def progress(self, event):
        pass

    def finish(self, stats):
        self.stats = stats
