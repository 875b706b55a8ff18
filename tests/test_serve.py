"""`localrun serve`: the real server on a random loopback port, driven by the real `openai`
client: chat and completions, streaming, usage, stops, lengths, structured output, logprobs,
and every error status, after each of which the server keeps serving."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import jsonschema
import openai
import pytest

from localrun.model.tiny import vocabulary
from support.serving import ServerProcess, fresh_env

KEY = "sk-local-test"
GREEDY = {"temperature": 0}
FIXED = {"extra_body": {"ignore_eos": True}}  # replies of exactly max_tokens (a random tiny model)
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "count", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny, session_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    env = fresh_env(session_home, root)
    model = tiny.quants["Q8_0"]
    with ServerProcess([model], "--parallel", "2", "--max-body", "64k", env=env, api_key=KEY) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return server.client()


MODEL = "tiny-llama-Q8_0"


def still_serving(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens >= 1


def ask(client: openai.OpenAI, text: str, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kwargs)


def test_models_lists_and_retrieves_the_served_model(client: openai.OpenAI, tiny):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "localrun"
    # the path it was started with reaches it too
    reply = client.chat.completions.create(
        model=str(tiny.quants["Q8_0"]), messages=[{"role": "user", "content": "hi"}], max_tokens=1
    )
    assert reply.model == MODEL


def test_chat_streaming_and_not_give_the_same_text_and_usage(client: openai.OpenAI):
    whole = ask(client, "tell me about the sea", max_tokens=12, **GREEDY, **FIXED)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")

    chunks = list(
        ask(
            client,
            "tell me about the sea",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
            **FIXED,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # the same prompt again: its prefix is in a slot's cache, and says so
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_max_completion_tokens_and_max_tokens(client: openai.OpenAI):
    short = ask(client, "count", max_completion_tokens=3, **GREEDY, **FIXED)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    capped = ask(client, "count", max_tokens=10**6, **GREEDY, **FIXED)  # capped by the slot's context
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage.prompt_tokens + capped.usage.completion_tokens == 2048


def test_stop_strings_end_the_reply_and_never_leak(client: openai.OpenAI):
    full = ask(client, "a story about the old man", max_tokens=30, **GREEDY, **FIXED).choices[0].message.content
    assert len(full) > 12
    stop = full[6:11]
    cut = ask(client, "a story about the old man", max_tokens=30, stop=[stop], **GREEDY, **FIXED)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(stop)]
    streamed = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "a story about the old man"}],
        max_tokens=30,
        stop=stop,
        stream=True,
        **GREEDY,
        **FIXED,
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]


def test_text_completions_streaming_and_not(client: openai.OpenAI):
    whole = client.completions.create(model=MODEL, prompt="the old man and", max_tokens=8, **GREEDY, **FIXED)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    parts = client.completions.create(
        model=MODEL, prompt="the old man and", max_tokens=8, stream=True, **GREEDY, **FIXED
    )
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    default = client.completions.create(model=MODEL, prompt="the old man and", **GREEDY, **FIXED)
    assert default.usage.completion_tokens == 16  # OpenAI's default length for this endpoint


def test_response_format_json_schema_gives_valid_json(client: openai.OpenAI):
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2, 3):
        reply = ask(client, "describe a thing", max_tokens=60, response_format=fmt, temperature=1.0, seed=seed)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    with pytest.raises(openai.BadRequestError) as err:
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "number", "multipleOf": 3}}}
        ask(client, "hi", response_format=bad)
    assert err.value.body["param"] == "response_format" and "multipleOf" in err.value.body["message"]
    still_serving(client)


def test_logprobs_are_the_models_distribution(client: openai.OpenAI):
    reply = ask(client, "the weather", max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY, **FIXED)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        tops = [t.logprob for t in token.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert token.token == token.top_logprobs[0].token  # greedy takes the most likely token
        assert token.logprob == pytest.approx(tops[0])


def test_logit_bias_and_the_penalties_shape_the_reply(client: openai.OpenAI):
    pieces = vocabulary()[0]  # the tiny model's vocabulary: token ids by their text

    def reply(llama_cpp: dict | None = None, **extra) -> list[bytes]:
        body = {"ignore_eos": True, **(llama_cpp or {})}
        answer = ask(client, "the weather", max_tokens=12, logprobs=True, **GREEDY, extra_body=body, **extra)
        return [bytes(t.bytes) for t in answer.choices[0].logprobs.content]

    plain = reply()
    word = next(t for t in plain if len(t) > 1)  # a word the greedy reply holds (not a byte token)
    banned = reply(logit_bias={str(pieces.index(word.decode().replace(" ", "\u2581"))): -100})
    assert word not in banned and banned != plain  # -100: never
    forced = reply(logit_bias={"300": 100})  # a token id of this vocabulary, made certain
    assert len(set(forced)) == 1 and forced != plain
    # OpenAI's penalties make a token seen less likely again: the greedy reply changes first where
    # it repeated itself (with raw logits gapped by less than the penalty)
    assert any(t in plain[:i] for i, t in enumerate(plain)), plain
    for penalty, llama_cpp in (
        ({"frequency_penalty": 2.0}, None),
        ({"presence_penalty": 2.0}, None),
        ({"frequency_penalty": 2.0}, {"repeat_last_n": -1}),  # -1: the whole reply, as llama-server
    ):
        penalized = reply(llama_cpp, **penalty)
        assert penalized != plain, (penalty, llama_cpp)
        first = next(i for i, (a, b) in enumerate(zip(plain, penalized)) if a != b)
        assert plain[first] in plain[:first], (plain, penalized, penalty, llama_cpp)
    assert reply({"repeat_last_n": 0}, frequency_penalty=2.0) == plain  # over no tokens: none


# -- errors: each in OpenAI's shape, and the server serves on ---------------------------------------
def test_malformed_json_is_400(server: ServerProcess, client: openai.OpenAI):
    status, _, body = server.post("/v1/chat/completions", b'{"model": "x", "messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]
    good = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what `curl -d` sends without -H
    status, _, body = server.post("/v1/chat/completions", good, form)
    assert status == 400 and "Content-Type: application/json (not application/x-www-form-urlencoded)" in str(body)
    still_serving(client)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": MODEL, "messages": []}, "messages"),
    ],
)
def test_wrong_types_are_400_naming_the_field(server: ServerProcess, client: openai.OpenAI, body, param):
    status, _, answer = server.post("/v1/chat/completions", json.dumps(body).encode())
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    still_serving(client)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"n": 2}, "n"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),  # the legacy form: tools are served
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},  # not among the tools
            },
            "tool_choice",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}},
                        },
                    }
                ],
                "tool_choice": "required",  # a one-sided bound the call's grammar cannot enforce
            },
            "tools",
        ),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),  # not a token of this model
        ({"logit_bias": {"the": 5}}, "logit_bias"),
        ({"logit_bias": {"\u00b2": 5}}, "logit_bias"),  # a digit to str.isdigit, not to int()
        ({"logit_bias": {"9" * 5000: 5}}, "logit_bias"),
        ({"logit_bias": {"7": 50, "007": 60}}, "logit_bias"),  # one token twice
        ({"logit_bias": {"42": 101}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_what_localrun_cannot_honour_is_refused_by_name(client: openai.OpenAI, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, "hi", max_tokens=2, **extra)
    assert err.value.body["param"] == param
    still_serving(client)


def test_a_prompt_longer_than_a_slot_is_400_context_length_exceeded(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, "the dog " * 1500, max_tokens=2)
    assert err.value.code == "context_length_exceeded" and "2048 tokens per slot" in err.value.message
    still_serving(client)


def test_a_missing_or_wrong_key_is_401(server: ServerProcess, client: openai.OpenAI):
    for key in ("sk-wrong", "sk-local-tesT", ""):
        with pytest.raises(openai.AuthenticationError) as err:
            server.client(api_key=key or "x").models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert server.health()["status"] == "ok"  # health needs no key: monitors and `localrun ps`
    still_serving(client)


def test_an_unknown_model_or_endpoint_is_404(server: ServerProcess, client: openai.OpenAI, tiny):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and MODEL in err.value.message
    for path in (str(tiny.quants["Q4_K_M"]), "/etc/passwd"):  # a file a request names is never opened
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=path, prompt="hi", max_tokens=1)
    status, _, body = server.post("/v1/audio/speech", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert "/v1/audio/speech - 404 · no such endpoint" in server.stderr  # every refusal is on the log
    still_serving(client)


def test_a_body_over_the_limit_is_413_declared_or_chunked(server: ServerProcess, client: openai.OpenAI):
    with pytest.raises(openai.APIStatusError) as err:
        ask(client, "x" * 70_000)
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.endheaders()
    chunk = b"x" * 16_384
    try:
        for _ in range(8):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before all of it is sent
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    still_serving(client)


def test_queue_full_is_503_with_retry_after(tiny, session_home, tmp_path: Path):
    """One slot, one place in the queue: a long stream holds the slot, a second request waits,
    a third is refused; when the stream's client goes, the waiting one is answered."""
    import threading

    model = tiny.quants["Q8_0"]
    with ServerProcess([model], "--parallel", "1", "--queue", "1", "--ctx", "32768") as server:
        client = server.client()
        hold = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "go"}], stream=True, **FIXED
        )
        next(iter(hold))  # the slot is generating
        waiting: list = []
        second = threading.Thread(target=lambda: waiting.append(ask(client, "wait", max_tokens=3)))
        second.start()
        server.wait_for(lambda h: h["models"][0]["queued"] == 1)
        with pytest.raises(openai.APIStatusError) as err:
            ask(client, "too many", max_tokens=3)
        assert err.value.status_code == 503 and err.value.code == "queue_full"
        assert err.value.response.headers["retry-after"] == "1"
        hold.close()  # the client goes away: its slot is freed, the waiting request takes it
        second.join(60)
        assert waiting and waiting[0].usage.completion_tokens >= 1
        still_serving(client)


def test_a_slot_context_beyond_the_trained_one_is_said_per_slot(tiny, session_home):
    """The plan is for all the slots together; its context notes are said per slot."""
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "2", "--ctx", "4096") as server:  # trained with 2048
        assert ask(server.client(), "hi", max_tokens=1).usage.completion_tokens == 1
        said = server.stderr
    assert f"{MODEL}: 4096 tokens per slot is beyond the 2048 the model was trained with" in said
    assert "context 8192" not in said  # both slots' context, as the plan counts it
