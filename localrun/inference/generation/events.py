"""What a generation streams: text as it becomes final, progress while a prompt is read, notices,
and one Stats at the end; and drive(), which feeds them to whatever shows or collects them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["eog", "stop", "length", "cancelled"]


@dataclass
class SampledToken:
    """A sampled token's log-probability and the most likely alternatives, from the raw logits."""

    piece: bytes
    logprob: float
    top: list[tuple[bytes, float]]

    def to_dict(self) -> dict:
        """OpenAI's shape of a token's logprobs (the server's, and `run --logprobs`'s JSON)."""
        return {
            "token": self.piece.decode("utf-8", "replace"),
            "logprob": self.logprob,
            "bytes": list(self.piece),
            "top_logprobs": [
                {"token": p.decode("utf-8", "replace"), "logprob": lp, "bytes": list(p)} for p, lp in self.top
            ],
        }


@dataclass
class Piece:
    """Text that became final; with logprobs asked for, the tokens sampled since the last Piece."""

    text: str
    kind: str = "piece"
    tokens: list[SampledToken] = field(default_factory=list)


@dataclass
class Stats:
    prompt_tokens: int  # tokens in the prompt
    prompt_tps: float | None  # prefill speed over the tokens decoded (not cached); None: not read to the end
    generated_tokens: int
    gen_tps: float
    ttft_s: float | None  # from generate() to the first piece of text; None: no text came
    total_s: float
    finish_reason: FinishReason  # end-of-generation token, a stop string, max tokens or context, Ctrl-C
    cached_tokens: int = 0  # prompt tokens not decoded: reused from the last turn, or from disk
    context_full: bool = False  # "length" because the context had no room left, not max_tokens
    from_disk: int = 0  # of cached_tokens, those loaded from the persistent prompt cache
    drafted: int = 0  # speculative decoding: tokens drafted and verified
    accepted: int = 0  # of those, the ones the model agreed with
    stop: str | None = None  # the stop string that ended the reply (finish_reason "stop")
    reasoning_tokens: int = 0  # of generated_tokens, a thinking model's reasoning (its closing marker included)
    kind: str = "stats"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Notice:
    """Something the user should know that is not an error (a damaged cache entry was ignored)."""

    text: str
    kind: str = "notice"


@dataclass
class Speculation:
    """After a verify batch: drafted and accepted tokens so far in this reply (for live displays)."""

    drafted: int
    accepted: int
    kind: str = "speculation"


@dataclass
class Reasoning:
    """Text of the model's reasoning (a thinking model's), kept apart from the answer's Pieces."""

    text: str
    kind: str = "reasoning"


@dataclass
class ToolCalled:
    """A tool call the model wrote (read by the reply parser): its id, the function's name, and its
    arguments as a JSON object's text."""

    id: str
    name: str
    arguments: str
    kind: str = "tool_call"


@dataclass
class Trimmed:
    """The server dropped this many of the oldest messages to fit its context (a remote chat
    drops them from its own history too)."""

    messages: int
    kind: str = "trimmed"


@dataclass
class PrefillProgress:
    """While a long prompt is processed (every PROGRESS_EVERY seconds), for live displays."""

    prompt_tokens: int  # being decoded
    cached_tokens: int
    elapsed_s: float
    kind: str = "progress"


PROGRESS_EVERY = 0.2

Event = Piece | PrefillProgress | Notice | Speculation | Trimmed | Reasoning | ToolCalled | Stats


class EventSink(Protocol):
    """Whatever shows or collects a generation: a live renderer, a JSON writer, a server stream."""

    def piece(self, text: str) -> None: ...
    def progress(self, event: PrefillProgress) -> None: ...
    def finish(self, stats: Stats) -> None: ...


def drive(events: Iterable[Event], sink: EventSink) -> Stats:
    """Feed events to a sink. Ctrl-C while rendering is thrown into the generator, which
    ends the reply as 'cancelled'; the Stats are returned either way."""
    it = iter(events)
    stats: Stats | None = None
    try:
        for event in it:
            if isinstance(event, Piece):
                if event.tokens and hasattr(sink, "logprobs"):  # optional: only JSON shows them
                    sink.logprobs(event.tokens)  # type: ignore[attr-defined]
                sink.piece(event.text)
            elif isinstance(event, PrefillProgress):
                sink.progress(event)
            elif isinstance(event, (Notice, Speculation, Trimmed, Reasoning, ToolCalled)):  # optional for a sink
                handler = getattr(sink, event.kind, None)
                if handler is not None:
                    handler(event)
            else:
                stats = event
    except KeyboardInterrupt:
        try:
            event = it.throw(KeyboardInterrupt)  # type: ignore[attr-defined]
            stats = event if isinstance(event, Stats) else None
        except (KeyboardInterrupt, StopIteration):
            stats = None
        if stats is None:
            stats = Stats(0, None, 0, 0.0, None, 0.0, "cancelled")
    finally:
        for ended in (getattr(it, "close", None), getattr(sink, "close", None)):  # the stream, a live display
            if ended:
                ended()
    assert stats is not None, "the engine always ends a stream with Stats"
    sink.finish(stats)
    return stats
