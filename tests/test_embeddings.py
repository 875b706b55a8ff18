"""Embeddings and reranking: /v1/embeddings through the official `openai` client and /v1/rerank
on a real server, `localrun embed` in a child process, and the embedding context itself -- one
text gives the same vector whichever way it goes, batched or alone; bad bodies get OpenAI's error
shape and the server keeps serving; too-long inputs are refused, or cut when asked."""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import replace

import numpy as np
import ollama
import openai
import pytest

from localrun.inference.embedding import Embedder, InputTooLong, embedding_options
from localrun.inference.llama.runtime import LlamaContext, LlamaModel, LoadOptions
from support.serving import ServerProcess, fresh_env

CHAT = "tiny-llama-Q8_0"
LAST = "tiny-last-F32"  # its GGUF names last-token pooling
RANK = "tiny-rank-F32"  # its GGUF names rank pooling: a reranker (its head's score is not meaningful)
TEXTS = ["the cat sat on the mat", "hot word one", "what is this", "the dog was out in the hot sun " * 3]
EMBED_CTX = 64  # tokens per input on the server below
AGREE = 0.9999  # cosine of one text's vectors made two ways (batch shapes change the float sums)


@pytest.fixture(scope="module")
def server(tiny, session_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    env = fresh_env(session_home, root)
    models = [tiny.quants["Q8_0"], tiny.pooling_last, tiny.pooling_rank]
    with ServerProcess(models, "--parallel", "2", "--embed-ctx", str(EMBED_CTX), env=env) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return server.client()


@pytest.fixture
def direct(tiny):
    """An embedder on the chat model, as the server makes it beside its slots."""
    model = LlamaModel(tiny.quants["Q8_0"], LoadOptions(n_threads=1))
    embedder = Embedder.beside(model, LoadOptions(n_threads=1), EMBED_CTX)
    yield embedder
    embedder.close()
    model.close()


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def post(server: ServerProcess, path: str, body: object) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{server.url}{path}", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def embed_cli(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localrun", "embed", *args], input=stdin.encode(), capture_output=True, timeout=120
    )


# -- the embedding context ------------------------------------------------------------------------
def test_inputs_batched_into_one_decode_equal_each_embedded_alone(direct: Embedder):
    batched = direct.embed(TEXTS)
    alone = [direct.embed([text])[0] for text in TEXTS]
    assert [e.n_tokens for e in batched] == [e.n_tokens for e in alone]
    assert len({e.vector.shape for e in batched}) == 1 and batched[0].vector.shape == (direct.dimensions,)
    for b, a in zip(batched, alone):
        assert cosine(b.vector, a.vector) >= AGREE
    # different texts give different vectors, the same text the same
    assert cosine(batched[0].vector, batched[1].vector) < 0.999
    assert cosine(direct.embed([TEXTS[0]])[0].vector, batched[0].vector) >= AGREE


def test_more_inputs_than_one_decode_holds_come_back_in_order(direct: Embedder):
    texts = [f"{word} the cat" for word in ("hot", "word", "one", "what", "some", "out")] * 30  # 180 > 64 sequences
    found = direct.embed(texts)
    assert len(found) == len(texts)
    alone = direct.embed([texts[-1]])[0]
    assert cosine(found[-1].vector, alone.vector) >= AGREE
    assert cosine(found[5].vector, found[-1].vector) >= AGREE  # the same text, another decode


def test_a_generative_model_is_mean_pooled_and_a_gguf_pooling_is_honoured(direct: Embedder, tiny):
    assert direct.pooling == "mean" and not direct.pooling_from_model
    assert "names none" in direct.describe_pooling()
    model = LlamaModel(tiny.pooling_last, LoadOptions(n_threads=1))
    try:
        last = Embedder.beside(model, LoadOptions(n_threads=1), 64)
        assert last.pooling == "last" and last.pooling_from_model
        # last-token pooling: a causal model's state at the last token, whatever the batch
        v = last.embed(["the cat sat", "hot word"])[0].vector
        mean_opts = LoadOptions(n_threads=1, n_ctx=256, n_batch=256, embeddings=True, pooling=1)
        mean = Embedder(model, LlamaContext(model, mean_opts), 64)
        assert mean.pooling == "mean"
        assert cosine(v, last.embed(["the cat sat"])[0].vector) >= AGREE
        assert cosine(v, mean.embed(["the cat sat"])[0].vector) < 0.999
        mean.close()
        last.close()
    finally:
        model.close()


