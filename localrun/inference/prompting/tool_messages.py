"""Tool definitions and tool-call history as chat templates expect them.

OpenAI's API carries a call's arguments as a JSON string; templates iterate them (`arguments|items`)
or write them with `tojson`, so here they become objects. A `role: "tool"` result gets the name of
the call it answers (templates for Llama 3 and gpt-oss write it), and missing contents become empty
strings (templates `trim` them)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from localrun.errors import UsageError


def template_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tool definitions in the shape templates read: {"type": "function", "function": {...}}
    (a bare function definition is wrapped)."""
    out = []
    for tool in tools:
        function = tool.get("function", tool) if tool.get("type", "function") == "function" else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise UsageError("a tool is not a function with a name")
        definition = {"name": function["name"], "description": function.get("description", "")}
        definition["parameters"] = function.get("parameters") or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": definition})
    return out


def tool_schemas(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each tool's parameter schema by its name (for the reply parser)."""
    return {t["function"]["name"]: t["function"]["parameters"] for t in template_tools(tools)}


def _text_of(content: Any) -> str:
    """A message's content as text: None is empty, a list of parts is its text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        if len(parts) == len(content):
            return "".join(str(p) for p in parts)
    raise UsageError("a message's content is neither text nor a list of text parts")


def _arguments(raw: Any, name: str) -> dict[str, Any]:
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        value = json.loads(raw) if isinstance(raw, str) else raw
    except (json.JSONDecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"the arguments of the earlier call to {name!r} are not a JSON object")
    return value


def _template_call(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise UsageError("an earlier tool call has no function name")
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": name, "arguments": _arguments(function.get("arguments", {}), name)},
    }
    if call.get("id"):
        out["id"] = call["id"]
    return out


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-style messages (with `tool_calls` and `role: "tool"`) as the templates expect them."""
    names_by_id: dict[str, str] = {}
    out = []
    for message in messages:
        shaped: dict[str, Any] = {**message, "content": _text_of(message.get("content"))}
        if message.get("tool_calls"):
            shaped["tool_calls"] = [_template_call(c) for c in message["tool_calls"]]
            for call in shaped["tool_calls"]:
                if "id" in call:
                    names_by_id[call["id"]] = call["function"]["name"]
        if message.get("role") == "tool" and not message.get("name"):
            name = names_by_id.get(message.get("tool_call_id") or "")
            if name:
                shaped["name"] = name
        out.append(shaped)
    return out
