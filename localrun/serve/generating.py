"""One request's generation on a served model, whatever API asked for it: the slot checked out,
the request prepared and queued, its events parsed as they come, the slot given back once
(whichever way the request ends), and one log line. Each API (OpenAI's, Ollama's, Anthropic's)
maps its request onto a chat or completion request and renders what this gives in its own shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from localrun.errors import LocalrunError
from localrun.inference.generation.events import Piece, Stats
from localrun.inference.generation.sequence import Failed
from localrun.inference.prompting.replies import Delta
from localrun.serve import prepare, replies
from localrun.serve.errors import ApiError, from_localrun
from localrun.serve.host import ModelHost
from localrun.serve.loop import QueueFull, SlotLoop
from localrun.serve.protocol import ChatRequest, CompletionRequest
from localrun.serve.registry import Registry
from localrun.serve.replies import Feed, Reply


@dataclass
class Served:
    """One request, for the server's log line."""

    endpoint: str  # the method and the path: "POST /v1/chat/completions"
    model: str
    status: int
    stats: Stats | None = None
    error: str | None = None
    detail: str | None = None  # what a route that generates nothing did: "2 inputs · 14 tok"


Log = Callable[[Served], None]


class Generation:
    """A request running on a model's slots. `release()` ends it (cancelling what still runs) and
    logs it; call it once the reply is sent or the client is gone (more calls do nothing)."""

    def __init__(
        self,
        host: ModelHost,
        scheduler: SlotLoop,
        prepared: prepare.Prepared,
        feed: Feed,
        reply: Reply,
        endpoint: str,
        stream: bool,
        log: Log,
    ):
        self.host, self.scheduler, self.prepared, self.feed, self.reply = host, scheduler, prepared, feed, reply
        self.job = prepared.request
        self.endpoint, self.stream, self.log = endpoint, stream, log
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        reply = self.reply
        if reply.stats is None and reply.error is None:
            self.scheduler.cancel(self.job)
        self.host.checkin()
        # What was sent: a stream's 200 went out before its first chunk, so an error that ends
        # it comes in-band and the status stays 200. 499: the client went away.
        sent = 200 if self.stream else reply.error.status if reply.error else 200
        status = sent if reply.error or reply.stats else 499
        if reply.error is not None:
            reply.error.logged = True
        for warning in reply.warnings:
            self.host.say(f"a tool call the model wrote was given back as content: {warning}")
        self.log(Served(self.endpoint, self.host.id, status, reply.stats, reply.error and reply.error.message))

    async def collect(self, request: Request) -> Reply | None:
        """The whole reply (None: the client went away, and its slot was freed at once); an error
        the generation met is raised as the ApiError it is. Releases the request."""
        try:
            await replies.collect(self.feed, self.reply, lambda: disconnected(request), self.cancel)
        finally:
            self.release()
        return self.reply if self.reply.stats is not None else None

    async def deltas(self) -> AsyncIterator[list[Delta] | Stats]:
        """The reply as it comes: what each piece of text told once parsed (reasoning, content,
        tool calls), then the figures. An error met on the way is raised as an ApiError (the
        reply keeps it). Does not release: the caller's stream does, when it ends."""
        while True:
            event = await self.feed.queue.get()
            if isinstance(event, Piece):
                yield self.reply.take(event)
            elif isinstance(event, Failed):
                self.reply.error = event.error  # type: ignore[assignment]
                raise event.error
            elif event is not None:
                yield self.reply.end()
                self.reply.stats = event
                yield event
                return
            else:
                return

    def streamed(self, chunks: AsyncIterator[str], media_type: str) -> StreamingResponse:
        """The reply as a stream of `chunks` (an API's SSE events or NDJSON lines), released when
        it ends -- or, by the background task, when its client left before it began."""

        async def released() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                self.release()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(
            released(), media_type=media_type, headers=headers, background=BackgroundTask(self.release)
        )

    def cancel(self) -> None:
        self.scheduler.cancel(self.job)


async def start(
    registry: Registry,
    request: Request,
    req: ChatRequest | CompletionRequest,
    log: Log,
    kind: replies.Kind | None = None,
) -> Generation:
    """Check out the model's slots, prepare the request and queue it. A request the server
    cannot take raises the ApiError that says why, with the slot given back."""
    endpoint = f"{request.method} {request.url.path}"
    host = registry.find(req.model)
    scheduler = await registry.acquire(host)
    try:
        host.preparing += 1  # the scheduler, if idle, waits for it to batch its prompt with the others
        try:
            feed = Feed()
            if isinstance(req, ChatRequest):
                prepared = await run_in_threadpool(prepare.chat, host, req, feed.put)
            else:
                prepared = prepare.Prepared(await run_in_threadpool(prepare.completion, host, req, feed.put))
        finally:
            host.preparing -= 1
        scheduler.submit(prepared.request)
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
    kind = kind or ("chat" if isinstance(req, ChatRequest) else "completion")
    reply = Reply(kind, host.id, parser=prepared.parser, dropped=prepared.dropped)
    return Generation(host, scheduler, prepared, feed, reply, endpoint, req.stream, log)


async def disconnected(request: Request) -> None:
    """Return when the client has closed its connection (the body was read: what comes next on the
    request's channel is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
