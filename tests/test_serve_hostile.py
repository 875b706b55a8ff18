"""`localrun serve` against a hostile web page and a hostile client: requests for another host
(DNS rebinding) or from another origin, clients that leave, hang or trickle, bodies of the wrong
types or of text no encoder can write, and model files that change under the server. Each answer
is in OpenAI's shape, the log says one line, never a traceback, and the server serves on."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from localrun.serve.app import Access, create_app
from localrun.serve.registry import Registry
from support.serving import ServerProcess, fresh_env

MODEL = "tiny-llama-Q8_0"
FIXED = {"extra_body": {"ignore_eos": True}}  # replies of exactly max_tokens (a random tiny model)


@pytest.fixture(scope="module")
def server(tiny, session_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    env = fresh_env(session_home, root)
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "2", env=env) as proc:
        yield proc


def request(
    server: ServerProcess, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict]:
    """One request on its own connection, with exactly the headers given (Host too, if given)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", "Content-Length": str(len(data or b"")), **(headers or {})}
    conn.putrequest(method, path, skip_host="Host" in sent)
    for key, value in sent.items():
        conn.putheader(key, value)
    conn.endheaders(data)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    headers = {k.lower(): v for k, v in response.getheaders()}
    is_json = headers.get("content-type") == "application/json"
    return response.status, headers, json.loads(raw) if is_json else {"text": raw.decode()}


