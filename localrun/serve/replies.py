"""A job's events as OpenAI replies: one JSON body, or SSE chunks (`data: {...}` lines ending with
`data: [DONE]`), for chat and for text completions."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from localrun.inference.generation.events import Piece, SampledToken, Stats
from localrun.inference.generation.sequence import Failed, Update
from localrun.inference.prompting.replies import (
    ContentText,
    Delta,
    ReasoningText,
    ToolCallArguments,
    ToolCallStart,
)
from localrun.inference.prompting.reply_parser import ReplyParser
from localrun.serve.errors import ApiError, as_api_error
from localrun.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionTokensDetails,
    FinishReason,
    FunctionCall,
    LegacyLogprobs,
    PromptTokensDetails,
    Timings,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from localrun.serve.protocol import Delta as ChatDelta

Kind = Literal["chat", "completion"]


class _Mailbox:
    """Hands events from the scheduler thread to one event loop, waking it once for all the events
    of a step rather than once per event (each wake is a write to the loop's self-pipe and a pass of
    the loop, on the cores the decode needs)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Update], Update]] = []

    def post(self, queue: asyncio.Queue[Update], event: Update) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a wake is already on its way
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


class Feed:
    """Events from the scheduler thread into the request's event loop."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._mailbox = _mailboxes.get(loop) or _mailboxes.setdefault(loop, _Mailbox(loop))
        self.queue: asyncio.Queue[Update | None] = asyncio.Queue()  # None: the client went away

    def put(self, event: Update) -> None:  # called from the scheduler thread
        if isinstance(event, Failed):
            event = Failed(as_api_error(event.error))
        elif not isinstance(event, (Piece, Stats)):
            return  # notices and speculation's figures are for live displays
        self._mailbox.post(self.queue, event)


@dataclass
class Reply:
    """What a request got: its text, the tokens' logprobs, and how it ended."""

    kind: Kind
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    tokens: list[SampledToken] = field(default_factory=list)
    stats: Stats | None = None
    error: ApiError | None = None
    parser: ReplyParser | None = None  # takes the text apart: reasoning, content, tool calls
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, ToolCall] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # malformed calls, given back as content
    dropped: int = 0  # the oldest messages left out to fit a slot's context

    @property
    def reply_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id

    def take(self, piece: Piece) -> list[Delta]:
        """What a piece of the model's text tells, once parsed (all content without a parser)."""
        self.tokens.extend(piece.tokens)
        if self.parser is None:
            return self._record([ContentText(piece.text)] if piece.text else [])
        return self._record(self.parser.feed(piece.text))

    def end(self) -> list[Delta]:
        """What the parser still held when the reply ended."""
        return self._record(self.parser.finish()) if self.parser is not None else []

    def _record(self, deltas: list[Delta]) -> list[Delta]:
        for delta in deltas:
            if isinstance(delta, ContentText):
                self.text.append(delta.text)
            elif isinstance(delta, ReasoningText):
                self.reasoning.append(delta.text)
            elif isinstance(delta, ToolCallStart):
                self.calls[delta.index] = ToolCall(id=delta.id, function=FunctionCall(name=delta.name, arguments=""))
            elif isinstance(delta, ToolCallArguments):
                function = self.calls[delta.index].function
                function.arguments = (function.arguments or "") + delta.fragment
            else:
                self.warnings.append(delta.reason)
        return deltas

    def message(self) -> AssistantMessage:
        calls = [self.calls[i] for i in sorted(self.calls)] or None
        text = "".join(self.text)
        return AssistantMessage(
            content=text if text or not calls else None,
            reasoning_content="".join(self.reasoning) or None,
            tool_calls=calls,
        )

    def finish_reason(self, stats: Stats) -> FinishReason | None:
        if self.calls and stats.finish_reason in ("eog", "stop"):
            return "tool_calls"
        return finish_reason(stats)


def finish_reason(stats: Stats) -> FinishReason | None:
    return {"eog": "stop", "stop": "stop", "length": "length"}.get(stats.finish_reason)  # type: ignore[return-value]


def _delta(delta: Delta) -> ChatDelta | None:
    """A parsed piece as a chunk's delta (None: nothing a client is sent, a malformed call's note)."""
    if isinstance(delta, ContentText):
        return ChatDelta(content=delta.text)
    if isinstance(delta, ReasoningText):
        return ChatDelta(reasoning_content=delta.text)
    if isinstance(delta, ToolCallStart):
        start = ToolCallDelta(
            index=delta.index, id=delta.id, type="function", function=FunctionCall(name=delta.name, arguments="")
        )
        return ChatDelta(tool_calls=[start])
    if isinstance(delta, ToolCallArguments):
        return ChatDelta(tool_calls=[ToolCallDelta(index=delta.index, function=FunctionCall(arguments=delta.fragment))])
    return None


def usage(stats: Stats, chat: bool = False) -> Usage:
    """The reply's token counts; a chat's say how many of its tokens were reasoning (counted in the
    core as they were generated)."""
    return Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.generated_tokens,
        total_tokens=stats.prompt_tokens + stats.generated_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=stats.reasoning_tokens) if chat else None,
    )


