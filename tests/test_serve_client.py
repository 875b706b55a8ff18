"""The client `run`/`chat --server` use, against the real server; `localrun ps`; keep-alive;
serving every pulled model on demand; the warning for a server open to the network."""

from __future__ import annotations

import json
import signal
import socket

import pytest
from typer.testing import CliRunner

from localrun.cli import app
from localrun.errors import AccessDenied, NetworkError, NoSpace, NotFound, UsageError
from localrun.inference.generation.events import Piece, Stats, drive
from localrun.inference.generation.settings import SamplingOptions
from localrun.serve import client as remote
from support.serving import ServerProcess

TINY = "tiny-llama-Q8_0"
FIXED = SamplingOptions(temperature=0, ban_eog=True)
runner = CliRunner()


@pytest.fixture
def server(tiny):
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "2", "--ctx", "8192") as proc:
        yield proc


def test_the_client_streams_the_engines_events(server: ServerProcess):
    messages = [{"role": "user", "content": "tell me about the sea"}]
    events = list(remote.generate(server.url, TINY, messages=messages, sampling=FIXED, max_tokens=10))
    assert all(isinstance(e, Piece) for e in events[:-1]) and isinstance(events[-1], Stats)
    stats = events[-1]
    assert stats.finish_reason == "length" and stats.generated_tokens == 10 and stats.prompt_tokens > 5
    assert stats.gen_tps > 0 and stats.prompt_tps and 0 < stats.ttft_s <= stats.total_s
    whole = server.client().chat.completions.create(
        model=TINY, messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert "".join(e.text for e in events[:-1]) == whole.choices[0].message.content
    again = list(remote.generate(f"{server.url}/v1", TINY, messages=messages, sampling=FIXED, max_tokens=10))
    assert again[-1].cached_tokens == stats.prompt_tokens - 1  # the same slot, its prefix kept

    raw = list(remote.generate(server.url, TINY, prompt="the old man and", sampling=FIXED, max_tokens=6))
    text = server.client().completions.create(
        model=TINY, prompt="the old man and", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert "".join(e.text for e in raw[:-1]) == text.choices[0].text and raw[-1].generated_tokens == 6


class Interrupting:
    """A sink that is Ctrl-C'd at the third piece, as a terminal renderer would be."""

    def __init__(self):
        self.pieces: list[str] = []
        self.stats: Stats | None = None

    def piece(self, text: str) -> None:
        self.pieces.append(text)
        if len(self.pieces) == 3:
            raise KeyboardInterrupt

    def progress(self, event) -> None:
        pass

    def finish(self, stats: Stats) -> None:
        self.stats = stats


def test_ctrl_c_cancels_the_request_and_frees_its_slot(server: ServerProcess):
    sink = Interrupting()
    events = remote.generate(
        server.url, TINY, messages=[{"role": "user", "content": "go on"}], sampling=FIXED, max_tokens=None
    )
    stats = drive(events, sink)
    assert stats.finish_reason == "cancelled" and len(sink.pieces) == 3 and sink.stats is stats
    server.wait_for(lambda h: h["models"][0]["busy"] == 0)
    assert "the client went away" in server.stderr


def test_the_client_says_what_the_server_refused(server: ServerProcess, tiny):
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(NotFound, match="not served here"):
        list(remote.generate(server.url, "nope", messages=hi, sampling=FIXED, max_tokens=2))
    with pytest.raises(NoSpace, match="per slot"):
        list(remote.generate(server.url, TINY, messages=[{"role": "user", "content": "a " * 9000}], sampling=FIXED))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(NetworkError, match="no server answers"):
        list(remote.generate(f"http://127.0.0.1:{closed}", TINY, messages=hi, sampling=FIXED))
    with pytest.raises(UsageError, match="not a server URL"):
        remote.Server("ftp://example.com")


def test_a_server_with_a_key_wants_it_from_the_client(tiny, monkeypatch):
    hi = [{"role": "user", "content": "hi"}]
    with ServerProcess([tiny.quants["Q8_0"]], api_key="sk-123") as server:
        with pytest.raises(AccessDenied, match="API key"):
            list(remote.generate(server.url, TINY, messages=hi, sampling=FIXED, max_tokens=2))
        monkeypatch.setenv("LOCALRUN_API_KEY", "sk-123")
        assert list(remote.generate(server.url, TINY, messages=hi, sampling=FIXED, max_tokens=2))[-1].generated_tokens
        ps = runner.invoke(app, ["ps"])
        assert "sk-123" not in ps.stdout  # the key is in no state file and no command line


def test_ps_shows_running_servers_and_forgets_dead_ones(tiny):
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "3") as server:
        client = server.client()
        stream = client.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "go"}], stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        listed = json.loads(runner.invoke(app, ["ps", "--json"]).stdout)["servers"]
        assert [s["pid"] for s in listed] == [server.pid]
        row = listed[0]
        assert row["url"] == server.url and row["answering"] and row["memory"] > 0
        assert row["models"] == [{"id": TINY, "loaded": True, "slots": 3, "busy": 1, "queued": 0, "ctx_per_slot": 2048}]
        table = runner.invoke(app, ["ps"]).stdout
        assert str(server.pid) in table and "1/3" in table
        assert table.splitlines()[1].startswith(TINY + " ")  # the model first, whole, as in list
        stream.close()
        server.stop(signal.SIGKILL)  # dies without a word: its state file stays behind
    assert json.loads(runner.invoke(app, ["ps", "--json"]).stdout)["servers"] == []
    assert "no localrun server or worker is running" in runner.invoke(app, ["ps"]).stderr