def test_a_generative_models_states_averaged_without_its_output_head_equal_llama_cpps_mean(direct: Embedder):
    # the default context stops its graph before the output head and averages the token states
    # itself; llama.cpp's own mean pooling (asked for by name) computes the head, then pools
    opts = replace(embedding_options(LoadOptions(n_threads=1), EMBED_CTX), pooling=1)
    pooled = Embedder(direct.model, LlamaContext(direct.model, opts), EMBED_CTX)
    try:
        assert pooled.pooling == direct.pooling == "mean"
        for ours, theirs in zip(direct.embed(TEXTS), pooled.embed(TEXTS)):
            assert ours.n_tokens == theirs.n_tokens
            assert cosine(ours.vector, theirs.vector) >= AGREE
            assert np.allclose(ours.vector, theirs.vector, rtol=1e-3, atol=1e-4)  # not just the direction
    finally:
        pooled.close()


def test_an_input_longer_than_the_context_is_refused_or_cut(direct: Embedder):
    long = "the cat " * 60
    with pytest.raises(InputTooLong) as refused:
        direct.embed(["hot", long])
    assert refused.value.index == 1 and refused.value.limit == EMBED_CTX
    cut = direct.embed(["hot", long], truncate=True)
    assert cut[1].n_tokens == EMBED_CTX and cut[1].truncated and not cut[0].truncated


# -- /v1/embeddings ---------------------------------------------------------------------------------
def test_the_openai_client_gets_unit_vectors_in_order_with_usage(client: openai.OpenAI, direct: Embedder):
    reply = client.embeddings.create(model=CHAT, input=TEXTS)  # the client asks for base64 by default
    assert reply.model == CHAT and reply.object == "list"
    assert [d.index for d in reply.data] == list(range(len(TEXTS)))
    alone = direct.embed(TEXTS)
    for d, e in zip(reply.data, alone):
        assert len(d.embedding) == direct.dimensions
        assert abs(np.linalg.norm(d.embedding) - 1) < 1e-5
        assert cosine(d.embedding, e.vector) >= AGREE
    assert reply.usage.prompt_tokens == sum(e.n_tokens for e in alone) == reply.usage.total_tokens
    floats = client.embeddings.create(model=CHAT, input=TEXTS[0], encoding_format="float")
    assert len(floats.data) == 1 and cosine(floats.data[0].embedding, reply.data[0].embedding) >= AGREE
    # token ids: one input, or several
    ids = direct.tokens([TEXTS[0], TEXTS[1]], False)
    by_ids = client.embeddings.create(model=CHAT, input=ids[0][0])
    assert cosine(by_ids.data[0].embedding, reply.data[0].embedding) >= AGREE
    both = client.embeddings.create(model=CHAT, input=[ids[0][0], ids[1][0]])
    assert cosine(both.data[1].embedding, reply.data[1].embedding) >= AGREE


def test_an_embedding_model_and_a_chat_model_are_served_side_by_side(client: openai.OpenAI):
    reply = client.embeddings.create(model=LAST, input=["the cat sat", "hot word"], encoding_format="float")
    assert reply.model == LAST and len(reply.data) == 2
    chat = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.usage.completion_tokens >= 1
    # and a chat model embeds while its slots generate
    stream = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "tell me"}],
        max_tokens=40,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = next(iter(stream))
    during = client.embeddings.create(model=CHAT, input="the cat sat on the mat", encoding_format="float")
    rest = list(stream)
    assert first.choices and rest and len(during.data[0].embedding) == 256


def test_the_same_text_through_the_server_and_embed_agree(client: openai.OpenAI, tiny, direct: Embedder):
    served = client.embeddings.create(model=CHAT, input=TEXTS, encoding_format="float")
    run = embed_cli(str(tiny.quants["Q8_0"]), "--ctx", str(EMBED_CTX), stdin="\n".join(TEXTS) + "\n")
    assert run.returncode == 0, run.stderr.decode()
    lines = [json.loads(line) for line in run.stdout.decode().splitlines()]
    assert [line["index"] for line in lines] == list(range(len(TEXTS)))
    for line, d in zip(lines, served.data):
        assert abs(np.linalg.norm(line["embedding"]) - 1) < 1e-5
        assert cosine(line["embedding"], d.embedding) >= AGREE
    stderr = run.stderr.decode()
    assert "4 inputs" in stderr and "pooling mean" in stderr


