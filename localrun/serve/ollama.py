"""Ollama's API (docs/api.md in ollama/ollama, as its official clients speak it): `/api/chat` and
`/api/generate` mapped onto the one chat or completion request the server runs (generating.py),
answered as NDJSON lines (or one body with `stream: false`); `/api/tags`, `/api/show`, `/api/ps`,
`/api/version`; `/api/embed` (unit-length vectors, inputs cut to the context unless `truncate` is
false, `dimensions` as Ollama cuts them) and the older `/api/embeddings` (one vector as the model
pools it) on the model's embedding worker (embeddings.py); and, on a server started with --allow-model-changes, `/api/pull` (localrun's
own pull, its progress as NDJSON lines; the model is served at once) and `/api/delete`.

What the mapping does with each field Ollama defines:
- `options`: num_predict, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
  presence_penalty, frequency_penalty, seed (negative: random) and stop are honoured; num_ctx is
  taken when it is at most a slot's context (the request is served with that larger context) and
  refused beyond; what only says how Ollama loads a model (num_thread, num_gpu, num_batch, mmap,
  ...) is ignored, since the server's own options decided that; options that change the answer
  and that localrun cannot honour (mirostat, tfs_z, typical_p away from their "off" values) and
  names Ollama does not know are refused by name. `grammar` is localrun's own option (GBNF).
- `format` ("json" or a JSON schema) and `think` (true, false or an effort) as OpenAI's
  response_format and reasoning_effort; `tools` and the history's `tool_calls` with their
  arguments as objects; a message's `thinking` goes back to the template.
- `keep_alive`: how long the model stays loaded after the request (seconds or a duration such
  as 5m; negative: until the server stops; 0: unloaded once idle); a chat without messages (or
  a generate without prompt) loads the model, or with keep_alive 0 unloads it.
- refused by name: `images` (no vision here), generate's `suffix`, `context`, `template`, and
  the image generation's width, height and steps; generate's `raw` skips the chat template.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from localrun import __version__
from localrun.errors import LocalrunError
from localrun.inference.generation import grammar
from localrun.inference.generation.events import SampledToken, Stats
from localrun.inference.prompting.replies import ContentText, ReasoningText
from localrun.model.refs import parse_ref
from localrun.serve import embeddings, protocol
from localrun.serve.errors import ApiError, bad_request, from_localrun, invalid_request, unsupported
from localrun.serve.generating import Generation, Log, Served, start
from localrun.serve.host import ModelHost
from localrun.serve.ollama_protocol import (
    ChatChunk,
    ChatRequest,
    Details,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    GenerateChunk,
    GenerateRequest,
    ListedModel,
    ListResponse,
    LoadedModel,
    Logprob,
    Message,
    ModelRequest,
    Options,
    OutCall,
    OutMessage,
    ProcessResponse,
    Progress,
    PullRequest,
    ShowResponse,
    Timing,
    TopLogprob,
    Version,
    keep_alive_seconds,
)
from localrun.serve.registry import Registry
from localrun.serve.replies import finish_reason
from localrun.store.resolve import Resolved

# Options Ollama knows that say how it loads and runs a model, not what the model answers: the
# server's own options decided those (threads, GPU layers, batch), so they are ignored.
LOADING_OPTIONS = frozenset(
    {
        "numa",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "low_vram",
        "f16_kv",
        "logits_all",
        "vocab_only",
        "use_mmap",
        "use_mlock",
        "embedding_only",
        "num_thread",
        "num_keep",  # what a context shift keeps: localrun drops whole old messages instead
        "penalize_newline",  # Ollama itself no longer applies it
        "mirostat_tau",  # only read when mirostat is on, which is refused
        "mirostat_eta",
    }
)
# Options that change the answer, accepted only at the value that turns them off.
OFF_VALUES: dict[str, float] = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0}
FOREVER = timedelta(days=365 * 292)  # how far Ollama dates the expiry of a model kept loaded for good
NDJSON = "application/x-ndjson"
UPDATE_EVERY = 0.1  # seconds between a pull's progress lines while bytes arrive


def router(registry: Registry, authorize: Callable[..., None], log: Log, counted: Callable[..., object]) -> APIRouter:
    """Ollama's routes over the registry's models."""
    api = APIRouter(dependencies=[Depends(authorize)])

    @api.get("/api/version", dependencies=[Depends(counted)])
    def version() -> Version:
        return Version(version=__version__)

    @api.get("/api/tags", dependencies=[Depends(counted)])
    async def tags() -> ListResponse:
        listed = [await _listing(host) for host in registry.hosts]
        return ListResponse(models=[entry[0] for entry in listed if entry is not None])

    @api.get("/api/ps", dependencies=[Depends(counted)])
    async def ps() -> ProcessResponse:
        loaded = [(host, await _listing(host)) for host in registry.hosts if host.scheduler is not None]
        return ProcessResponse(models=[_loaded_model(host, *entry) for host, entry in loaded if entry is not None])

    @api.post("/api/show", dependencies=[Depends(counted)])
    async def show(req: ModelRequest) -> ShowResponse:
        host = registry.find(_named(req.target))
        return _shown(host, await _described(host))

    @api.post("/api/chat")
    async def chat(req: ChatRequest, request: Request):
        return await _generate(registry, request, req, log)

    @api.post("/api/generate")
    async def generate(req: GenerateRequest, request: Request):
        return await _generate(registry, request, req, log)

    @api.post("/api/embed")
    async def embed(req: EmbedRequest, request: Request) -> EmbedResponse:
        began = time.perf_counter_ns()
        host = registry.find(req.model)
        host.keep_alive = _keep_alive(req, host)
        inputs = ([req.input] if req.input else []) if isinstance(req.input, str) else req.input
        if not inputs and host.keep_alive == 0:  # nothing to embed: unload (load, below, otherwise)
            await run_in_threadpool(host.unload_if_idle, force=True)
        load_ns = await _ensure_loaded(registry, host) if inputs or host.keep_alive != 0 else 0
        found = await embeddings.embed(registry, host, inputs, req.truncate) if inputs else []
        vectors = embeddings.unit_vectors(host, found, req.dimensions)
        said = embeddings.detail(len(found), sum(e.n_tokens for e in found))
        log(Served(f"{request.method} {request.url.path}", host.id, 200, detail=said))
        return EmbedResponse(
            model=host.id,
            embeddings=[v.tolist() for v in vectors],
            total_duration=time.perf_counter_ns() - began,
            load_duration=load_ns,
            prompt_eval_count=sum(e.n_tokens for e in found),
        )

    @api.post("/api/embeddings")
    async def embeddings_legacy(req: EmbeddingsRequest, request: Request) -> EmbeddingsResponse:
        host = registry.find(req.model)
        host.keep_alive = _keep_alive(req, host)
        if not req.prompt:  # nothing to embed: load the model, or with keep_alive 0 unload it
            if host.keep_alive == 0:
                await run_in_threadpool(host.unload_if_idle, force=True)
            else:
                await _ensure_loaded(registry, host)
            return EmbeddingsResponse(embedding=[])
        (found,) = await embeddings.embed(registry, host, [req.prompt], truncate=True)
        log(Served(f"{request.method} {request.url.path}", host.id, 200, detail=embeddings.detail(1, found.n_tokens)))
        return EmbeddingsResponse(embedding=found.vector.tolist())  # as the model pools it (Ollama's too)

    @api.post("/api/pull", dependencies=[Depends(counted)])
    async def pull(req: PullRequest):
        name = _named(req.target)
        if name.lower().endswith(":latest"):  # Ollama's default tag: here, the quant that fits best
            name = name[: -len(":latest")]
        return await _pull(registry, name, req.stream, log)

    @api.delete("/api/delete", dependencies=[Depends(counted)])
    async def delete(req: ModelRequest) -> Response:
        changes = _allowed(registry, "delete models")
        host = registry.find(_named(req.target))
        try:
            await run_in_threadpool(changes.delete, host)
        except LocalrunError as exc:
            raise from_localrun(exc) from None
        registry.retire(host)
        return Response(status_code=200)

    return api


def _named(name: str) -> str:
    if not name:
        raise bad_request("model is required", param="model")
    return name


# -- chat and generate -------------------------------------------------------------------------------
async def _generate(registry: Registry, request: Request, req: ChatRequest | GenerateRequest, log: Log):
    began = time.perf_counter_ns()
    host = registry.find(req.model)
    keep = _keep_alive(req, host)
    chat = isinstance(req, ChatRequest)
    if not (req.messages if isinstance(req, ChatRequest) else req.prompt):
        return await _load_or_unload(registry, host, keep, chat)
    load_ns = await _ensure_loaded(registry, host)
    internal = _chat(req, host) if isinstance(req, ChatRequest) else _completion(req, host)
    generation = await start(registry, request, internal, log)
    host.keep_alive = keep
    logprobs = bool(req.logprobs)
    render = _Render(host.id, chat, began, load_ns, logprobs)
    if req.stream:
        return generation.streamed(render.stream(generation), NDJSON)
    reply = await generation.collect(request)
    if reply is None:  # the client went away: nobody reads what is sent
        return Response(status_code=499)
    return JSONResponse(render.whole(generation).model_dump(exclude_none=True))


def _keep_alive(req: ChatRequest | GenerateRequest | EmbedRequest | EmbeddingsRequest, host: ModelHost) -> float | None:
    """How long the model stays loaded after this request: as asked, else the server's --keep-alive."""
    if req.keep_alive is None:
        return host.opts.keep_alive
    try:
        return keep_alive_seconds(req.keep_alive)
    except ValueError as exc:
        raise bad_request(str(exc), param="keep_alive") from None


