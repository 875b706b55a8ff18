"""A model's reply taken apart: the pieces the reply parser streams (deltas) and the whole reply
they assemble to (reasoning, content, tool calls, warnings).

Tool calls stream as OpenAI's API streams them: a call's id and name first, then fragments of its
arguments that, joined, are the call's whole arguments as a JSON string."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReasoningText:
    text: str


@dataclass(frozen=True)
class ContentText:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int  # 0, 1, ... in the order the model wrote the calls
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    fragment: str


@dataclass(frozen=True)
class MalformedCall:
    """A call the model began but did not write well: its text came back as content (in the
    ContentText deltas around this one), and `reason` is one line for the caller's log."""

    reason: str
    text: str


Delta = ReasoningText | ContentText | ToolCallStart | ToolCallArguments | MalformedCall


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ParsedReply:
    reasoning: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    warnings: tuple[str, ...] = field(default=())


def assemble(deltas: Iterable[Delta]) -> ParsedReply:
    """The whole reply that a stream of deltas adds up to."""
    reasoning: list[str] = []
    content: list[str] = []
    starts: dict[int, ToolCallStart] = {}
    arguments: dict[int, list[str]] = {}
    warnings: list[str] = []
    for delta in deltas:
        if isinstance(delta, ReasoningText):
            reasoning.append(delta.text)
        elif isinstance(delta, ContentText):
            content.append(delta.text)
        elif isinstance(delta, ToolCallStart):
            starts[delta.index] = delta
            arguments[delta.index] = []
        elif isinstance(delta, ToolCallArguments):
            arguments[delta.index].append(delta.fragment)
        else:
            warnings.append(delta.reason)
    calls = tuple(ToolCall(starts[i].id, starts[i].name, "".join(arguments[i])) for i in sorted(starts))
    return ParsedReply("".join(reasoning), "".join(content), calls, tuple(warnings))


def merged(deltas: list[Delta]) -> list[Delta]:
    """Adjacent texts of one kind joined into one delta (fewer, larger pieces for the caller)."""
    out: list[Delta] = []
    for delta in deltas:
        last = out[-1] if out else None
        if isinstance(delta, ReasoningText) and isinstance(last, ReasoningText):
            out[-1] = ReasoningText(last.text + delta.text)
        elif isinstance(delta, ContentText) and isinstance(last, ContentText):
            out[-1] = ContentText(last.text + delta.text)
        else:
            out.append(delta)
    return out