def test_one_text_through_openais_ollamas_and_the_older_ollama_route_agree(server, client, direct: Embedder):
    """The three routes, through their official clients: one vector, normalised as each API says."""
    alone = direct.embed(TEXTS)
    served = client.embeddings.create(model=CHAT, input=TEXTS, encoding_format="float")
    local = ollama.Client(host=server.url)
    embedded = local.embed(model=CHAT, input=TEXTS)
    assert embedded.model == CHAT and len(embedded.embeddings) == len(TEXTS)
    assert embedded.prompt_eval_count == sum(e.n_tokens for e in alone) and embedded.total_duration > 0
    older = local.embeddings(model=CHAT, prompt=TEXTS[0])
    for mine, openai_one, ollama_one in zip(alone, served.data, embedded.embeddings):
        assert abs(np.linalg.norm(ollama_one) - 1) < 1e-5
        assert cosine(openai_one.embedding, ollama_one) >= AGREE
        assert cosine(mine.vector, ollama_one) >= AGREE
    assert cosine(older.embedding, alone[0].vector) >= AGREE
    tokens = sum(e.n_tokens for e in alone)
    assert f"POST /api/embed {CHAT} 200 · 4 inputs · {tokens} tok" in server.stderr  # what it did, on the log
    assert np.allclose(older.embedding, alone[0].vector, rtol=1e-3, atol=1e-4)  # not normalised: as pooled
    # one string, and Ollama's truncate (on by default) against refusing
    single = local.embed(model=CHAT, input=TEXTS[1])
    assert cosine(single.embeddings[0], embedded.embeddings[1]) >= AGREE
    long = "the cat " * 60
    assert len(local.embed(model=CHAT, input=long).embeddings) == 1
    with pytest.raises(ollama.ResponseError) as refused:
        local.embed(model=CHAT, input=long, truncate=False)
    assert refused.value.status_code == 400 and "input" in refused.value.error


def test_dimensions_keep_the_first_components_at_unit_length_on_both_apis(server, client):
    full = client.embeddings.create(model=CHAT, input="the cat sat", encoding_format="float").data[0].embedding
    cut = client.embeddings.create(model=CHAT, input="the cat sat", dimensions=16, encoding_format="float")
    vector = np.asarray(cut.data[0].embedding)
    assert vector.shape == (16,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert cosine(vector, full[:16]) >= AGREE
    by_ollama = ollama.Client(host=server.url).embed(model=CHAT, input="the cat sat", dimensions=16)
    assert cosine(by_ollama.embeddings[0], vector) >= AGREE
    status, reply = post(server, "/api/embed", {"model": CHAT, "input": "hot", "dimensions": 100000})
    assert status == 400 and "dimensions" in reply["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": CHAT, "input": 5},
        {"model": CHAT, "input": ["hot", 3]},
        {"model": CHAT, "input": "hot", "truncate": "yes"},
        {"model": CHAT, "input": "\ud800"},
        {"input": "hot"},
        {"model": "nope", "input": "hot"},
    ],
)
def test_bad_ollama_embed_bodies_get_ollamas_error_shape(server, body):
    for path, key in (("/api/embed", "input"), ("/api/embeddings", "prompt")):
        if key == "prompt" and "truncate" in body:
            continue  # the older route has no truncate: ignored, as unknown fields are
        status, reply = post(
            server, path, {("prompt" if k == "input" and key == "prompt" else k): v for k, v in body.items()}
        )
        assert status in (400, 404) and isinstance(reply["error"], str) and reply["error"], (path, reply)
    assert ollama.Client(host=server.url).embed(model=CHAT, input="hot").embeddings


def test_embed_writes_npy_and_keeps_the_length_with_no_normalize(tiny, tmp_path):
    model = str(tiny.quants["Q8_0"])
    target = tmp_path / "v.npy"
    run = embed_cli(model, "--format", "npy", "-o", str(target), "--no-normalize", stdin="hot word\nthe cat\n")
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout == b""
    vectors = np.load(target)
    assert vectors.shape == (2, 256) and vectors.dtype == np.float32
    assert abs(np.linalg.norm(vectors[0]) - 1) > 1e-3  # not scaled
    piped = embed_cli(model, "-f", "npy", stdin="hot word\nthe cat\n")
    assert piped.returncode == 0
    unit = np.load(io.BytesIO(piped.stdout))
    assert cosine(unit[1], vectors[1]) >= AGREE and abs(np.linalg.norm(unit[1]) - 1) < 1e-5


def test_embed_refuses_a_too_long_line_in_one_line_or_cuts_it_when_asked(tiny):
    model = str(tiny.quants["Q8_0"])
    text = "hot word\n" + "the cat " * 60 + "\n"
    refused = embed_cli(model, "--ctx", "32", stdin=text)
    assert refused.returncode != 0 and refused.stdout == b""
    err = refused.stderr.decode()
    assert "input 1 has" in err and "32" in err and "Traceback" not in err
    cut = embed_cli(model, "--ctx", "32", "--truncate", stdin=text)
    assert cut.returncode == 0 and len(cut.stdout.decode().splitlines()) == 2
    assert "cut to the context: 1" in cut.stderr.decode()
    empty = embed_cli(model, stdin="")
    assert empty.returncode != 0 and "no input" in empty.stderr.decode()
    bad = embed_cli(model, "--format", "csv", stdin="hot\n")
    assert bad.returncode != 0 and "--format csv" in bad.stderr.decode()