async def _ensure_loaded(registry: Registry, host: ModelHost) -> int:
    """Load the model if it is not (nanoseconds it took: Ollama's load_duration)."""
    began = time.perf_counter_ns()
    if host.scheduler is None:
        async with registry.holding(host):
            pass
    return time.perf_counter_ns() - began


async def _load_or_unload(registry: Registry, host: ModelHost, keep: float | None, chat: bool) -> JSONResponse:
    """A request with nothing to answer: Ollama's way to load a model, or with keep_alive 0 to unload it."""
    host.keep_alive = keep
    if keep == 0:
        await run_in_threadpool(host.unload_if_idle, force=True)  # in use: the sweep unloads it once idle
        reason = "unload"
    else:
        await _ensure_loaded(registry, host)
        reason = "load"
    common = {"model": host.id, "created_at": _now(), "done": True, "done_reason": reason}
    body: BaseModel = ChatChunk(message=OutMessage(), **common) if chat else GenerateChunk(**common)
    return JSONResponse(body.model_dump(exclude_none=True))


def _chat(req: ChatRequest, host: ModelHost) -> protocol.ChatRequest:
    messages = _messages(req.messages)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    return _internal(protocol.ChatRequest, req, host, messages=messages, tools=tools, **_shared(req, host))


def _completion(req: GenerateRequest, host: ModelHost) -> protocol.ChatRequest | protocol.CompletionRequest:
    for name in ("suffix", "template"):
        if getattr(req, name):
            raise unsupported(name, _WHY[name])
    if req.context:
        raise unsupported("context", _WHY["context"])
    if req.images:
        raise unsupported("images", _WHY["images"])
    for name in ("width", "height", "steps"):
        if getattr(req, name) is not None:
            raise unsupported(name, "localrun serves text models, not image generation")
    fields = _shared(req, host)
    if not req.raw:  # the prompt (and system) go through the model's chat template
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}
        ]
        return _internal(protocol.ChatRequest, req, host, messages=messages, **fields)
    if req.system:
        raise bad_request("system needs the chat template: leave raw out, or put it in the prompt", param="system")
    if req.think is not None:
        raise bad_request("think needs the chat template: leave raw out", param="think")
    if req.logprobs:
        raise unsupported("logprobs", "a raw generate has no logprobs here; use the chat template (raw: false)")
    # a raw prompt is a text completion: its format becomes the grammar the reply follows
    response_format = fields.pop("response_format")
    if response_format is not None:
        if fields.get("grammar"):
            raise bad_request("give a format or options.grammar, not both", param="format")
        fields["grammar"] = _format_grammar(req.format)
    for name in ("reasoning_effort", "tools", "logprobs", "top_logprobs"):
        fields.pop(name, None)
    return _internal(protocol.CompletionRequest, req, host, prompt=req.prompt, **fields)


