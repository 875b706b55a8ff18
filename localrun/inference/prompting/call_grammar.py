"""Grammars that make a model write a tool call its family's parser reads, with arguments that
follow the tool's JSON schema: from the first token (tool_choice "required" or a named function),
or lazily (tool_choice "auto": free text until the family's trigger, then the call).

Each family with JSON calls is one entry: the text around a call, the key its arguments go under,
and whether calls are a JSON array. A family without an entry (its calls are not JSON) is read but
not constrained."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localrun.inference.generation import grammar
from localrun.inference.prompting.families import ToolFormat


@dataclass(frozen=True)
class CallShape:
    before: str  # the text before the calls (a call, or the array of calls)
    after: str
    arguments_key: str  # "arguments", or "parameters" (Llama 3)
    array: bool = False  # the calls are one JSON array
    wrapped: str | None = None  # the array is the value of this key of an object (the generic format)
    between: str | None = "\n"  # between calls written one after another; None: one call at most
    syntax: int = 0  # which of the family's call syntaxes this is (its trigger starts the grammar)


SHAPES: dict[str, CallShape] = {
    "hermes": CallShape("<tool_call>\n", "\n</tool_call>", "arguments"),
    "llama3": CallShape("", "", "parameters", between=None, syntax=1),
    "mistral": CallShape("[TOOL_CALLS]", "", "arguments", array=True),
    "generic": CallShape("", "", "arguments", array=True, wrapped="tool_calls"),
}


@dataclass(frozen=True)
class CallGrammar:
    gbnf: str
    triggers: tuple[str, ...]  # for a lazy grammar; () when it holds from the first token


def for_tools(
    fmt: ToolFormat, tools: Sequence[Mapping[str, Any]], *, only: str | None, lazy: bool, parallel: bool
) -> CallGrammar | None:
    """The grammar of `fmt`'s calls to `tools` (to `only` that one, if named); lazy: from the
    family's trigger on. None when the family's calls are not JSON (read, not constrained)."""
    shape = SHAPES.get(fmt.name)
    if shape is None:
        return None
    calls = []
    for tool in tools:
        function = tool["function"]
        if only is not None and function["name"] != only:
            continue
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": function["name"]},
                    shape.arguments_key: function.get("parameters") or {"type": "object"},
                },
                "required": ["name", shape.arguments_key],
                "additionalProperties": False,
            }
        )
    call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if shape.array:
        call = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        if shape.wrapped:
            call = {
                "type": "object",
                "properties": {shape.wrapped: call},
                "required": [shape.wrapped],
                "additionalProperties": False,
            }
    body = _renamed(grammar.from_json_schema(call).gbnf, "root", "call")
    one = f"{_literal(shape.before)} call {_literal(shape.after)}".replace('"" ', "").replace(' ""', "")
    several = parallel and not shape.array and shape.between is not None
    many = f"one ({_literal(shape.between or '')} one)*" if several else "one"
    rules = f"root ::= {many}\none ::= {one}\n{body}"
    return CallGrammar(rules, (fmt.calls[shape.syntax].trigger_pattern,) if lazy else ())


def after_reasoning(gbnf: str, closing: str) -> CallGrammar:
    """`gbnf` (the answer's) as a lazy grammar that starts at the reasoning's `closing` marker:
    the marker, whitespace, then what its root holds. The marker is in the trigger's group, the text
    the grammar is given once triggered: llama.cpp skips an empty group and would hand the grammar
    the whole reply, reasoning included (its grammar then throws, which aborts the process)."""
    rules = f"root ::= {_literal(closing)} [ \\t\\n]* answer\n{_renamed(gbnf, 'root', 'answer')}"
    return CallGrammar(rules, (r"[\s\S]*?(" + re.escape(closing) + r")[\s\S]*",))


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z0-9-]+|.', re.S)


def _renamed(gbnf: str, old: str, new: str) -> str:
    """`gbnf` with the rule `old` (and the rules named after it, `old-...`) renamed, what is
    quoted or in a character class left as it is."""
    out = []
    for token in _TOKENS.findall(gbnf):
        if token == old or token.startswith(old + "-"):
            token = new + token[len(old) :]
        out.append(token)
    return "".join(out)