def timings(stats: Stats, dropped: int = 0) -> Timings:
    read = stats.prompt_tokens - stats.cached_tokens
    return Timings(
        prompt_n=stats.prompt_tokens,
        cached_n=stats.cached_tokens,
        prompt_ms=read / stats.prompt_tps * 1000 if stats.prompt_tps else None,
        prompt_per_second=stats.prompt_tps,
        predicted_n=stats.generated_tokens,
        predicted_ms=stats.generated_tokens / stats.gen_tps * 1000 if stats.gen_tps else 0.0,
        predicted_per_second=stats.gen_tps,
        ttft_ms=stats.ttft_s * 1000 if stats.ttft_s is not None else None,
        finish=stats.finish_reason,
        context_full=stats.context_full,
        cached_from_disk=stats.from_disk,
        draft_n=stats.drafted,
        draft_n_accepted=stats.accepted,
        dropped_messages=dropped,
    )


def _token(t: SampledToken) -> TokenLogprob:
    return TokenLogprob.model_validate(t.to_dict())


def _legacy(tokens: list[SampledToken], offset: int = 0) -> LegacyLogprobs:
    out = LegacyLogprobs()
    for t in tokens:
        text = t.piece.decode("utf-8", "replace")
        out.tokens.append(text)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({p.decode("utf-8", "replace"): lp for p, lp in t.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out


async def collect(feed: Feed, reply: Reply, gone: Callable[[], Awaitable[None]], on_gone: Callable[[], None]) -> Reply:
    """Wait for the whole reply. `gone()` returns when the client goes away: then `on_gone` frees
    its slot at once, while tokens flow as well as between them, and the reply has no stats."""

    async def watch() -> None:
        await gone()
        on_gone()
        feed.queue.put_nowait(None)

    watcher = asyncio.create_task(watch())
    try:
        while True:
            event = await feed.queue.get()
            if event is None:
                return reply
            if isinstance(event, Piece):
                reply.take(event)
            elif isinstance(event, Failed):
                reply.error = event.error  # type: ignore[assignment]
                raise event.error
            else:
                reply.end()
                reply.stats = event
                return reply
    finally:
        watcher.cancel()


def body(reply: Reply, logprobs: bool) -> ChatCompletion | Completion:
    stats = reply.stats
    assert stats is not None
    text = "".join(reply.text)
    if reply.kind == "chat":
        choice = ChatChoice(
            message=reply.message(),
            finish_reason=reply.finish_reason(stats),
            logprobs=ChoiceLogprobs(content=[_token(t) for t in reply.tokens]) if logprobs else None,
        )
        return ChatCompletion(
            id=reply.reply_id,
            created=reply.created,
            model=reply.model,
            choices=[choice],
            usage=usage(stats, chat=True),
            timings=timings(stats, reply.dropped),
        )
    legacy = _legacy(reply.tokens) if logprobs else None
    return Completion(
        id=reply.reply_id,
        created=reply.created,
        model=reply.model,
        choices=[CompletionChoice(text=text, finish_reason=finish_reason(stats), logprobs=legacy)],
        usage=usage(stats),
        timings=timings(stats, reply.dropped),
    )


def _sse(model: ChatCompletionChunk | Completion | object) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"  # type: ignore[attr-defined]


async def stream(feed: Feed, reply: Reply, logprobs: bool, include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks as the text comes; an error after the stream began is an `error` event (what
    OpenAI sends, and what its client raises), then [DONE]."""
    chat = reply.kind == "chat"

    def chunk(
        delta: ChatDelta | None, text: str, tokens: list[SampledToken], finish: FinishReason | None = None, **extra
    ):
        if chat:
            lp = ChoiceLogprobs(content=[_token(t) for t in tokens]) if logprobs and tokens else None
            choice = ChunkChoice(delta=delta or ChatDelta(), finish_reason=finish, logprobs=lp)
            return ChatCompletionChunk(
                id=reply.reply_id, created=reply.created, model=reply.model, choices=[choice], **extra
            )
        lp_legacy = _legacy(tokens, offset) if logprobs and tokens else None
        choice = CompletionChoice(text=text, finish_reason=finish, logprobs=lp_legacy)
        return Completion(id=reply.reply_id, created=reply.created, model=reply.model, choices=[choice], **extra)

    def told(deltas: list[Delta]) -> Iterator[str]:
        """Chunks for what the parser told; the tokens held so far go with the first."""
        nonlocal held
        for parsed in deltas:
            delta = _delta(parsed)
            if delta is not None:
                yield _sse(chunk(delta, "", held))
                held = []

    offset = 0
    held: list[SampledToken] = []  # tokens whose text is not told yet (a parser holds it back)
    if chat:  # OpenAI's first chunk names the role
        first = ChunkChoice(delta=ChatDelta(role="assistant", content=""))
        yield _sse(ChatCompletionChunk(id=reply.reply_id, created=reply.created, model=reply.model, choices=[first]))
    while True:
        event = await feed.queue.get()
        if isinstance(event, Piece):
            held.extend(event.tokens)
            deltas = reply.take(event)
            if chat:
                for line in told(deltas):
                    yield line
            else:
                yield _sse(chunk(None, event.text, held))
                held = []
                offset += len(event.text)
        elif isinstance(event, Failed):
            reply.error = event.error
            yield f"data: {event.error.body().model_dump_json()}\n\n"  # type: ignore[attr-defined]
            break
        else:
            for line in told(reply.end()):
                yield line
            reply.stats = event
            final = chunk(None, "", held, reply.finish_reason(event), timings=timings(event, reply.dropped))
            yield _sse(final)
            if include_usage:
                cls = ChatCompletionChunk if chat else Completion
                yield _sse(
                    cls(
                        id=reply.reply_id,
                        created=reply.created,
                        model=reply.model,
                        choices=[],
                        usage=usage(event, chat),
                    )
                )
            break
    yield "data: [DONE]\n\n"
