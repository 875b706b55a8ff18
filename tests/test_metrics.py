"""`localrun serve`'s /metrics (Prometheus' text format, read back with prometheus_client's own
parser) moving with the requests served, and llama-server's /tokenize and /detokenize; bad bodies
get OpenAI's error shape and the server keeps serving."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from localrun.inference.llama.runtime import LlamaModel, LoadOptions
from localrun.serve.app import Access, create_app
from localrun.serve.metrics import Metrics
from localrun.serve.registry import Registry
from support.serving import ServerProcess, fresh_env

KEY = "sk-local-test"
MODEL = "tiny-llama-Q8_0"
FIXED = {"temperature": 0, "extra_body": {"ignore_eos": True}}  # replies of exactly max_tokens

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def server(tiny, session_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    env = fresh_env(session_home, root)
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "2", env=env, api_key=KEY) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return server.client()


def get(server: ServerProcess, path: str, key: str | None = KEY, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"{server.url}{path}")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def post(server: ServerProcess, path: str, body: object) -> tuple[int, dict]:
    status, _, reply = server.post(path, json.dumps(body).encode())
    return status, reply


def scrape(server: ServerProcess) -> Samples:
    status, text = get(server, "/metrics")
    assert status == 200, text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests(samples: Samples) -> dict[frozenset, float]:
    return {labels: v for (name, labels), v in samples.items() if name == "localrun_http_requests_total"}


def still_serving(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.usage.completion_tokens >= 1


# -- /metrics ------------------------------------------------------------------------------------------
def test_a_chat_completion_moves_the_request_token_and_latency_metrics(server: ServerProcess, client: openai.OpenAI):
    before = scrape(server)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tell me about the sea"}], max_tokens=6, **FIXED
    )
    after = scrape(server)
    usage = reply.usage
    assert usage.completion_tokens == 6

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat = {"method": "POST", "route": "/v1/chat/completions", "status": "200"}
    assert moved("localrun_http_requests_total", **chat) == 1
    assert moved("localrun_prompt_tokens_total", model=MODEL) == usage.prompt_tokens
    assert moved("localrun_generated_tokens_total", model=MODEL) == 6
    cached = usage.prompt_tokens_details.cached_tokens
    assert moved("localrun_reused_prompt_tokens_total", model=MODEL, source="slot") == cached
    assert moved("localrun_time_to_first_token_seconds_count", model=MODEL) == 1
    assert 0 < moved("localrun_time_to_first_token_seconds_sum", model=MODEL) < 60
    assert moved("localrun_time_per_output_token_seconds_count", model=MODEL) == 1
    # the first scrape was counted once it had answered
    assert moved("localrun_http_requests_total", method="GET", route="/metrics", status="200") == 1


def test_a_streamed_reply_counts_too_and_the_gauges_show_its_slot_busy(server: ServerProcess, client: openai.OpenAI):
    before = scrape(server)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a long story"}], max_tokens=400, stream=True, **FIXED
    )
    next(iter(stream))  # the reply has begun: its slot is busy until it ends
    during = scrape(server)
    assert value(during, "localrun_slots_busy", model=MODEL) == 1
    assert value(during, "localrun_queued_requests", model=MODEL) == 0
    assert value(during, "localrun_slots", model=MODEL) == 2
    assert value(during, "localrun_model_loaded", model=MODEL) == 1
    chunks = list(stream)
    assert chunks
    server.wait_for(lambda health: health["models"][0]["busy"] == 0)  # the slot is freed once the reply is sent
    after = scrape(server)
    chat = {"method": "POST", "route": "/v1/chat/completions", "status": "200"}
    assert (
        value(after, "localrun_http_requests_total", **chat) - value(before, "localrun_http_requests_total", **chat)
        == 1
    )
    generated = value(after, "localrun_generated_tokens_total", model=MODEL)
    assert generated - value(before, "localrun_generated_tokens_total", model=MODEL) == 400
    assert value(after, "localrun_slots_busy", model=MODEL) == 0


def test_the_model_load_is_counted_with_its_time(server: ServerProcess):
    samples = scrape(server)
    assert value(samples, "localrun_model_loads_total", model=MODEL) == 1  # loaded at start-up, once
    assert value(samples, "localrun_model_load_seconds_count", model=MODEL) == 1
    assert 0 < value(samples, "localrun_model_load_seconds_sum", model=MODEL) < 120


def test_a_model_unloaded_when_idle_is_loaded_again_by_tokenize_and_counted(tiny):
    with ServerProcess([tiny.quants["Q8_0"]], "--keep-alive", "0") as server:
        server.wait_for(lambda health: not health["models"][0]["loaded"])
        assert value(scrape(server), "localrun_model_loaded", model=MODEL) == 0
        status, reply = post(server, "/tokenize", {"content": "hello"})
        assert status == 200 and reply["tokens"]
        samples = scrape(server)
    assert value(samples, "localrun_model_loads_total", model=MODEL) == 2
    assert value(samples, "localrun_model_load_seconds_count", model=MODEL) == 2


def test_speculation_and_prompt_tokens_read_from_disk_are_counted(tiny):
    """A second server run reads the system prompt the first saved, and drafts by prompt lookup."""
    system = "You are a careful assistant who answers in full sentences. " * 10  # over the cache's minimum
    repeating = "the cat sat on the mat and the dog sat on the log; " * 6  # what prompt lookup drafts from
    for _ in range(2):  # both runs share this test's home, where the prompt cache is kept
        with ServerProcess([tiny.quants["Q8_0"]], "--speculate", "lookup") as server:
            reply = server.client().chat.completions.create(
                model=MODEL,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": f"Repeat: {repeating}"}],
                max_tokens=48,
                **FIXED,
            )
            samples = scrape(server)
    timings = reply.model_extra["timings"]
    assert timings["cached_from_disk"] >= 64 and timings["draft_n"] > 0
    assert (
        value(samples, "localrun_reused_prompt_tokens_total", model=MODEL, source="disk") == timings["cached_from_disk"]
    )
    assert value(samples, "localrun_prompt_cache_hits_total", model=MODEL) == 1
    assert value(samples, "localrun_speculative_drafted_tokens_total", model=MODEL) == timings["draft_n"]
    assert value(samples, "localrun_speculative_accepted_tokens_total", model=MODEL) == timings["draft_n_accepted"]


def test_a_flood_of_unknown_paths_adds_no_label_values(server: ServerProcess):
    get(server, "/no/such/path/0")
    get(server, "/v1/models/warm-up-name")
    before = requests(scrape(server))
    for i in range(40):
        assert get(server, f"/no/such/path/{i}")[0] == 404
        assert get(server, f"/v1/models/not-served-{i}")[0] == 404  # a template's parameter, many values
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    conn.request("BREW", "/coffee/pot", headers={"Authorization": f"Bearer {KEY}"})  # a method HTTP does not have
    conn.getresponse().read()
    conn.close()
    after = requests(scrape(server))
    unmatched = frozenset({"method": "GET", "route": "unmatched", "status": "404"}.items())
    named = frozenset({"method": "GET", "route": "/v1/models/{name:path}", "status": "404"}.items())
    assert after[unmatched] - before[unmatched] == 40
    assert after[named] - before[named] == 40
    new = set(after) - set(before)
    assert all(dict(labels)["method"] in ("GET", "other") for labels in new), new
    assert len(new) <= 2, new  # the odd method's line, and the first scrape's own count


def test_metrics_asks_for_the_key_and_passes_the_gate(server: ServerProcess):
    status, body = get(server, "/metrics", key=None)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    status, body = get(server, "/metrics", host="evil.example")  # DNS rebinding: refused as every route is
    assert status == 421 and json.loads(body)["error"]["code"] == "host_not_allowed"
    samples = scrape(server)
    assert value(samples, "localrun_http_requests_total", method="GET", route="/metrics", status="401") >= 1
    assert value(samples, "localrun_http_requests_total", method="GET", route="/metrics", status="421") >= 1


# -- /tokenize and /detokenize -------------------------------------------------------------------------
def test_tokenize_and_detokenize_round_trip_with_pieces(server: ServerProcess):
    text = "the old man and the sea"
    status, plain = post(server, "/tokenize", {"content": text})
    assert status == 200 and plain["tokens"] and all(isinstance(t, int) for t in plain["tokens"])
    status, pieces = post(server, "/tokenize", {"content": text, "with_pieces": True, "model": MODEL})
    assert [p["id"] for p in pieces["tokens"]] == plain["tokens"]
    assert "".join(p["piece"] for p in pieces["tokens"]) == " " + text  # the vocabulary's leading space
    status, back = post(server, "/detokenize", {"tokens": plain["tokens"]})
    assert status == 200 and back["content"] == " " + text
    # add_special: the BOS the model's vocabulary adds, written out by /detokenize
    status, special = post(server, "/tokenize", {"content": text, "add_special": True})
    assert special["tokens"][1:] == plain["tokens"] and len(special["tokens"]) == len(plain["tokens"]) + 1
    status, back = post(server, "/detokenize", {"tokens": special["tokens"]})
    assert back["content"] == "<s> " + text
    # parse_special: a special token written in the text is that token, or its letters
    assert post(server, "/tokenize", {"content": "<s>"})[1]["tokens"] == special["tokens"][:1]
    assert len(post(server, "/tokenize", {"content": "<s>", "parse_special": False})[1]["tokens"]) > 1


def test_a_piece_that_is_not_whole_utf8_is_given_as_bytes(server: ServerProcess):
    status, reply = post(server, "/tokenize", {"content": "á€", "with_pieces": True})
    assert status == 200
    pieces = reply["tokens"]
    raw = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert raw.decode() == " á€"
    assert any(isinstance(p["piece"], list) for p in pieces)  # the tiny vocabulary spells these byte by byte
    assert post(server, "/detokenize", {"tokens": [p["id"] for p in pieces]})[1]["content"] == " á€"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [1, -1]}, "tokens"),
        ("/detokenize", {"tokens": [872]}, "tokens"),  # the tiny vocabulary's size: one beyond its last id
        ("/detokenize", {"tokens": [2**63]}, "tokens"),
        ("/detokenize", {"tokens": ["1"]}, "tokens.0"),
        ("/detokenize", {"tokens": [True]}, "tokens.0"),
        ("/detokenize", {"tokens": 5}, "tokens"),
        ("/detokenize", {}, "tokens"),
        ("/tokenize", {}, "content"),
        ("/tokenize", {"content": 7}, "content"),
        ("/tokenize", {"content": "hi", "with_pieces": "yes"}, "with_pieces"),
        ("/tokenize", {"content": "\ud800"}, "content"),
    ],
)
def test_bad_bodies_are_400_in_openais_shape(server: ServerProcess, client: openai.OpenAI, path, body, param):
    status, reply = post(server, path, body)
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    still_serving(client)


def test_an_unknown_model_is_404_and_the_key_is_needed(server: ServerProcess):
    status, reply = post(server, "/tokenize", {"content": "hi", "model": "no-such-model"})
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    request = urllib.request.Request(f"{server.url}/detokenize", data=b'{"tokens": [1]}', method="POST")
    request.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401


def test_token_pieces_are_right_when_read_from_several_threads_at_once(tiny):
    """A server reads pieces in its request threads while its scheduler decodes replies."""
    model = LlamaModel(tiny.quants["Q8_0"], LoadOptions())
    try:
        expected = [model.piece(t, special=True) for t in range(model.n_vocab)]
        wrong: list[int] = []

        def read(first: int) -> None:
            for _ in range(20):
                wrong.extend(t for t in range(first, model.n_vocab, 2) if model.piece(t, special=True) != expected[t])

        threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wrong == []
    finally:
        model.close()


def test_two_apps_in_one_process_keep_their_own_metrics():
    """Each app has its own registry: prometheus_client's global one would refuse the second app's
    metrics as duplicates, and mix their figures."""
    apps = [create_app(Registry([]), Access()) for _ in range(2)]  # the second would raise
    assert apps[0] is not apps[1]
    first, second = Metrics(list, []), Metrics(list, [])
    first.request("GET /health", 200)
    assert b'localrun_http_requests_total{method="GET",route="unmatched",status="200"} 1.0' in first.exposition()[0]
    assert b"localrun_http_requests_total{" not in second.exposition()[0]


def test_the_other_apis_routes_are_counted_once_each(server: ServerProcess, client: openai.OpenAI):
    """Ollama's and Anthropic's routes that generate nothing are counted when they answer; those
    that generate or embed are counted by their log line, once."""
    before = scrape(server)
    assert get(server, "/api/tags")[0] == 200
    assert post(server, "/api/show", {"model": MODEL})[0] == 200
    status, _ = post(
        server, "/v1/messages/count_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status == 200
    assert post(server, "/api/embed", {"model": MODEL, "input": "hi"})[0] == 200
    assert (
        post(
            server,
            "/api/chat",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
                "options": {"num_predict": 2},
            },
        )[0]
        == 200
    )
    after = scrape(server)
    for method, route in (
        ("GET", "/api/tags"),
        ("POST", "/api/show"),
        ("POST", "/v1/messages/count_tokens"),
        ("POST", "/api/embed"),
        ("POST", "/api/chat"),
    ):
        labels = {"method": method, "route": route, "status": "200"}
        moved = value(after, "localrun_http_requests_total", **labels) - value(
            before, "localrun_http_requests_total", **labels
        )
        assert moved == 1, route
    still_serving(client)
