"""A reply as Anthropic's Messages API gives it: one message body, or SSE events (`event: NAME`
then `data: {...}`): message_start, a ping, then for each content block content_block_start, its
deltas and content_block_stop, then message_delta (the stop reason and usage) and message_stop.

Content blocks come in the order the model wrote them: its reasoning as a thinking block (with a
signature: a digest of its text), its answer as a text block, each tool call as a tool_use block
whose input is a JSON object. Text that is only whitespace (what a model leaves between its
reasoning and its calls) opens no block of its own; a reply with no text and no call still has
one text block, so that `content[0].text` is there for clients that read only that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from localrun.inference.generation.events import Stats
from localrun.inference.prompting.replies import (
    ContentText,
    Delta,
    ReasoningText,
    ToolCallArguments,
    ToolCallStart,
)
from localrun.serve.anthropic_protocol import (
    ContentOut,
    MessageOut,
    StopReason,
    TextOut,
    ThinkingOut,
    ToolUseOut,
    UsageOut,
)
from localrun.serve.errors import ApiError
from localrun.serve.generating import Generation
from localrun.serve.replies import Reply


def message_id(reply: Reply) -> str:
    return "msg_" + reply.id


def signature(thinking: str) -> str:
    """What stands for a thinking block's signature: the digest of its text (nothing is encrypted)."""
    return hashlib.sha256(thinking.encode()).hexdigest()


def tool_input(arguments: str | None) -> dict[str, Any]:
    """A call's arguments (JSON text the reply parser checked) as the object tool_use carries."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def stop_reason(reply: Reply, stats: Stats, stops: list[str]) -> tuple[StopReason, str | None]:
    """Why the reply ended, and the client's stop sequence that ended it (the template's own stop
    strings end a turn)."""
    if reply.calls and stats.finish_reason in ("eog", "stop"):
        return "tool_use", None
    if stats.finish_reason == "length":
        return "max_tokens", None
    if stats.finish_reason == "stop" and stats.stop is not None and stats.stop in stops:
        return "stop_sequence", stats.stop
    return "end_turn", None


def usage(stats: Stats) -> UsageOut:
    """Anthropic counts the prompt's tokens read apart from those found in the cache."""
    return UsageOut(
        input_tokens=stats.prompt_tokens - stats.cached_tokens,
        output_tokens=stats.generated_tokens,
        cache_read_input_tokens=stats.cached_tokens,
    )


def message(reply: Reply, stops: list[str], omit_thinking: bool = False) -> MessageOut:
    """The whole reply as one message."""
    stats = reply.stats
    assert stats is not None
    content: list[ContentOut] = []
    reasoning = "".join(reply.reasoning)
    if reasoning:
        content.append(ThinkingOut(thinking="" if omit_thinking else reasoning, signature=signature(reasoning)))
    text = "".join(reply.text)
    if text.strip() or not reply.calls:
        content.append(TextOut(text=text))
    for index in sorted(reply.calls):
        call = reply.calls[index]
        content.append(ToolUseOut(id=call.id, name=call.function.name or "", input=tool_input(call.function.arguments)))
    reason, sequence = stop_reason(reply, stats, stops)
    return MessageOut(
        id=message_id(reply),
        model=reply.model,
        content=content,
        stop_reason=reason,
        stop_sequence=sequence,
        usage=usage(stats),
    )


def event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class Blocks:
    """The content blocks of a streamed reply, as the parsed deltas come: a delta continues the
    open block when it is of its kind, else closes it and opens its own."""

    def __init__(self, omit_thinking: bool):
        self.omit_thinking = omit_thinking
        self.index = -1  # the open block's, or the last one's
        self.open: str | None = None  # the open block's type
        self.thinking: list[str] = []  # the open thinking block's text, for its signature
        self.space = ""  # whitespace held until text opens a block (dropped if a block of another kind does)
        self.texts = 0
        self.calls: dict[int, int] = {}  # a call's index in the reply -> its block's

    def take(self, delta: Delta) -> list[str]:
        if isinstance(delta, ReasoningText):
            out = self._start({"type": "thinking", "thinking": "", "signature": ""}) if self.open != "thinking" else []
            self.thinking.append(delta.text)
            if not self.omit_thinking:
                out.append(self._delta({"type": "thinking_delta", "thinking": delta.text}))
            return out
        if isinstance(delta, ContentText):
            if self.open == "text":
                return [self._delta({"type": "text_delta", "text": delta.text})]
            if not delta.text.strip():
                self.space += delta.text
                return []
            text, self.space = self.space + delta.text, ""
            return [*self._start({"type": "text", "text": ""}), self._delta({"type": "text_delta", "text": text})]
        if isinstance(delta, ToolCallStart):
            out = self._start({"type": "tool_use", "id": delta.id, "name": delta.name, "input": {}})
            self.calls[delta.index] = self.index
            return out
        if isinstance(delta, ToolCallArguments) and delta.fragment:
            data = {"type": "input_json_delta", "partial_json": delta.fragment}
            return [
                event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": self.calls[delta.index]} | {"delta": data},
                )
            ]
        return []  # a malformed call's note: its text came as content

    def finish(self) -> list[str]:
        """Close the open block; a reply with no text and no call gets its (empty) text block."""
        out = self._close()
        if not self.texts and not self.calls:
            out += [*self._start({"type": "text", "text": ""})]
            if self.space:
                out.append(self._delta({"type": "text_delta", "text": self.space}))
            out += self._close()
        return out

    def _start(self, block: dict[str, Any]) -> list[str]:
        out = self._close()
        self.index += 1
        self.open = block["type"]
        if self.open == "text":
            self.texts += 1
        else:
            self.space = ""
        return [
            *out,
            event("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block}),
        ]

    def _delta(self, delta: dict[str, Any]) -> str:
        return event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": signature("".join(self.thinking))}))
            self.thinking = []
        self.open = None
        return [*out, event("content_block_stop", {"type": "content_block_stop", "index": self.index})]


async def stream(generation: Generation, stops: list[str], omit_thinking: bool = False) -> AsyncIterator[str]:
    """The reply's events as they come; an error after the stream began is an `error` event (what
    Anthropic sends, and what its client raises). Does not release the generation."""
    reply = generation.reply
    start = MessageOut(
        id=message_id(reply),
        model=reply.model,
        content=[],
        stop_reason=None,
        usage=UsageOut(input_tokens=len(generation.job.prompt), output_tokens=0),
    )
    yield event("message_start", {"type": "message_start", "message": start.model_dump()})
    yield event("ping", {"type": "ping"})
    blocks = Blocks(omit_thinking)
    try:
        async for item in generation.deltas():
            if not isinstance(item, Stats):
                for delta in item:
                    for line in blocks.take(delta):
                        yield line
                continue
            for line in blocks.finish():
                yield line
            reason, sequence = stop_reason(reply, item, stops)
            delta = {"stop_reason": reason, "stop_sequence": sequence}
            yield event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage(item).model_dump()})
            yield event("message_stop", {"type": "message_stop"})
    except ApiError as error:
        yield event("error", error.payload("anthropic"))
