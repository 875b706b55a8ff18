"""A client of `localrun serve` for `run`/`chat --server URL`: the same typed events the engine
yields (Piece as text comes, one Stats at the end), from the server's SSE stream.

Ctrl-C (raised while reading, or thrown in at a yield as drive() does) closes the connection --
which is what frees the request's slot on the server within one step -- and ends the stream
with Stats(finish_reason="cancelled"), as the engine does. Plain http.client: nothing to
configure, no proxy between a client and a server on the same machine.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from localrun.errors import AccessDenied, LocalrunError, NetworkError, NoSpace, NotFound, UsageError
from localrun.inference.generation.events import Piece, Reasoning, Stats, Trimmed
from localrun.inference.generation.settings import SamplingOptions
from localrun.inference.prompting.templates import Message
from localrun.text import safe

CONNECT_TIMEOUT = 10.0
API_KEY_ENV = "LOCALRUN_API_KEY"


@dataclass
class Server:
    """Where a server is, and the key it wants (default: $LOCALRUN_API_KEY)."""

    url: str
    api_key: str | None = None

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[: -len("/v1")]
        parts = urlsplit(self.url if "://" in self.url else f"http://{self.url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"not a server URL: {safe(self.url)}", hint="e.g. http://127.0.0.1:8080")
        self._parts = parts
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        parts = self._parts
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname, parts.port, timeout=CONNECT_TIMEOUT)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise NetworkError(
                f"no server answers at {self.url}: {exc.strerror or exc}",
                hint="start one with `localrun serve MODEL`, or check --server / LOCALRUN_SERVER",
            ) from None
        assert conn.sock is not None
        conn.sock.settimeout(timeout)  # a long prompt may take minutes before the first byte
        return conn

    def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request; the open response, or the server's error as a LocalrunError."""
        conn = self._connect(timeout)
        headers = {"Accept": "application/json, text/event-stream"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request(method, self._parts.path + path, body=data, headers=headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise NetworkError(f"the server at {self.url} did not answer: {exc}") from None
        if response.status != 200:
            try:
                raise _error(self, response.status, response.read())
            finally:
                conn.close()
        return conn, response

    def get(self, path: str, timeout: float = 5.0) -> Any:
        conn, response = self.request("GET", path, timeout=timeout)
        try:
            return json.loads(response.read())
        finally:
            conn.close()


def _error(server: Server, status: int, raw: bytes) -> LocalrunError:
    code = None
    try:
        error = json.loads(raw)["error"]
        message, code = str(error["message"]), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = raw.decode("utf-8", "replace").strip()[:200] or f"HTTP {status}"
    said = f"{server.url}: {safe(message, 400)}"
    if status == 400 and code == "context_length_exceeded":
        return NoSpace(said, hint="start the server with a larger --ctx, or send less")
    if status == 401:
        return AccessDenied(said, hint=f"set {API_KEY_ENV} to the key the server was started with")
    if status == 404:
        return NotFound(said, hint=f"the server's models: curl {server.url}/v1/models")
    if status in (400, 413):
        return UsageError(said)
    if status in (429, 503):
        return NetworkError(said, hint="the server is busy or stopping: try again shortly")
    return LocalrunError(said)


def generate(
    server: Server | str,
    model: str,
    *,
    messages: list[Message] | None = None,
    prompt: str | None = None,
    sampling: SamplingOptions,
    max_tokens: int | None = None,
    stop: list[str] | None = None,
    grammar: str | None = None,
    timeout: float | None = None,
) -> Iterator[Piece | Reasoning | Trimmed | Stats]:
    """Stream a reply from a server: `messages` through its chat template, or `prompt` as raw text
    (no template); `grammar` (GBNF) constrains it. Yields Piece events (and a thinking model's
    reasoning as Reasoning), then one Stats; LocalrunError for what the server refused."""
    if (messages is None) == (prompt is None):
        raise ValueError("give messages or a prompt")
    server = Server(server) if isinstance(server, str) else server
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": sampling.temperature,
        "top_k": sampling.top_k,
        "top_p": sampling.top_p,
        "min_p": sampling.min_p,
        "repeat_penalty": sampling.repeat_penalty,
        "repeat_last_n": sampling.repeat_last_n,
        "ignore_eos": sampling.ban_eog,
        "stop": list(stop or []),
        "max_tokens": max_tokens,  # null: until the end of the text or of the context
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if grammar:
        body["grammar"] = grammar
    if messages is not None:
        body["messages"] = messages
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    started = time.perf_counter()
    conn, response = server.request("POST", path, body, timeout)
    first: float | None = None
    pieces = 0
    timings: dict[str, Any] | None = None
    reasoned = 0
    cancelled = False
    try:
        for chunk in _chunks(server, response):
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("reasoning_content"):  # a thinking model's, apart from the answer
                    yield Reasoning(str(delta["reasoning_content"]))
                text = delta.get("content") if messages is not None else choice.get("text")
                if text:
                    first = first or time.perf_counter()
                    pieces += 1
                    yield Piece(text)
            timings = chunk.get("timings") or timings
            details = (chunk.get("usage") or {}).get("completion_tokens_details") or {}
            reasoned = int(details.get("reasoning_tokens") or 0) or reasoned
    except KeyboardInterrupt:
        cancelled = True
    finally:
        conn.close()  # the server frees the slot when the connection goes
    end = time.perf_counter()
    t = timings or {}
    if t.get("dropped_messages"):
        yield Trimmed(int(t["dropped_messages"]))
    yield Stats(
        prompt_tokens=int(t.get("prompt_n", 0)),
        prompt_tps=t.get("prompt_per_second"),
        generated_tokens=int(t.get("predicted_n", pieces)),
        gen_tps=float(t.get("predicted_per_second") or _seen_speed(pieces, first, end)),
        ttft_s=first - started if first is not None else None,
        total_s=end - started,
        finish_reason="cancelled" if cancelled else t.get("finish", "eog"),
        cached_tokens=int(t.get("cached_n", 0)),
        context_full=bool(t.get("context_full", False)),
        reasoning_tokens=reasoned,
    )


def _seen_speed(pieces: int, first: float | None, end: float) -> float:
    """Cancelled, the server sends no timings: the speed the pieces came at, as seen here."""
    return (pieces - 1) / (end - first) if pieces > 1 and first is not None and end > first else 0.0


def _chunks(server: Server, response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON objects of an SSE stream, up to `data: [DONE]`; an `error` event raises, and so
    does a stream that ends without [DONE] (the server went away: not a cancel of ours)."""
    while True:
        try:
            line = response.readline()
        except (OSError, http.client.HTTPException) as exc:
            raise NetworkError(f"the server at {server.url} broke off the reply: {safe(exc)}") from None
        if not line:
            raise NetworkError(f"the server at {server.url} closed the connection in the middle of the reply")
        if not line.startswith(b"data:"):
            continue  # blank separators, comments
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise _error(server, 500, data)
        yield chunk


def health(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """A server's /health (slots busy, queued), or None when it does not answer."""
    try:
        return Server(url).get("/health", timeout)
    except (LocalrunError, ValueError):
        return None
