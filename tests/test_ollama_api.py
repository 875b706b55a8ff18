"""Ollama's API on `localrun serve`, through the official `ollama` client against a real server:
the tiny model answers (a grammar in localrun's own `grammar` option makes it write a given text
where the test needs one), wears Qwen3's template for thinking and tool calls, and pulls come from
the Hub emulator."""

from __future__ import annotations

import json
import signal
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import ollama
import pytest

from support.chat import WEATHER
from support.serving import ServerProcess, fresh_env

TINY = "tiny-llama-Q8_0"
KEY = "ollama-test-key"
TEMPLATES = Path(__file__).parent / "support" / "templates"
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["color", "count"],
    "additionalProperties": False,
}


def literal(text: str) -> dict:
    """Options that make the model write exactly `text`."""
    return {"grammar": "root ::= " + json.dumps(text), "temperature": 0}


def hi(**extra) -> list[dict]:
    return [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tiny, session_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("ollama")
    env = fresh_env(session_home, root)
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "2", env=env, api_key=KEY) as proc:
        yield proc


@pytest.fixture(scope="module")
def qwen3(tiny, session_home, tmp_path_factory):
    """The tiny model with Qwen3's template: reasoning in <think>, tool calls in <tool_call>."""
    root = tmp_path_factory.mktemp("ollama-qwen3")
    env = fresh_env(session_home, root)
    args = ["--parallel", "2", "--template", str(TEMPLATES / "qwen3.jinja")]
    with ServerProcess([tiny.quants["Q8_0"]], *args, env=env) as proc:
        yield proc


def client(server: ServerProcess, key: str | None = None) -> ollama.Client:
    key = server.api_key if key is None else key
    return ollama.Client(host=server.url, headers={"Authorization": f"Bearer {key}"} if key else None)


def raw(server: ServerProcess, method: str, path: str, body: bytes | None) -> tuple[int, object]:
    """A request the client would never send: the status and the JSON answer."""
    request = urllib.request.Request(f"{server.url}{path}", data=body, method=method)
    request.add_header("Content-Type", "application/json")
    if server.api_key:
        request.add_header("Authorization", f"Bearer {server.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read().splitlines()[0])
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- the models ------------------------------------------------------------------------------------
def test_tags_show_and_version_describe_the_served_model(server: ServerProcess):
    c = client(server)
    (listed,) = c.list().models
    assert listed.model == TINY and listed.size == Path(server.argv[4]).stat().st_size
    assert listed.details.format == "gguf" and listed.details.family == "llama"
    assert listed.details.quantization_level == "Q8_0" and len(listed.digest) == 64
    shown = c.show(TINY)
    assert shown.modelinfo["general.architecture"] == "llama" and "completion" in shown.capabilities
    assert shown.details.quantization_level == "Q8_0" and shown.template
    assert c.show(f"{TINY}:latest").details == shown.details  # a name without its tag means :latest
    assert c.show("tiny-llama:Q8_0").details == shown.details  # the quant as the tag
    status, version = raw(server, "GET", "/api/version", None)
    assert status == 200 and version["version"]


def test_ps_lists_the_loaded_model_and_keep_alive_zero_unloads_it(server: ServerProcess):
    c = client(server)
    c.generate(model=TINY, prompt="", keep_alive="5m")  # no prompt: load
    (loaded,) = c.ps().models
    assert loaded.model == TINY and loaded.context_length > 0 and loaded.expires_at is not None
    unloaded = c.generate(model=TINY, prompt="", keep_alive=0)
    assert unloaded.done and unloaded.done_reason == "unload"
    assert c.ps().models == [] and not server.health()["models"][0]["loaded"]
    loaded_again = c.chat(model=TINY, messages=[], keep_alive=-1)
    assert loaded_again.done_reason == "load" and [m.model for m in c.ps().models] == [TINY]
    assert c.ps().models[0].expires_at.year > 2200  # kept loaded until the server stops
    c.chat(model=TINY, messages=hi(), options=literal("ok"), keep_alive="1h")  # a request sets the model's expiry
    left = c.ps().models[0].expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=59) < left <= timedelta(hours=1)


def test_the_key_is_asked_for_in_ollamas_shape(server: ServerProcess):
    for key in ("", "wrong"):
        with pytest.raises(ollama.ResponseError) as err:
            client(server, key).list()
        assert err.value.status_code == 401 and "API key" in err.value.error


