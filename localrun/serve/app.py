"""The HTTP app (FastAPI on uvicorn): the APIs the server speaks over the served models'
schedulers, behind the checks of middleware.py. OpenAI's routes, llama-server's /tokenize and
/detokenize, and /metrics for Prometheus (metrics.py) are here; each other API's routes are in its
own module, as a router over the same generations (generating.py). Embeddings and reranking run
on each model's embedding worker (embeddings.py).

Every error comes in the shape of the API its path belongs to (errors.py), with its status: 400
for a body that is not JSON or has the wrong types, 401 for a missing or wrong key (compared in
constant time), 403 for a web page's origin not allowed, 404 for an unknown model or endpoint, 408
for a body sent too slowly, 413 for a body over the limit, 421 for a Host that does not name this
server, 503 with Retry-After when every slot is busy and the queue is full. No endpoint reads or
writes a file a request names: a model is one of those the server was started with, found by name.
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
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from localrun.serve import anthropic, embeddings, ollama, replies, tokens
from localrun.serve.errors import ApiError, invalid_request
from localrun.serve.generating import Log, Served, start
from localrun.serve.metrics import Metrics
from localrun.serve.middleware import BodyLimit, Gate, JsonBodies, LastResort
from localrun.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    Detokenized,
    DetokenizeRequest,
    EmbeddingList,
    EmbeddingRequest,
    Health,
    ModelCard,
    ModelList,
    RerankRequest,
    Tokenized,
    TokenizeRequest,
)
from localrun.serve.registry import Registry

SWEEP_EVERY = 1.0  # seconds between checks for models idle beyond --keep-alive


@dataclass
class Access:
    """Who may ask, and how much: the key, the names the server answers for, the web pages allowed."""

    api_key: str | None = None
    max_body: int = 16 << 20
    body_timeout: float = 60.0  # seconds for a request's body to arrive once its headers have
    loopback: bool = True  # listening on loopback only: Host must name loopback
    allowed_hosts: tuple[str, ...] = ()  # --allowed-host: more names to answer for ("*": any)
    cors: tuple[str, ...] = ()  # --cors: web page origins allowed ("*": any)


def create_app(registry: Registry, access: Access, log: Callable[[Served], None] = lambda s: None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep(registry))
        try:
            yield
        finally:
            sweeper.cancel()

    def report(endpoint: str, error: ApiError) -> None:
        if not error.logged:  # a failed generation was logged with its figures
            log(Served(endpoint, "-", error.status, error=error.message))

    app = FastAPI(title="localrun", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = Metrics(lambda: registry.hosts, app.routes)
    log = metrics.counting(log)  # every request logged (each generation, every error) is counted
    # added innermost first: Gate, then CORS (preflights), then the body's limits, then the app
    app.add_middleware(JsonBodies)
    app.add_middleware(LastResort, report=report)
    app.add_middleware(BodyLimit, limit=access.max_body, timeout=access.body_timeout, report=report)
    if access.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(access.cors), allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(
        Gate, loopback=access.loopback, allowed_hosts=access.allowed_hosts, cors=access.cors, report=report
    )
    _error_handlers(app, report)
    api_key = access.api_key
    key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    def authorize(request: Request) -> None:
        if key_digest is None:
            return
        # the key as OpenAI's clients send it (Authorization: Bearer), or as Anthropic's (x-api-key)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key")
        # digests of equal length: the comparison takes the same time whatever the key sent
        given = hashlib.sha256((sent or "").encode()).digest()
        if not (hmac.compare_digest(given, key_digest) and sent is not None):
            raise ApiError(
                401,
                "missing or incorrect API key (send Authorization: Bearer KEY, or x-api-key: KEY)",
                code="invalid_api_key",
            )

    async def answered(request: Request) -> AsyncIterator[None]:
        """Counts a request of a route that does not log them, once it has answered (its errors are logged)."""
        yield
        metrics.request(f"{request.method} {request.url.path}", 200)

    # the routes themselves, not a router wrapped around them: /metrics names each by its template
    app.router.routes.extend(ollama.router(registry, authorize, log, answered).routes)

    @app.get("/health", dependencies=[Depends(answered)])
    def health() -> Health:
        return registry.health()

    @app.get("/v1/models", dependencies=[Depends(authorize), Depends(answered)])
    def models() -> ModelList:
        return registry.cards()

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize), Depends(answered)])
    def model(name: str) -> ModelCard:
        return registry.card(name)

    # Prometheus' scrapers send a bearer token, so /metrics asks for the key as llama-server's does
    @app.get("/metrics", dependencies=[Depends(authorize), Depends(answered)])
    def metrics_text() -> Response:
        body, media_type = metrics.exposition()
        return Response(body, media_type=media_type)

    @app.post("/tokenize", dependencies=[Depends(authorize), Depends(answered)])
    async def tokenize(req: TokenizeRequest) -> Tokenized:
        async with tokens.vocabulary(registry, req.model) as vocabulary:
            return await run_in_threadpool(tokens.tokenize, vocabulary, req)

    @app.post("/detokenize", dependencies=[Depends(authorize), Depends(answered)])
    async def detokenize(req: DetokenizeRequest) -> Detokenized:
        async with tokens.vocabulary(registry, req.model) as vocabulary:
            return await run_in_threadpool(tokens.detokenize, vocabulary, req)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(req: ChatRequest, request: Request):
        return await _openai(registry, request, req, "chat", log)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(req: CompletionRequest, request: Request):
        return await _openai(registry, request, req, "completion", log)

    @app.post("/v1/embeddings", dependencies=[Depends(authorize)])
    async def embed(req: EmbeddingRequest, request: Request) -> EmbeddingList:
        reply = await embeddings.openai_embeddings(registry, req)
        said = embeddings.detail(len(reply.data), reply.usage.prompt_tokens)
        log(Served(f"{request.method} {request.url.path}", reply.model, 200, detail=said))
        return reply

    @app.post("/v1/rerank", dependencies=[Depends(authorize)])
    @app.post("/rerank", dependencies=[Depends(authorize)])
    async def rerank(req: RerankRequest, request: Request) -> JSONResponse:
        reply = await embeddings.rerank(registry, req)
        said = embeddings.detail(len(req.documents), reply.usage.prompt_tokens, "document")
        log(Served(f"{request.method} {request.url.path}", reply.model, 200, detail=said))
        return JSONResponse(reply.model_dump(exclude_none=True))

    app.router.routes.extend(anthropic.router(registry, authorize, log, answered).routes)
    return app


async def _openai(
    registry: Registry, request: Request, req: ChatRequest | CompletionRequest, kind: replies.Kind, log: Log
):
    """A chat or text completion, answered in OpenAI's shape: one body, or SSE chunks."""
    generation = await start(registry, request, req, log, kind)
    reply = generation.reply
    logprobs = generation.job.top_logprobs is not None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = replies.stream(generation.feed, reply, logprobs, include_usage)
        return generation.streamed(chunks, "text/event-stream")
    if await generation.collect(request) is None:  # the client went away: nobody reads what is sent
        return Response(status_code=499)
    return replies.body(reply, logprobs)


async def _sweep(registry: Registry) -> None:
    while True:
        await asyncio.sleep(SWEEP_EVERY)
        await run_in_threadpool(registry.sweep)


def _error_handlers(app: FastAPI, report: Callable[[str, ApiError], None]) -> None:
    def said(request: Request, error: ApiError) -> JSONResponse:
        report(f"{request.method} {request.url.path}", error)
        return error.response(request.url.path)

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
        return said(request, invalid_request(problems))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"no such endpoint: {request.method} {request.url.path}" if exc.status_code == 404 else exc.detail
        return said(request, ApiError(exc.status_code, str(message), code=code))