def test_embedding_requests_beyond_the_queue_get_503_and_the_server_keeps_serving(tiny, session_home, tmp_path):
    env = fresh_env(session_home, tmp_path)
    many = [f"{word} the cat sat on the mat with the dog" for word in ("hot", "word", "one", "what")] * 96
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "1", "--queue", "0", env=env) as server:
        post(server, "/v1/embeddings", {"model": CHAT, "input": "warm"})
        statuses: list[int] = []
        senders = [
            threading.Thread(
                target=lambda: statuses.append(post(server, "/v1/embeddings", {"model": CHAT, "input": many})[0])
            )
            for _ in range(6)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert set(statuses) == {200, 503}, statuses
        status, reply = post(server, "/v1/embeddings", {"model": CHAT, "input": "hot"})
        assert status == 200 and reply["data"]
        assert "503" in server.stderr


def test_a_too_long_input_is_refused_or_truncated_as_asked(server: ServerProcess, client: openai.OpenAI):
    long = "the cat " * 60
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=CHAT, input=["hot", long])
    assert refused.value.code == "context_length_exceeded" and "input 1 has" in refused.value.message
    cut = client.embeddings.create(model=CHAT, input=["hot", long], extra_body={"truncate": True})
    alone = client.embeddings.create(model=CHAT, input="hot")
    assert len(cut.data) == 2 and cosine(cut.data[0].embedding, alone.data[0].embedding) >= AGREE
    assert cut.usage.prompt_tokens == alone.usage.prompt_tokens + EMBED_CTX


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"model": CHAT, "input": []}, "input"),
        ({"model": CHAT, "input": ""}, "input"),
        ({"model": CHAT, "input": ["hot", ""]}, "input"),
        ({"model": CHAT, "input": 5}, "input"),
        ({"model": CHAT, "input": [1.5]}, "input"),
        ({"model": CHAT, "input": "\ud800"}, "input"),
        ({"model": CHAT, "input": "hot", "encoding_format": "int8"}, "encoding_format"),
        ({"model": CHAT, "input": "hot", "dimensions": 100000}, "dimensions"),
        ({"model": CHAT, "input": [[5, 99999]]}, None),
        ({"input": "hot"}, "model"),
    ],
)
def test_bad_embedding_bodies_get_openai_errors_and_the_server_keeps_serving(server, client, body, where):
    status, reply = post(server, "/v1/embeddings", body)
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if where is not None:
        assert where in (error["param"] or error["message"])
    assert client.embeddings.create(model=CHAT, input="hot").data