def test_an_unknown_model_is_a_404_in_ollamas_shape(server: ServerProcess):
    with pytest.raises(ollama.ResponseError) as err:
        client(server).chat(model="nope", messages=hi())
    assert err.value.status_code == 404 and "nope" in err.value.error


# -- chat and generate -----------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_chat_answers_streaming_and_not(server: ServerProcess, stream: bool):
    c = client(server)
    text = "Hello there, friend."
    if not stream:
        reply = c.chat(model=TINY, messages=hi(), options=literal(text), stream=False)
        assert reply.message.role == "assistant" and reply.message.content == text
        assert reply.done and reply.done_reason == "stop" and reply.model == TINY
        return
    parts = list(c.chat(model=TINY, messages=hi(), options=literal(text), stream=True))
    assert len(parts) > 2 and not any(p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == text
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count > 0


@pytest.mark.parametrize("stream", [False, True])
def test_generate_applies_the_template_unless_raw(server: ServerProcess, stream: bool):
    c = client(server)

    def answer(**kwargs) -> tuple[str, int]:
        if not stream:
            reply = c.generate(model=TINY, options=literal("Fine."), **kwargs)
            return reply.response, reply.prompt_eval_count
        parts = list(c.generate(model=TINY, options=literal("Fine."), stream=True, **kwargs))
        return "".join(p.response for p in parts), parts[-1].prompt_eval_count

    templated, templated_n = answer(prompt="How are you?", system="Be brief.")
    bare, bare_n = answer(prompt="How are you?", raw=True)
    assert templated == bare == "Fine."
    assert templated_n > bare_n  # the template and the system prompt were read too


def test_num_predict_limits_the_reply_and_says_length(server: ServerProcess):
    reply = client(server).chat(
        model=TINY, messages=hi(), options={**literal("one two three four five six"), "num_predict": 2}
    )
    assert reply.done_reason == "length" and reply.eval_count == 2


@pytest.mark.parametrize("stream", [False, True])
def test_the_timing_fields_are_real_figures(server: ServerProcess, stream: bool):
    c = client(server)
    c.generate(model=TINY, prompt="", keep_alive=0)  # unloaded: this request pays the load
    question = [{"role": "user", "content": f"Count for me, please ({stream})."}]  # not in a slot's cache
    if stream:
        *parts, reply = list(c.chat(model=TINY, messages=question, options=literal("a b c d"), stream=True))
        assert all(p.total_duration is None and p.eval_count is None for p in parts)  # the figures come last
    else:
        reply = c.chat(model=TINY, messages=question, options=literal("a b c d"))
    figures = [reply.total_duration, reply.load_duration, reply.prompt_eval_duration, reply.eval_duration]
    assert all(isinstance(f, int) and f > 0 for f in figures)
    assert reply.total_duration >= reply.load_duration + reply.prompt_eval_duration + reply.eval_duration
    assert reply.prompt_eval_count > 5 and reply.eval_count >= 4
    warm = c.chat(model=TINY, messages=hi(), options=literal("ok"))
    assert warm.load_duration < reply.load_duration  # loaded already


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_come_with_each_token(server: ServerProcess, stream: bool):
    c = client(server)
    common = {"model": TINY, "messages": hi(), "options": literal("one two three"), "logprobs": True, "top_logprobs": 2}
    if stream:
        parts = list(c.chat(stream=True, **common))
        tokens = [t for p in parts for t in p.logprobs or []]
        last = parts[-1]
    else:
        last = c.chat(**common)
        tokens = list(last.logprobs)
    assert "".join(t.token for t in tokens) == "one two three" and last.done
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)


def test_format_with_a_schema_gives_valid_json(server: ServerProcess):
    c = client(server)
    for seed in (1, 2, 3):
        reply = c.chat(
            model=TINY, messages=hi(), format=SCHEMA, options={"temperature": 1.0, "seed": seed, "num_predict": 80}
        )
        assert reply.done_reason == "stop"
        jsonschema.validate(json.loads(reply.message.content), SCHEMA)
    generated = c.generate(model=TINY, prompt="A thing:", raw=True, format=SCHEMA, options={"num_predict": 80})
    jsonschema.validate(json.loads(generated.response), SCHEMA)
    obj = c.chat(model=TINY, messages=hi(), format="json", options={"seed": 4, "num_predict": 80})
    assert obj.message.content.startswith("{")  # a JSON object, whole unless num_predict cut it
    assert obj.done_reason == "length" or isinstance(json.loads(obj.message.content), dict)