_WHY = {
    "images": "localrun serves text models here; describe the image in text",
    "suffix": "fill-in-the-middle needs a model trained for it",
    "context": "the token context of an earlier reply is not kept; send the conversation to /api/chat",
    "template": "the model's own chat template (or serve --template) renders the prompt",
}


def _format_grammar(fmt: str | dict[str, Any] | None) -> str:
    try:
        made = grammar.from_json_schema(fmt) if isinstance(fmt, dict) else grammar.json_object()
    except LocalrunError as exc:
        raise bad_request(f"format: {exc.message}", param="format") from None
    return made.gbnf


def _shared(req: ChatRequest | GenerateRequest, host: ModelHost) -> dict[str, Any]:
    """The fields chat and generate map alike: options, format, think, logprobs."""
    fields = _options(req.options or Options(), host)
    if isinstance(req.format, dict):
        _format_grammar(req.format)  # a schema the grammar cannot enforce is said as `format`'s
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": req.format}}
    elif req.format == "json":
        fields["response_format"] = {"type": "json_object"}
    else:
        fields["response_format"] = None
    if req.think and host.replies is not None and host.replies.reasoning is None:
        raise unsupported(
            "think", f"{host.id} does not think (its chat template has no reasoning format localrun knows)"
        )
    if req.think is not None:  # the template's thinking switch, as reasoning_effort turns it
        fields["reasoning_effort"] = {True: "medium", False: "none"}.get(req.think, req.think)  # type: ignore[call-overload]
    if req.logprobs:
        fields["logprobs"], fields["top_logprobs"] = True, req.top_logprobs or 0
    elif req.top_logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    return fields