def test_an_unknown_model_is_a_404_and_not_json_a_400(server, client):
    status, reply = post(server, "/v1/embeddings", {"model": "nope", "input": "hot"})
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    status, reply = post(server, "/v1/embeddings", b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    assert client.embeddings.create(model=CHAT, input="hot").data


# -- /v1/rerank -------------------------------------------------------------------------------------
def test_rerank_puts_the_document_sharing_the_query_first_in_the_shape_asked(server: ServerProcess):
    docs = ["hot word one", "the cat sat on the mat", "what is this", "some other word"]
    body = {"model": CHAT, "query": "the cat sat", "documents": docs}
    status, reply = post(server, "/v1/rerank", body)
    assert status == 200, reply
    assert reply["model"] == CHAT and reply["object"] == "list" and reply["usage"]["prompt_tokens"] > 0
    results = reply["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    assert results[0]["index"] == 1
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and "document" not in results[0]
    _, again = post(server, "/v1/rerank", body)
    assert again["results"] == results  # deterministic
    _, top = post(server, "/rerank", body | {"top_n": 2, "return_documents": True})
    assert [r["index"] for r in top["results"]] == [r["index"] for r in results[:2]]
    assert top["results"][0]["document"] == {"text": docs[1]}


def test_a_reranker_scores_pairs_and_makes_no_embeddings(server: ServerProcess, client: openai.OpenAI):
    docs = ["hot word one", "the cat sat on the mat", "what is this"]
    status, reply = post(server, "/v1/rerank", {"model": RANK, "query": "the cat", "documents": docs})
    assert status == 200, reply
    assert sorted(r["index"] for r in reply["results"]) == [0, 1, 2]
    assert all(np.isfinite(r["relevance_score"]) for r in reply["results"])
    # each pair is BOS query EOS document EOS: more tokens than the texts alone
    assert reply["usage"]["prompt_tokens"] > 3 * 2 + 2 * len(docs)
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=RANK, input="hot")
    assert "reranker" in refused.value.message
    assert "pooling rank (from the model's GGUF)" in server.stderr


@pytest.mark.parametrize(
    "body",
    [
        {"model": CHAT, "query": "hot", "documents": []},
        {"model": CHAT, "query": "", "documents": ["a"]},
        {"model": CHAT, "query": "hot", "documents": ["a"], "top_n": 0},
        {"model": CHAT, "query": "hot", "documents": [{"text": "a"}]},
        {"model": CHAT, "documents": ["a"]},
    ],
)
def test_bad_rerank_bodies_get_openai_errors_and_the_server_keeps_serving(server, body):
    status, reply = post(server, "/v1/rerank", body)
    assert status == 400 and reply["error"]["type"] == "invalid_request_error", reply
    status, _ = post(server, "/v1/rerank", {"model": CHAT, "query": "hot", "documents": ["hot word"]})
    assert status == 200


HOSTILE = [0, -1, 2**63, 1e308, -0.0, True, None, "", "\u0000", "\ud800", "x" * 5000, [], {}, [[]], [-5], [2**40]]


def test_seeded_hostile_bodies_never_earn_a_500_and_the_server_keeps_serving(server: ServerProcess):
    rng = random.Random(20261207)
    fields = {
        "/v1/embeddings": ["model", "input", "encoding_format", "dimensions", "truncate", "user"],
        "/v1/rerank": ["model", "query", "documents", "top_n", "return_documents", "truncate"],
    }
    plain = {
        "/v1/embeddings": {"model": CHAT, "input": ["hot word", "the cat"]},
        "/v1/rerank": {"model": CHAT, "query": "hot", "documents": ["hot word", "the cat"]},
    }
    for _ in range(80):
        path = rng.choice(list(fields))
        body = dict(plain[path])
        for name in rng.sample(fields[path], rng.randint(1, 3)):
            value = rng.choice(HOSTILE)
            body[name] = [value] * rng.choice([1, 3]) if rng.random() < 0.3 else value
        status, reply = post(server, path, body)
        assert status in (200, 400, 404), (body, reply)
        assert status == 200 or reply["error"]["type"] == "invalid_request_error"
    for path, body in plain.items():
        assert post(server, path, body)[0] == 200
    assert "Traceback" not in server.stderr


# -- a real model ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_gemma_ranks_the_relevant_document_first_and_embeds_alike_both_ways(gemma, session_home, tmp_path):
    env = fresh_env(session_home, tmp_path)
    docs = [
        "Paris is the capital and largest city of France.",
        "Bananas are a yellow fruit rich in potassium.",
        "Photosynthesis turns sunlight into chemical energy in plants.",
    ]
    questions = ["What is the capital of France?", "Which fruit is yellow?", "How do plants get energy from light?"]
    with ServerProcess([gemma], "--parallel", "1", env=env) as server:
        for expected, question in enumerate(questions):
            status, reply = post(server, "/v1/rerank", {"model": gemma.stem, "query": question, "documents": docs})
            assert status == 200 and reply["results"][0]["index"] == expected, (question, reply)
        served = server.client().embeddings.create(model=gemma.stem, input=docs[:1], encoding_format="float")
    run = embed_cli(str(gemma), stdin=docs[0] + "\n")
    assert run.returncode == 0, run.stderr.decode()
    assert cosine(json.loads(run.stdout)["embedding"], served.data[0].embedding) >= AGREE


def _decoded(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<f4")


def test_base64_is_the_little_endian_float32_of_the_float_vector(server: ServerProcess):
    _, as_b64 = post(server, "/v1/embeddings", {"model": CHAT, "input": "hot", "encoding_format": "base64"})
    _, as_float = post(server, "/v1/embeddings", {"model": CHAT, "input": "hot"})
    assert np.allclose(_decoded(as_b64["data"][0]["embedding"]), as_float["data"][0]["embedding"], atol=1e-7)


def test_embed_refuses_an_output_it_cannot_write_before_any_work(tiny, tmp_path):
    for target, said in ((tmp_path, "is a folder"), (tmp_path / "no" / "x.npy", "there is no folder")):
        run = embed_cli(str(tiny.quants["Q8_0"]), "-o", str(target), stdin="the cat\n")
        stderr = run.stderr.decode()
        assert run.returncode == 2 and said in stderr and "Traceback" not in stderr, stderr