def test_an_idle_model_is_unloaded_after_keep_alive_and_reloaded_when_asked(tiny):
    with ServerProcess([tiny.quants["Q8_0"]], "--keep-alive", "1s") as server:
        server.wait_for(lambda h: not h["models"][0]["loaded"])
        reply = server.client().chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": "back?"}], max_tokens=2
        )
        assert reply.usage.completion_tokens >= 1
        lines = [line.split(" ", 2)[-1] for line in server.stderr.splitlines()]  # after the date and time
        assert any(line.startswith("unloaded tiny-llama-Q8_0: idle") for line in lines)
        assert sum(line.startswith("loaded tiny-llama-Q8_0:") for line in lines) == 2


def test_without_a_model_every_pulled_model_is_served_on_demand(tiny, hub):
    hub.add_repo("acme/tiny-GGUF", {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]})
    assert runner.invoke(app, ["pull", "acme/tiny-GGUF:Q8_0"]).exit_code == 0
    assert runner.invoke(app, ["pull", "acme/tiny-GGUF:Q4_K_M"]).exit_code == 0
    with ServerProcess([]) as server:
        client = server.client()
        assert sorted(m.id for m in client.models.list()) == ["acme/tiny-GGUF:Q4_K_M", "acme/tiny-GGUF:Q8_0"]
        assert not any(m["loaded"] for m in server.health()["models"])
        reply = client.chat.completions.create(
            model="acme/tiny-GGUF:Q4_K_M", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.model == "acme/tiny-GGUF:Q4_K_M"
        loaded = {m["id"]: m["loaded"] for m in server.health()["models"]}
        assert loaded == {"acme/tiny-GGUF:Q4_K_M": True, "acme/tiny-GGUF:Q8_0": False}


def test_listening_beyond_loopback_without_a_key_warns(tiny):
    with ServerProcess([tiny.quants["Q8_0"]], "--host", "0.0.0.0") as server:
        assert server.url.startswith("http://127.0.0.1:")  # reached through loopback from here
        assert server.health()["status"] == "ok"
        assert "without --api-key" in server.stderr
    with ServerProcess([tiny.quants["Q8_0"]], "--host", "0.0.0.0", api_key="k") as server:
        assert "without --api-key" not in server.stderr


def test_a_port_in_use_is_a_usage_error(tiny):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", str(tiny.quants["Q8_0"]), "--port", str(port)])
    assert result.exit_code == 2 and f"port {port} is in use" in result.stderr


def test_a_grammar_constrains_the_reply(server: ServerProcess):
    rules = 'root ::= ("yes" | "no") "."'
    for prompt in ("is it raining?", "is the sea blue?", "shall we go?"):
        events = list(
            remote.generate(
                server.url,
                TINY,
                messages=[{"role": "user", "content": prompt}],
                sampling=SamplingOptions(temperature=1.0, seed=7),
                max_tokens=8,
                grammar=rules,
            )
        )
        assert "".join(e.text for e in events[:-1]) in ("yes.", "no.") and events[-1].finish_reason == "eog"
    with pytest.raises(UsageError, match="grammar"):
        list(remote.generate(server.url, TINY, prompt="hi", sampling=FIXED, max_tokens=2, grammar="root ::= ("))