def _options(options: Options, host: ModelHost) -> dict[str, Any]:
    """Ollama's options as the fields of the request the server runs; refusals by name."""
    for name, value in (options.model_extra or {}).items():
        if name in LOADING_OPTIONS or value is None:  # null: left out, as some clients send what they did not set
            continue
        if name in OFF_VALUES:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == OFF_VALUES[name]:
                continue
            raise unsupported(
                f"options.{name}", f"localrun's sampling has no {name} (leave it out, or {OFF_VALUES[name]:g})"
            )
        raise bad_request(
            f"options.{name[:40]} is not an option Ollama or localrun knows", param=f"options.{name[:40]}"
        )
    if options.num_ctx is not None and options.num_ctx > host.n_ctx_slot:
        raise unsupported(
            "options.num_ctx",
            f"a slot of {host.id} holds {host.n_ctx_slot} tokens; start `localrun serve` with --ctx {options.num_ctx}",
        )
    if options.num_predict == 0:
        raise bad_request(
            "options.num_predict 0 asks for no reply (-1: until the model stops)", param="options.num_predict"
        )
    fields: dict[str, Any] = {
        "max_tokens": options.num_predict if options.num_predict and options.num_predict > 0 else None,
        "seed": options.seed if options.seed is not None and options.seed >= 0 else None,
        "stop": options.stop,
        "grammar": options.grammar,
    }
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n"):
        fields[name] = getattr(options, name)
    fields["presence_penalty"], fields["frequency_penalty"] = options.presence_penalty, options.frequency_penalty
    return fields


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    """The conversation in OpenAI's shape. Ollama's tool results name their tool, not the call:
    each is linked to the earliest call of that tool still unanswered (else the next one), for the
    templates that match results to calls by id."""
    shaped: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # the last assistant turn's calls: id, tool
    for index, message in enumerate(messages):
        turn = _message(message, index)
        if turn.get("tool_calls"):
            unanswered = [(call["id"], call["function"]["name"]) for call in turn["tool_calls"]]
        elif message.role == "tool" and unanswered:
            first = next((i for i, (_, tool) in enumerate(unanswered) if tool == message.tool_name), 0)
            turn["tool_call_id"] = unanswered.pop(first)[0]
        shaped.append(turn)
    return shaped


