"""Reading one tool-call block in each family's format: the text between the family's trigger and
its closing marker (or the end of the reply) becomes calls, or a CallError saying why not.

Every reader checks the whole block: text it cannot account for makes the block malformed, so the
reply parser gives it back as content rather than guessing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Schemas = Mapping[str, Mapping[str, Any]]  # a tool's name -> its parameters' JSON schema


class CallError(Exception):
    """The block is not a well-formed call; the message is one line for a log."""


@dataclass(frozen=True)
class RawCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None


CallReader = Callable[[str, Schemas], list[RawCall]]

_DECODER = json.JSONDecoder()


def _json_values(text: str, separators: str = "") -> list[Any]:
    """JSON values one after another, with only spaces (and `separators`) between them."""
    values = []
    i = 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in separators):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise CallError(f"the call is not valid JSON ({exc.msg} at character {exc.pos})") from None
        values.append(value)


def _one_json(text: str) -> Any:
    values = _json_values(text)
    if len(values) != 1:
        raise CallError("the call holds no JSON value" if not values else "the call holds more than one JSON value")
    return values[0]


def _arguments(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise CallError(f"the arguments of {name!r} are a string that is not JSON") from None
    if not isinstance(value, dict):
        raise CallError(f"the arguments of {name!r} are not a JSON object")
    return value


def _named_call(value: Any, *argument_keys: str) -> RawCall:
    """{"name": ..., "<arguments key>": {...}} with an optional "id"."""
    if not isinstance(value, dict):
        raise CallError("the call is not a JSON object")
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise CallError("the call has no name")
    key = next((k for k in argument_keys if k in value), None)
    arguments = _arguments(value[key], name) if key else {}
    extra = set(value) - {"name", "id", "type", *argument_keys}
    if extra:
        raise CallError(f"the call to {name!r} has unknown keys: {', '.join(sorted(extra))}")
    call_id = value.get("id")
    return RawCall(name, arguments, call_id if isinstance(call_id, str) and call_id else None)


def read_hermes(block: str, schemas: Schemas) -> list[RawCall]:
    """`{"name": ..., "arguments": {...}}` (Hermes 2 Pro, Qwen 2.5, Qwen 3 inside <tool_call>)."""
    return [_named_call(_one_json(block), "arguments", "parameters")]


def read_llama3(block: str, schemas: Schemas) -> list[RawCall]:
    """`{"name": ..., "parameters": {...}}`, one or more, separated by spaces or `;` (Llama 3.x)."""
    values = _json_values(block, ";")
    if not values:
        raise CallError("the call holds no JSON")
    return [_named_call(v, "parameters", "arguments") for v in values]


def read_generic(block: str, schemas: Schemas) -> list[RawCall]:
    """`{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}` (or `"tool_call": {...}`)."""
    value = _one_json(block)
    if not isinstance(value, dict) or set(value) - {"tool_calls", "tool_call"} or len(value) != 1:
        raise CallError('the reply is not an object holding only "tool_calls"')
    calls = value.get("tool_calls", [value.get("tool_call")])
    if not isinstance(calls, list) or not calls:
        raise CallError('"tool_calls" is not a list of calls')
    return [_named_call(c, "arguments", "parameters") for c in calls]


_MISTRAL_NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\]\s*([A-Za-z0-9_\-]+)\s*)?\[ARGS\]")


def read_mistral(block: str, schemas: Schemas) -> list[RawCall]:
    """After [TOOL_CALLS]: a JSON list of calls (Mistral Nemo, Small 3.1), or
    `NAME[ARGS]{...}` with an optional `[CALL_ID]ID` (Magistral, Ministral, Small 3.2 and later)."""
    if block.lstrip().startswith("["):
        calls = _one_json(block)
        if not isinstance(calls, list) or not calls:
            raise CallError("[TOOL_CALLS] is not followed by a list of calls")
        return [_named_call(c, "arguments", "parameters") for c in calls]
    head = _MISTRAL_NAMED.match(block)
    if head is None:
        raise CallError("[TOOL_CALLS] is followed neither by a JSON list nor by NAME[ARGS]")
    name = head.group(1)
    return [RawCall(name, _arguments(_one_json(block[head.end() :]), name), head.group(2))]


_HARMONY = re.compile(
    r"([A-Za-z0-9_.\-]+)\s*(?:<\|channel\|>\s*commentary\s*)?(?:<\|constrain\|>\s*)?(?:json\s*)?<\|message\|>"
)


def read_harmony(block: str, schemas: Schemas) -> list[RawCall]:
    """After `to=functions.`: `NAME [<|channel|>commentary] [<|constrain|>]json<|message|>{...}` (gpt-oss)."""
    head = _HARMONY.match(block)
    if head is None:
        raise CallError("the call's header is not `NAME <|constrain|>json<|message|>`")
    name = head.group(1)
    return [RawCall(name, _arguments(_one_json(block[head.end() :]), name))]


_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)(?:</function>)?\s*\Z", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def _parameter_value(raw: str, schema: Mapping[str, Any] | None) -> Any:
    """A parameter's text as its schema's type: a string stays as written; anything else is read
    as JSON when it parses (numbers, booleans, objects), else kept as the string it is."""
    value = raw[1:] if raw.startswith("\n") else raw
    value = value[:-1] if value.endswith("\n") else value
    if schema is not None and schema.get("type") == "string":
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def read_xml_function(block: str, schemas: Schemas) -> list[RawCall]:
    """`<function=NAME><parameter=KEY>value</parameter>...</function>` (Qwen3-Coder, Qwen 3.5)."""
    whole = _FUNCTION.match(block)
    if whole is None:
        raise CallError("the call is not `<function=NAME>...</function>`")
    name = whole.group(1).strip()
    properties = (schemas.get(name) or {}).get("properties") or {}
    arguments: dict[str, Any] = {}
    body = whole.group(2)
    last = 0
    for parameter in _PARAMETER.finditer(body):
        if body[last : parameter.start()].strip():
            raise CallError(f"the call to {name!r} has text outside its parameters")
        key = parameter.group(1).strip()
        arguments[key] = _parameter_value(parameter.group(2), properties.get(key))
        last = parameter.end()
    if body[last:].strip():
        raise CallError(f"the call to {name!r} has text outside its parameters")
    return [RawCall(name, arguments)]