def test_think_puts_the_reasoning_in_message_thinking(qwen3: ServerProcess):
    c = client(qwen3)
    text = "<think>\nTwo and two make four.\n</think>\n\nFour."
    reply = c.chat(model=TINY, messages=hi(), think=True, options=literal(text))
    assert reply.message.thinking.strip() == "Two and two make four." and reply.message.content.strip() == "Four."
    parts = list(c.chat(model=TINY, messages=hi(), think=True, options=literal(text), stream=True))
    assert "".join(p.message.thinking or "" for p in parts).strip() == "Two and two make four."
    assert "".join(p.message.content for p in parts).strip() == "Four."
    generated = c.generate(model=TINY, prompt="Hi", think=True, options=literal(text))
    assert generated.thinking.strip() == "Two and two make four." and generated.response.strip() == "Four."
    # think: false turns the template's switch off: it writes an empty thought into the prompt
    off = c.chat(model=TINY, messages=hi(), think=False, options=literal("Four."))
    assert off.message.content == "Four." and not off.message.thinking
    assert off.prompt_eval_count > reply.prompt_eval_count


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_comes_back_with_its_arguments_as_an_object(qwen3: ServerProcess, stream: bool):
    c = client(qwen3)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        parts = list(c.chat(model=TINY, messages=messages, tools=[WEATHER], options=literal(call), stream=True))
        calls = [tc for p in parts for tc in p.message.tool_calls or []]
        assert parts[-1].done
    else:
        reply = c.chat(model=TINY, messages=messages, tools=[WEATHER], options=literal(call))
        calls = list(reply.message.tool_calls or [])
    ((only,),) = [calls]
    assert only.function.name == "get_weather" and only.function.arguments == {"city": "Paris"}
    # the call and its result go back: the next answer reads them through the template
    history = [
        *messages,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"},
    ]
    answer = c.chat(model=TINY, messages=history, tools=[WEATHER], options=literal("It is sunny."))
    assert answer.message.content == "It is sunny." and not answer.message.tool_calls


# -- refusals and bad bodies -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"options": {"mirostat": 2}}, "options.mirostat"),
        ({"options": {"typical_p": 0.5}}, "options.typical_p"),
        ({"options": {"num_ctx": 1_000_000}}, "options.num_ctx"),
        ({"options": {"frobnicate": 1}}, "options.frobnicate"),
        ({"options": {"temperature": -1}}, "temperature"),
        ({"keep_alive": "soon"}, "keep_alive"),
        ({"think": True}, "think"),  # this template has no reasoning format
        ({"messages": [{"role": "user", "content": "see", "images": ["aGk="]}]}, "images"),
    ],
)
def test_what_localrun_cannot_honour_is_refused_by_name(server: ServerProcess, kwargs: dict, named: str):
    c = client(server)
    with pytest.raises(ollama.ResponseError) as err:
        c.chat(model=TINY, **{"messages": hi(), **kwargs})
    assert err.value.status_code == 400 and named in err.value.error
    ignored = c.chat(
        model=TINY,
        messages=hi(),
        options={**literal("ok"), "num_thread": 3, "use_mmap": True, "mirostat": 0, "tfs_z": None},
    )
    assert ignored.message.content == "ok"  # how Ollama would load the model: the server decided that