def _message(message: Message, index: int) -> dict[str, Any]:
    """An Ollama message as OpenAI's: tool calls with ids (their arguments stay objects), a tool
    result named by its tool, the turn's thinking as reasoning_content."""
    if message.images:
        raise unsupported(f"messages[{index}].images", _WHY["images"])
    shaped: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.thinking:
        shaped["reasoning_content"] = message.thinking
    if message.tool_calls:
        shaped["tool_calls"] = [
            {"id": f"call_{index}_{i}", "type": "function", "function": call.function.model_dump()}
            for i, call in enumerate(message.tool_calls)
        ]
    if message.tool_name:
        shaped["name"] = message.tool_name
    return shaped


def _internal(cls: type, req: ChatRequest | GenerateRequest, host: ModelHost, **fields: Any):
    """The request the server runs; a value out of its range is said with Ollama's name for it."""
    try:
        return cls.model_validate({"model": host.id, "stream": req.stream, **fields})
    except ValidationError as exc:
        raise invalid_request(exc.errors(), _ollama_name) from None


def _ollama_name(where: str) -> str:
    """A field of the server's request by the name Ollama's request gives it."""
    name = {"max_tokens": "options.num_predict", "response_format": "format"}.get(where.split(".")[0])
    return name or (f"options.{where}" if where in _OPTION_NAMES else where)


