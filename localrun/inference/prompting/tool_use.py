"""What a request with tools asks of a reply, worked out once for `serve` and `run --tools`: the
call format the reply is read with, the tools described to a template that does not render them,
and the reply's grammar -- a call's from the first token when one is required, from the family's
trigger when the model may call, and any grammar of the answer from the end of the reasoning when
the prompt left the model thinking.

What cannot be honoured is a ToolUseError naming the request's field (`param`), which the server
turns into a 400 and the CLI into one line."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localrun.errors import LocalrunError, UsageError
from localrun.inference.prompting import call_grammar
from localrun.inference.prompting.families import Detected, ToolFormat
from localrun.inference.prompting.tool_messages import template_tools, tool_schemas


class ToolUseError(UsageError):
    def __init__(self, message: str, param: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.param = param


@dataclass(frozen=True)
class ToolUse:
    """Tools as templates read them, and how the reply may use them: `choice` is OpenAI's auto,
    none or required, or `named` the one function it must call."""

    tools: list[dict[str, Any]]
    choice: str = "auto"
    named: str | None = None
    parallel: bool = True

    @classmethod
    def of(
        cls,
        tools: Sequence[Mapping[str, Any]],
        choice: str = "auto",
        named: str | None = None,
        *,
        parallel: bool = True,
    ) -> ToolUse:
        """From OpenAI-style tool definitions; a named function must be one of them."""
        try:
            shaped = template_tools(tools)
        except LocalrunError as exc:
            raise ToolUseError(exc.message, "tools") from None
        if named is not None and named not in {t["function"]["name"] for t in shaped}:
            raise ToolUseError(f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
        return cls(shaped, choice, named, parallel)

    @property
    def forced(self) -> bool:
        """A call is required: the reply is one from its first token."""
        return self.choice == "required" or self.named is not None

    def format(self, families: Detected) -> ToolFormat | None:
        """The call format the reply is read with: None when the reply may not call (choice none)."""
        return None if self.choice == "none" and self.named is None else families.tools

    def schemas(self) -> dict[str, dict[str, Any]]:
        """Each tool's parameter schema by its name (for the reply parser)."""
        return tool_schemas(self.tools)


def described(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the tools and the generic call format described in its system prompt,
    for a template that does not render tools itself."""
    text = (
        "You can call these tools. To call one or more, reply with only a JSON object: "
        '{"tool_calls": [{"name": NAME, "arguments": {...}}]}\n'
        + "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    )
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def reply_grammar(
    rules: str | None,
    *,
    calling: ToolFormat | None,
    use: ToolUse | None,
    thinking: str | None = None,
    whole_reply: bool = False,
) -> tuple[str, tuple[str, ...]] | None:
    """The reply's grammar and, for a lazy one, its triggers: the caller's `rules` (a grammar or a
    response format), else the tool calls' -- from the first token when a call is required, from
    the family's trigger when the model may call -- and, while the prompt left the model thinking
    (`thinking`: the marker that closes its reasoning), from the end of its reasoning. `whole_reply`: the
    caller's rules are a raw grammar of the whole reply, reasoning included (its writer knows the
    format, as llama-server takes one)."""
    triggers: tuple[str, ...] = ()
    if calling is not None and use is not None and use.tools and (use.forced or rules is None):
        if rules is not None:
            raise ToolUseError("a required tool call and a grammar or response_format: give one", "tool_choice")
        try:
            made = call_grammar.for_tools(
                calling, use.tools, only=use.named, lazy=not use.forced, parallel=use.parallel
            )
        except LocalrunError as exc:  # a parameter schema the grammar cannot enforce
            raise ToolUseError(f"tools: {exc.message}", "tools") from None
        if made is not None:
            rules, triggers = made.gbnf, made.triggers
            whole_reply = False
    if rules is None:
        return None
    if thinking and not triggers and not whole_reply:  # the answer's grammar holds once the reasoning is over
        lazy = call_grammar.after_reasoning(rules, thinking)
        rules, triggers = lazy.gbnf, lazy.triggers
    return rules, triggers