@pytest.mark.parametrize("field", ["suffix", "context", "images", "template"])
def test_generates_fields_localrun_does_not_honour_are_refused_by_name(server: ServerProcess, field: str):
    value = {"suffix": "end", "context": [1, 2, 3], "images": ["aGk="], "template": "{{ .Prompt }}"}[field]
    status, body = raw(
        server, "POST", "/api/generate", json.dumps({"model": TINY, "prompt": "x", field: value}).encode()
    )
    assert status == 400 and field in body["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/chat"),
        ("POST", "/api/generate"),
        ("POST", "/api/show"),
        ("POST", "/api/pull"),
        ("DELETE", "/api/delete"),
    ],
)
@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"model": 5}',
        b"[]",
        b'{"model": "tiny-llama-Q8_0", "messages": "hi", "prompt": 3, "stream": "yes", "verbose": "yes"}',
        b'"\\ud800"',
        b'{"model": "tiny-llama-Q8_0", "messages": [{"role": "user", "content": "\\ud800"}], "prompt": "\\udfff"}',
    ],
)
def test_a_bad_body_gets_ollamas_error_shape_and_the_server_keeps_serving(
    server: ServerProcess, method: str, path: str, body: bytes
):
    status, answer = raw(server, method, path, body)
    assert status in (400, 403) and isinstance(answer, dict) and list(answer) == ["error"]
    assert isinstance(answer["error"], str) and answer["error"]
    assert client(server).chat(model=TINY, messages=hi(), options=literal("ok")).message.content == "ok"


def test_pull_and_delete_answer_403_without_the_flag(server: ServerProcess):
    c = client(server)
    for call in (lambda: c.pull("acme/tiny-GGUF"), lambda: c.delete(TINY)):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 403 and "--allow-model-changes" in err.value.error
    assert [m.model for m in c.list().models] == [TINY]


# -- pull and delete -------------------------------------------------------------------------------
def test_a_pulled_model_is_served_at_once_and_delete_removes_it(tiny, hub):
    hub.add_repo("acme/tiny-GGUF", {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]})
    with ServerProcess([tiny.quants["Q4_K_M"]], "--allow-model-changes") as server:
        c = client(server)
        progress = list(c.pull("acme/tiny-GGUF:Q8_0", stream=True))
        assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
        sized = [p for p in progress if p.total]
        assert sized and sized[-1].completed == sized[-1].total == tiny.quants["Q8_0"].stat().st_size
        assert {m.model for m in c.list().models} == {"tiny-llama-Q4_K_M", "acme/tiny-GGUF:Q8_0"}
        for name in ("acme/tiny-GGUF:Q8_0", "hf.co/acme/tiny-GGUF:Q8_0"):
            reply = c.chat(model=name, messages=hi(), options=literal("pulled"))
            assert reply.message.content == "pulled" and reply.model == "acme/tiny-GGUF:Q8_0"
        metrics = urllib.request.urlopen(f"{server.url}/metrics", timeout=30).read().decode()
        assert 'localrun_generated_tokens_total{model="acme/tiny-GGUF:Q8_0"}' in metrics  # counted as served
        assert 'localrun_model_loaded{model="acme/tiny-GGUF:Q8_0"} 1.0' in metrics
        assert c.pull("acme/tiny-GGUF:Q8_0").status == "success"  # again: nothing to download
        assert c.delete("acme/tiny-GGUF:Q8_0").status == "success"
        assert [m.model for m in c.list().models] == ["tiny-llama-Q4_K_M"]
        with pytest.raises(ollama.ResponseError) as err:
            c.chat(model="acme/tiny-GGUF:Q8_0", messages=hi())
        assert err.value.status_code == 404
        with pytest.raises(ollama.ResponseError) as err:
            c.delete("tiny-llama-Q4_K_M")  # a file named on the command line is not the server's to delete
        assert err.value.status_code == 400
        with pytest.raises(ollama.ResponseError) as err:
            list(c.pull("acme/missing-GGUF", stream=True))
        assert "missing" in err.value.error
        # the stream had begun (200): its failure is on the server's log, as a cut-short reply's is
        assert "POST /api/pull acme/missing-GGUF 200 · cut short: " in server.stderr
        assert "POST /api/pull acme/tiny-GGUF:Q8_0 200 · pulled" in server.stderr
        for path in ("/etc/passwd", "./model.gguf", "not a name"):  # no request makes the server open a file
            with pytest.raises(ollama.ResponseError) as err:
                list(c.pull(path, stream=True))
            assert err.value.status_code == 400
        assert c.chat(model="tiny-llama-Q4_K_M", messages=hi(), options=literal("still")).message.content == "still"
        # no tag, or Ollama's default one: the quant that fits best, found by the same names
        assert c.pull("acme/tiny-GGUF:latest").status == "success"
        reply = c.chat(model="acme/tiny-GGUF:latest", messages=hi(), options=literal("best"))
        assert reply.message.content == "best" and reply.model.startswith("acme/tiny-GGUF:")