_OPTION_NAMES = frozenset(
    {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop", "grammar"}
)


class _Render:
    """A generation's deltas and figures as Ollama's chat or generate lines."""

    def __init__(self, model: str, chat: bool, began: int, load_ns: int, logprobs: bool):
        self.model, self.chat, self.began, self.load_ns, self.logprobs = model, chat, began, load_ns, logprobs
        self.sent_tokens = 0  # of the reply's tokens, those whose logprobs went out

    def chunk(
        self, content: str = "", thinking: str = "", calls: list[OutCall] | None = None, **final: Any
    ) -> ChatChunk | GenerateChunk:
        common = {"model": self.model, "created_at": _now(), "done": bool(final), **final}
        if self.chat:
            return ChatChunk(message=OutMessage(content=content, thinking=thinking or None, tool_calls=calls), **common)
        return GenerateChunk(response=content, thinking=thinking or None, **common)

    def final(self, stats: Stats) -> dict[str, Any]:
        timing = _timing(stats, time.perf_counter_ns() - self.began, self.load_ns)
        return {"done_reason": finish_reason(stats) or "stop", **timing.model_dump()}

    def tokens(self, generation: Generation) -> list[Logprob] | None:
        if not self.logprobs:
            return None
        tokens = generation.reply.tokens[self.sent_tokens :]
        self.sent_tokens += len(tokens)
        return [_logprob(t) for t in tokens] or None

    def whole(self, generation: Generation) -> ChatChunk | GenerateChunk:
        reply = generation.reply
        assert reply.stats is not None
        calls = _calls(reply.calls.values()) if self.chat else None
        last = self.chunk("".join(reply.text), "".join(reply.reasoning), calls, **self.final(reply.stats))
        last.logprobs = self.tokens(generation)
        return last

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        """A line per piece of text; the tool calls, whole, once the reply ends; then the figures.
        An error met on the way is an `{"error": ...}` line (what Ollama's clients raise)."""
        try:
            async for item in generation.deltas():
                if isinstance(item, Stats):
                    if self.chat and generation.reply.calls:
                        yield _line(self.chunk(calls=_calls(generation.reply.calls.values())))
                    last = self.chunk(**self.final(item))
                    last.logprobs = self.tokens(generation)
                    yield _line(last)
                    return
                content = "".join(d.text for d in item if isinstance(d, ContentText))
                thinking = "".join(d.text for d in item if isinstance(d, ReasoningText))
                if content or thinking:
                    piece = self.chunk(content, thinking)
                    piece.logprobs = self.tokens(generation)
                    yield _line(piece)
        except ApiError as exc:
            yield json.dumps({"error": exc.message}) + "\n"


def _calls(calls: Iterable[protocol.ToolCall]) -> list[OutCall] | None:
    """The reply's tool calls, their arguments as objects (Ollama's shape)."""
    out = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            arguments = {}
        if not isinstance(arguments, dict):
            arguments = {"value": arguments}
        out.append(OutCall.model_validate({"function": {"name": call.function.name or "", "arguments": arguments}}))
    return out or None


def _logprob(token: SampledToken) -> Logprob:
    top = [TopLogprob(token=p.decode("utf-8", "replace"), logprob=lp, bytes=list(p)) for p, lp in token.top]
    return Logprob(
        token=token.piece.decode("utf-8", "replace"), logprob=token.logprob, bytes=list(token.piece), top_logprobs=top
    )


def _timing(stats: Stats, total_ns: int, load_ns: int) -> Timing:
    """Ollama's figures from the reply's own, in nanoseconds: the prompt's tokens (all of them, as
    Ollama counts them) and the time reading those a cache did not hold, the tokens generated and
    the time generating them (the scheduler's own intervals, inside the request's total, after its
    load)."""
    read = stats.prompt_tokens - stats.cached_tokens
    prompt_ns = int(read / stats.prompt_tps * 1e9) if stats.prompt_tps else 0
    eval_ns = int(stats.generated_tokens / stats.gen_tps * 1e9) if stats.gen_tps else 0
    return Timing(
        total_duration=total_ns,
        load_duration=load_ns,
        prompt_eval_count=stats.prompt_tokens,
        prompt_eval_duration=prompt_ns,
        eval_count=stats.generated_tokens,
        eval_duration=eval_ns,
    )


def _line(chunk: BaseModel) -> str:
    return chunk.model_dump_json(exclude_none=True) + "\n"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# -- the models --------------------------------------------------------------------------------------
async def _described(host: ModelHost) -> Resolved:
    try:
        resolved = await run_in_threadpool(host.described)
        resolved.model.path.stat()
    except LocalrunError as exc:
        raise from_localrun(exc) from None
    except OSError:
        raise ApiError(404, f"the file of {host.id} is gone from the disk", code="model_file_missing") from None
    return resolved


async def _listing(host: ModelHost) -> tuple[ListedModel, Resolved] | None:
    """The model as /api/tags lists it (None: its file is gone, or unreadable)."""
    try:
        resolved = await _described(host)
        return _listed(host, resolved), resolved
    except (ApiError, OSError):
        return None


def _listed(host: ModelHost, resolved: Resolved) -> ListedModel:
    model = resolved.model
    stat = model.path.stat()
    entry = resolved.entry
    blob = entry.files[0].blob.name if entry is not None else ""
    if len(blob) != 64:  # not an LFS blob named by its sha256: a digest of the file's identity
        blob = hashlib.sha256(f"{model.path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return ListedModel(
        name=host.id,
        model=host.id,
        modified_at=datetime.fromtimestamp(stat.st_mtime).astimezone().isoformat(),
        size=sum(p.stat().st_size for p in model.files),
        digest=blob,
        details=_details(resolved),
    )


def _details(resolved: Resolved) -> Details:
    header = resolved.header
    return Details(
        family=header.architecture,
        families=[header.architecture],
        parameter_size=_parameters(header.n_params),
        quantization_level=resolved.model.quant or header.file_type or "unknown",
    )


def _parameters(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + suffix
    return str(n)


def _loaded_model(host: ModelHost, listed: ListedModel, resolved: Resolved) -> LoadedModel:
    engine = host.engine
    on_gpu = 0  # the share of the weights on the GPU: its layers' share (the output layer counts as one)
    if engine is not None and engine.info.n_gpu_layers:
        layers = resolved.header.n_layer + 1
        on_gpu = listed.size * min(engine.info.n_gpu_layers, layers) // layers
    expires = host.expires_in()
    until = timedelta(seconds=expires) if expires is not None else FOREVER
    return LoadedModel(
        **listed.model_dump(),
        expires_at=(datetime.now().astimezone() + until).isoformat(),
        size_vram=on_gpu,
        context_length=host.n_ctx_slot,
    )


def _shown(host: ModelHost, resolved: Resolved) -> ShowResponse:
    header = resolved.header
    info: dict[str, Any] = {
        key: value for key, value in header.metadata.items() if isinstance(value, (str, int, float, bool))
    }
    info.setdefault("general.architecture", header.architecture)
    info.setdefault("general.parameter_count", header.n_params)
    info.setdefault(f"{header.architecture}.context_length", header.n_ctx_train)
    template = host.template.source if host.template is not None else header.chat_template or ""
    stops = host.template.stop if host.template is not None else ()
    capabilities = ["completion"]
    replies = host.replies
    if (replies is not None and replies.tools.name != "generic") or "tools" in template:
        capabilities.append("tools")
    if replies is not None and replies.reasoning is not None:
        capabilities.append("thinking")
    stat = resolved.model.path.stat()
    return ShowResponse(
        modelfile=f"# served by localrun\nFROM {host.id}\n",
        parameters="\n".join(f"stop {json.dumps(s)}" for s in stops),
        template=template,
        details=_details(resolved),
        model_info=info,
        capabilities=capabilities,
        modified_at=datetime.fromtimestamp(stat.st_mtime).astimezone().isoformat(),
        license=header.license,
    )


# -- pull ------------------------------------------------------------------------------------------
def _allowed(registry: Registry, what: str):
    if registry.changes is None:
        raise ApiError(
            403,
            f"this server may not {what}: start `localrun serve` with --allow-model-changes to allow /api/pull "
            "and /api/delete",
            code="model_changes_not_allowed",
        )
    return registry.changes


class _PullProgress:
    """localrun's download progress as Ollama's progress lines, handed from the pull's thread to
    the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Progress | BaseException | None]):
        self.loop, self.queue = loop, queue
        self.label = ""
        self.total = 0
        self.last = 0.0

    def put(self, item: Progress | BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (the server stopped): nobody is waiting
            pass

    def message(self, text: str, *, warning: bool = False) -> None:
        self.put(Progress(status=text))

    def begin(self, label: str, total: int, done: int) -> None:
        self.label, self.total = label, total
        self.put(Progress(status=f"pulling {label}", digest=label, total=total, completed=done))

    def update(self, done: int, description: str) -> None:
        now = time.monotonic()
        if now - self.last < UPDATE_EVERY and done < self.total:
            return
        self.last = now
        status = description if description.startswith("verifying") else f"pulling {self.label}"
        self.put(Progress(status=status, digest=self.label, total=self.total, completed=done))

    def end(self) -> None:
        pass


async def _pull(registry: Registry, name: str, stream: bool, log: Log):
    changes = _allowed(registry, "pull models")
    try:  # a name that is no Hub repo is refused before any line of progress
        ref = parse_ref(name, expand=False)
    except LocalrunError as exc:
        raise bad_request(exc.message, param="model") from None
    if ref.is_local:
        raise bad_request(f"{name[:200]!r} is a path: a pull takes a Hub repo (org/repo[:QUANT])", param="model")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Progress | BaseException | None] = asyncio.Queue()
    progress = _PullProgress(loop, queue)

    def work() -> None:
        try:
            progress.put(Progress(status="pulling manifest"))
            host = changes.pull(name, progress)
            registry.add(host)
            progress.put(None)
        except BaseException as exc:  # said to the client, in its shape
            progress.put(exc)

    # a thread of its own, not the loop's executor: a server stopped mid-pull exits without waiting
    # for it (the download resumes at the next pull)
    threading.Thread(target=work, name="localrun-pull", daemon=True).start()

    async def events() -> AsyncIterator[Progress]:
        while True:
            item = await queue.get()
            if item is None:
                log(Served("POST /api/pull", name, 200, detail="pulled"))
                yield Progress(status="success")
                return
            if isinstance(item, BaseException):
                raise _as_error(item)
            yield item

    if not stream:
        async for _ in events():
            pass
        return JSONResponse(Progress(status="success").model_dump(exclude_none=True))

    async def lines() -> AsyncIterator[str]:
        try:
            async for item in events():
                yield _line(item)
        except ApiError as exc:  # the 200 and the first lines are sent: the error comes in-band
            log(Served("POST /api/pull", name, 200, error=exc.message))
            yield json.dumps({"error": exc.message}) + "\n"

    return StreamingResponse(lines(), media_type=NDJSON)


def _as_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, LocalrunError):
        return from_localrun(exc)
    return ApiError(500, f"the pull failed: {exc}", type="server_error")