def hello(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def still_serving(server: ServerProcess) -> None:
    reply = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.usage.completion_tokens >= 1
    assert "Traceback" not in server.stderr


# -- who may ask: Host (DNS rebinding) and Origin ----------------------------------------------------
def test_a_host_that_does_not_name_loopback_is_refused_421(server: ServerProcess):
    """A page at attacker.example whose name was made to resolve to 127.0.0.1 sends its own name
    as Host: refused, on every route, /health too."""
    port = server.url.rsplit(":", 1)[1]
    for path, body in (("/health", None), ("/v1/models", None), ("/v1/chat/completions", hello())):
        status, _, answer = request(server, "POST" if body else "GET", path, body, {"Host": f"attacker.example:{port}"})
        assert status == 421 and answer["error"]["code"] == "host_not_allowed", answer
    assert "/v1/chat/completions - 421" in server.stderr
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", "LOCALHOST."):
        assert request(server, "GET", "/health", headers={"Host": host})[0] == 200, host
    still_serving(server)


def test_a_request_from_another_origin_is_refused_403(server: ServerProcess):
    status, headers, answer = request(
        server, "POST", "/v1/chat/completions", hello(), {"Origin": "http://attacker.example"}
    )
    assert status == 403 and answer["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in headers
    for origin in ("null", "http://attacker.example:80", "https://127.0.0.1"):
        assert request(server, "GET", "/health", headers={"Origin": origin})[0] == 403, origin
    own = server.url  # a page the server itself would serve: same origin
    status, _, answer = request(server, "POST", "/v1/chat/completions", hello(), {"Origin": own})
    assert status == 200, answer
    still_serving(server)


def test_cors_allows_the_origins_named_and_answers_their_preflights(tiny, session_home, tmp_path: Path):
    env = fresh_env(session_home, tmp_path)
    flags = ("--cors", "http://app.example", "--allowed-host", "box.lan")
    with ServerProcess([tiny.quants["Q8_0"]], *flags, env=env, api_key="sk-cors") as server:
        preflight = {
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        status, headers, _ = request(server, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 200
        assert headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in headers["access-control-allow-methods"]
        assert headers["access-control-allow-headers"] == "authorization, content-type"
        auth = {"Authorization": "Bearer sk-cors"}
        status, headers, answer = request(
            server, "POST", "/v1/chat/completions", hello(), {"Origin": "http://app.example", **auth}
        )
        assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"
        assert headers["access-control-allow-origin"] == "http://app.example"
        # an error is readable by the page too
        status, headers, _ = request(server, "GET", "/v1/models", headers={"Origin": "http://app.example"})
        assert status == 401 and headers["access-control-allow-origin"] == "http://app.example"
        # another origin: its preflight and its request are refused
        status, headers, answer = request(
            server, "OPTIONS", "/v1/chat/completions", headers={**preflight, "Origin": "http://attacker.example"}
        )
        assert status == 403 and answer["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in headers
        # --allowed-host: that name is answered, any other still refused
        assert request(server, "GET", "/health", headers={"Host": "box.lan:8080"})[0] == 200
        assert request(server, "GET", "/health", headers={"Host": "other.lan"})[0] == 421
        still_serving(server)


# -- bad input: a 400 in OpenAI's shape, one log line, the connection kept -------------------------
@pytest.mark.parametrize(
    "body,param",
    [
        (hello(messages=[{"role": "user", "content": "hi \ud800"}]), "messages.0.content"),
        (hello(model="tiny\udfff"), "model"),
        (hello(stop=["ok", "\ud83d"]), "stop.1"),
        (hello(logit_bias={"\udc00": 1}), "logit_bias"),
        (hello(metadata={"note": "\ud800"}), "metadata.note"),  # a field localrun does not read
        (hello(max_tokens="5"), "max_tokens"),
        (hello(stream="yes"), "stream"),
        (hello(temperature="0.5"), "temperature"),
        (hello(seed=1.0), "seed"),
        (hello(grammar=""), "grammar"),
        (hello(grammar=" \n"), "grammar"),
    ],
)
def test_bad_text_and_loose_types_are_400_on_a_kept_connection(server: ServerProcess, body, param):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    # ensure_ascii: a lone surrogate travels as its JSON escape, as a client's JSON writer sends it
    for expected in (400, 200):
        data = json.dumps(body if expected == 400 else hello()).encode()
        conn.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == expected, answer
        if expected == 400:
            assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    conn.close()
    still_serving(server)


def test_an_int_is_still_a_number_as_clients_send_it(server: ServerProcess):
    status, _, answer = request(server, "POST", "/v1/chat/completions", hello(temperature=1, top_p=1))
    assert status == 200, answer


def test_an_unexpected_failure_is_one_500_and_one_log_line_never_a_raise():
    """Starlette's handler for Exception re-raises after answering (uvicorn then prints a traceback
    and drops the connection); the test client raises what reaches the server the same way."""
    lines: list[str] = []
    app = create_app(
        Registry([]),
        Access(allowed_hosts=("testserver",)),
        log=lambda served: lines.append(f"{served.status} {served.error}"),
    )

    @app.get("/boom")
    def boom() -> None:
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    with TestClient(app, raise_server_exceptions=True) as client:
        response = client.get("/boom")
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert lines == [
        "500 unexpected UnicodeEncodeError: 'utf-8' codec can't encode character '\\ud800' "
        "in position 0: surrogates not allowed"
    ]


# -- clients that leave, hang or trickle --------------------------------------------------------------
def test_a_non_streaming_client_that_leaves_frees_its_slot_at_once(tiny, session_home, tmp_path: Path):
    """Tokens flow without a pause: the slot is freed by the disconnect itself, not by a pause."""
    env = fresh_env(session_home, tmp_path)
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "2", "--ctx", "32768", env=env) as server:
        impatient = server.client(timeout=1.5)

        def long_request() -> None:
            with pytest.raises(openai.APITimeoutError):
                impatient.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=30_000, **FIXED
                )

        threads = [threading.Thread(target=long_request) for _ in range(2)]
        for t in threads:
            t.start()
        server.wait_for(lambda h: h["models"][0]["busy"] == 2)
        for t in threads:
            t.join(30)
        gone = time.monotonic()
        server.wait_for(lambda h: h["models"][0]["busy"] == 0, timeout=60)
        assert time.monotonic() - gone < 3.0
        assert server.stderr.count("the client went away") == 2
        started = time.monotonic()
        still_serving(server)
        assert time.monotonic() - started < 10.0
        # and a streaming one
        stream = server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=30_000, stream=True, **FIXED
        )
        next(iter(stream))
        server.wait_for(lambda h: h["models"][0]["busy"] == 1)
        stream.close()
        gone = time.monotonic()
        server.wait_for(lambda h: h["models"][0]["busy"] == 0, timeout=60)
        assert time.monotonic() - gone < 3.0
        assert "Traceback" not in server.stderr


def raw(server: ServerProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=15)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the test's timeout: 15 s)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_and_idle_connections_are_closed(tiny, session_home, tmp_path: Path):
    env = fresh_env(session_home, tmp_path)
    flags = ("--idle-timeout", "1", "--body-timeout", "1", "--max-connections", "8")
    with ServerProcess([tiny.quants["Q8_0"]], *flags, env=env) as server:
        started = time.monotonic()
        trickle = raw(server)  # slowloris: headers that never end
        trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: 1\r\n")
        half = raw(server)  # a body declared, a tenth of it sent
        half.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model":'
        )
        idle = [raw(server) for _ in range(6)]  # open, nothing sent: the limit of 8 reached
        refused = raw(server)
        answer = read_all(refused)
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        assert read_all(trickle) == b""
        answer = read_all(half)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert all(read_all(sock) == b"" for sock in idle)
        assert time.monotonic() - started < 8.0
        for sock in (trickle, half, refused, *idle):
            sock.close()
        still_serving(server)
        # a keep-alive connection idle after its answer is closed too
        keep = raw(server)
        keep.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_all(keep).startswith(b"HTTP/1.1 200 ")
        keep.close()


# -- the model's file changes under the server ------------------------------------------------------
def test_a_model_file_deleted_after_unloading_is_a_clear_503(tiny, session_home, tmp_path: Path):
    env = fresh_env(session_home, tmp_path)
    model = tmp_path / "doomed.gguf"
    shutil.copy(tiny.quants["Q8_0"], model)
    with ServerProcess([model], "--keep-alive", "0", env=env) as server:
        server.wait_for(lambda h: not h["models"][0]["loaded"])
        model.rename(tmp_path / "moved.gguf")
        with pytest.raises(openai.InternalServerError) as err:
            server.client().chat.completions.create(
                model="doomed", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert err.value.status_code == 503 and err.value.code == "model_file_missing"
        assert "moved or deleted" in err.value.message
        assert server.stderr.count("/v1/chat/completions - 503") == 1 and "Traceback" not in server.stderr
        (tmp_path / "moved.gguf").rename(model)
        reply = server.client().chat.completions.create(
            model="doomed", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.usage.completion_tokens >= 1


def test_a_model_file_truncated_while_served_is_unloaded_not_a_sigbus(tiny, session_home, tmp_path: Path):
    env = fresh_env(session_home, tmp_path)
    model = tmp_path / "mapped.gguf"
    original = tiny.quants["Q8_0"].read_bytes()
    model.write_bytes(original)
    with ServerProcess([model], "--keep-alive", "forever", env=env) as server:
        client = server.client()
        ask = dict(model="mapped", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert client.chat.completions.create(**ask).usage.completion_tokens >= 1
        with model.open("r+b") as f:  # in place: the inode the weights are mapped from
            f.truncate(len(original) // 2)
        server.wait_for(lambda h: not h["models"][0]["loaded"], timeout=10)
        assert "changed on disk" in server.stderr
        with pytest.raises(openai.InternalServerError) as err:  # the next load says what is wrong
            client.chat.completions.create(**ask)
        assert "not within the file bounds" in err.value.message
        with model.open("r+b") as f:
            f.write(original)
        assert client.chat.completions.create(**ask).usage.completion_tokens >= 1
        assert server.proc is not None and server.proc.poll() is None
        assert "Traceback" not in server.stderr