# -- the pieces ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        *[(300, 300.0), (2.5, 2.5), ("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("0", 0.0), ("45", 45.0)],
        *[(-1, None), ("-1m", None)],
        # beyond Go's longest duration, or beyond a float: forever (it broke /api/ps's expiry date)
        *[("9999999999999999h", None), (10**400, None), (1e300, None)],
    ],
)
def test_keep_alive_is_seconds_or_a_go_duration_and_negative_is_forever(value, seconds):
    from localrun.serve.ollama_protocol import keep_alive_seconds

    assert (
        keep_alive_seconds(value) == pytest.approx(seconds)
        if seconds is not None
        else keep_alive_seconds(value) is None
    )


@pytest.mark.parametrize("value", ["soon", "5 m", "", "1d", "m", True, float("nan"), "1e400"])
def test_a_keep_alive_that_is_no_duration_is_refused(value):
    from localrun.serve.ollama_protocol import keep_alive_seconds

    with pytest.raises(ValueError):
        keep_alive_seconds(value)


def test_serve_help_names_the_flag_that_allows_pull_and_delete():
    from typer.testing import CliRunner

    from localrun.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--allow-model-changes" in result.stdout and "/api/pull" in result.stdout


def test_a_stream_cut_short_ends_with_an_error_line_the_client_raises(tiny):
    """Stopping the server mid-stream: the stream's last line is Ollama's `{"error": ...}`, which
    its client raises, and the server still exits 0."""
    endless = {"grammar": 'root ::= ("la " | "lo ") root', "num_predict": -1, "temperature": 0}  # no end
    with ServerProcess([tiny.quants["Q8_0"]]) as server:
        parts = client(server).chat(model=TINY, messages=hi(), options=endless, stream=True)
        seen = 0
        with pytest.raises(ollama.ResponseError) as err:
            for part in parts:
                seen += 1
                assert not part.done
                if seen == 3:
                    server.proc.send_signal(signal.SIGTERM)
        assert "shutting down" in err.value.error
        assert server.proc.wait(60) == 0


def test_a_body_sent_as_ollamas_docs_send_it_is_read_as_json(server: ServerProcess):
    """Ollama's documentation sends `curl -d '{...}'`: a form's Content-Type, a JSON body. Its routes
    read it as JSON, as Ollama does; OpenAI's routes still ask for application/json."""
    body = json.dumps({"model": TINY, "messages": hi(), "stream": False, "options": {"num_predict": 2}}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {server.api_key}"}
    request = urllib.request.Request(f"{server.url}/api/chat", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200 and json.loads(response.read())["done"] is True
    openai_body = json.dumps({"model": TINY, "messages": hi(), "max_tokens": 2}).encode()
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=openai_body, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 400 and "Content-Type: application/json" in refused.value.read().decode()


def test_a_keep_alive_beyond_any_date_keeps_the_model_loaded_and_ps_answering(server: ServerProcess):
    c = client(server)
    c.chat(model=TINY, messages=[], keep_alive="9999999999999999h")
    loaded = c.ps().models
    assert [m.model for m in loaded] == [TINY] and loaded[0].expires_at.year > 2300
    c.chat(model=TINY, messages=[], keep_alive="5m")  # as the other tests expect it


@pytest.mark.parametrize(
    ("kind", "status", "anthropic_type"),
    [
        ("UsageError", 400, "invalid_request_error"),
        ("NotFound", 404, "not_found_error"),
        ("AccessDenied", 403, "permission_error"),  # the Hub refused a pull: a token or a licence
        ("NetworkError", 502, "api_error"),  # the Hub or a worker did not answer: upstream of this server
        ("NoSpace", 503, "overloaded_error"),
        ("BadModel", 500, "api_error"),
    ],
)
def test_a_localrun_error_keeps_its_meaning_in_every_apis_shape(kind, status, anthropic_type):
    from localrun import errors
    from localrun.serve.errors import from_localrun

    said = from_localrun(getattr(errors, kind)("what happened", hint="what to do"))
    assert said.status == status
    assert said.payload("ollama") == {"error": "what happened (what to do)"}
    assert said.payload("anthropic")["error"] == {"type": anthropic_type, "message": "what happened (what to do)"}
    assert said.payload("openai")["error"]["message"] == "what happened (what to do)"
