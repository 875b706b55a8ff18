"""The HTTP app (FastAPI on uvicorn): OpenAI's endpoints over the served models' schedulers.

Every error is OpenAI's error JSON with its status: 400 for a body that is not JSON or has the
wrong types, 401 for a missing or wrong key (compared in constant time), 404 for an unknown model
or endpoint, 413 for a body over the limit, 503 with Retry-After when every slot is busy and the
queue is full. No endpoint reads or writes a file a request names: a model is one of those the
server was started with, found by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localrun.errors import LocalrunError
from localrun.inference.engine import Stats
from localrun.serve import prepare, replies
from localrun.serve.errors import ApiError, from_localrun
from localrun.serve.protocol import ChatRequest, CompletionRequest, Health, ModelCard, ModelList
from localrun.serve.registry import Registry
from localrun.serve.replies import Feed, Reply
from localrun.serve.scheduler import QueueFull

SWEEP_EVERY = 1.0  # seconds between checks for models idle beyond --keep-alive


@dataclass
class Served:
    """One request, for the server's log line."""

    endpoint: str  # the method and the path: "POST /v1/chat/completions"
    model: str
    status: int
    stats: Stats | None = None
    error: str | None = None


def create_app(
    registry: Registry, *, api_key: str | None, max_body: int, log: Callable[[Served], None] = lambda s: None
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep(registry))
        try:
            yield
        finally:
            sweeper.cancel()

    app = FastAPI(title="localrun", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body)
    _error_handlers(app, log)
    key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    def authorize(request: Request) -> None:
        if key_digest is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # digests of equal length: the comparison takes the same time whatever the key sent
        given = hashlib.sha256(token.strip().encode()).digest()
        if not (hmac.compare_digest(given, key_digest) and scheme.lower() == "bearer"):
            raise ApiError(401, "missing or incorrect API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    def health() -> Health:
        return registry.health()

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def models() -> ModelList:
        return registry.cards()

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    def model(name: str) -> ModelCard:
        return registry.card(name)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(req: ChatRequest, request: Request):
        return await _generate(registry, request, req, "chat", log)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest, request: Request):
        return await _generate(registry, request, req, "completion", log)

    return app


async def _generate(
    registry: Registry,
    request: Request,
    req: ChatRequest | CompletionRequest,
    kind: replies.Kind,
    log: Callable[[Served], None],
):
    endpoint = f"{request.method} {request.url.path}"
    host = registry.find(req.model)
    try:
        scheduler = host.checkout_now() or await run_in_threadpool(registry.checkout, host)
    except LocalrunError as exc:
        raise from_localrun(exc) from None
    try:
        host.preparing += 1  # the scheduler, if idle, waits for it to batch its prompt with the others
        try:
            feed = Feed()
            if isinstance(req, ChatRequest):
                job = await run_in_threadpool(prepare.chat, host, req, feed.put)
            else:
                job = await run_in_threadpool(prepare.completion, host, req, feed.put)
        finally:
            host.preparing -= 1
        scheduler.submit(job)
    except LocalrunError as exc:
        host.checkin()
        raise from_localrun(exc) from None
    except QueueFull:
        host.checkin()
        raise ApiError(
            503,
            f"all {scheduler.n_slots} slots of {host.id} are busy and {scheduler.queue_limit} requests are waiting",
            type="server_error",
            code="queue_full",
            retry_after=1,
        ) from None
    except BaseException:
        host.checkin()
        raise
    reply = Reply(kind, host.id)
    logprobs = job.top_logprobs is not None
    released = False

    def release() -> None:  # once, whichever way the request ends
        nonlocal released
        if not released:
            released = True
            if reply.stats is None and reply.error is None:
                scheduler.cancel(job)
            host.checkin()
            # What was sent: a stream's 200 went out before its first chunk, so an error that ends
            # it comes in-band and the status stays 200. 499: the client went away.
            sent = 200 if req.stream else reply.error.status if reply.error else 200
            status = sent if reply.error or reply.stats else 499
            if reply.error is not None:
                reply.error.logged = True
            log(Served(endpoint, host.id, status, reply.stats, reply.error and reply.error.message))

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in replies.stream(feed, reply, logprobs, include_usage):
                    yield chunk
            finally:
                release()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        # the background task also releases a stream whose client left before it began
        return StreamingResponse(
            events(), media_type="text/event-stream", headers=headers, background=BackgroundTask(release)
        )
    try:
        await replies.collect(feed, reply, request.is_disconnected, lambda: scheduler.cancel(job))
    finally:
        release()
    return replies.body(reply, logprobs)


async def _sweep(registry: Registry) -> None:
    while True:
        await asyncio.sleep(SWEEP_EVERY)
        await run_in_threadpool(registry.sweep)


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body().model_dump(), status_code=exc.status, headers=exc.headers())


def _error_handlers(app: FastAPI, log: Callable[[Served], None]) -> None:
    def said(request: Request, error: ApiError) -> JSONResponse:
        if not error.logged:  # a failed generation was logged with its figures
            log(Served(f"{request.method} {request.url.path}", "-", error.status, error=error.message))
        return _error(error)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return said(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return said(request, ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}"))
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if first.get("loc") == ("body",) and not (kind == "application/json" or kind.endswith("+json")):
            # the body was not read as JSON at all (curl -d sends a form): say what to send
            message = f"the body must be JSON, sent with Content-Type: application/json (not {kind or 'none'})"
            return said(request, ApiError(400, message))
        where = [".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in problems]
        text = "; ".join(f"{w or 'body'}: {e.get('msg')}" for w, e in list(zip(where, problems))[:5])
        return said(request, ApiError(400, f"invalid request: {text}", param=where[0] if where else None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"no such endpoint: {request.method} {request.url.path}" if exc.status_code == 404 else exc.detail
        return said(request, ApiError(exc.status_code, str(message), code=code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return said(request, ApiError(500, f"unexpected {type(exc).__name__}: {exc}", type="server_error"))


class BodyLimit:
    """413 for a request body over `limit` bytes, declared or streamed (chunked): the whole body is
    read here, up to the limit, before the app sees it."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(scope, receive, send)
            return
        parts: list[bytes] = []
        size, more = 0, True
        held: list[Message] = []
        while more:
            message = await receive()
            if message["type"] != "http.request":
                held.append(message)  # a disconnect: handed on after the body
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            parts.append(chunk)
            more = message.get("more_body", False)
        held.insert(0, {"type": "http.request", "body": b"".join(parts), "more_body": False})

        async def replay() -> Message:
            return held.pop(0) if held else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        await _error(error)(scope, receive, send)
