"""Grammars that make a model write a tool call its family's parser reads, with arguments that
follow the tool's JSON schema: from the first token (tool_choice "required" or a named function),
or lazily (tool_choice "auto": free text until the family's trigger, then the call).

Each family with JSON calls is one entry: the text around a call, the key its arguments go under,
and whether calls are a JSON array. The families whose calls are not JSON have a builder of their
own: Qwen3-Coder's `<function=NAME><parameter=KEY>value</parameter></function>` (a string value as
plain text without `<`, any other as the JSON its schema allows), and harmony's
`<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}` (one call per reply:
the end of its message ends the reply)."""

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
    family's trigger on. None for a family with no grammar (read, not constrained)."""
    builder = BUILDERS.get(fmt.name)
    if builder is not None:
        chosen = [t for t in tools if only is None or t["function"]["name"] == only]
        return CallGrammar(builder(chosen, parallel), (fmt.calls[0].trigger_pattern,) if lazy else ())
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


def _xml_functions(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """Qwen3-Coder's calls, each in <tool_call>: the required parameters in the schema's order,
    the others each optional, as its template writes them."""
    rules, names = [], []
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = function.get("parameters") or {}
        required = set(schema.get("required") or ())
        parts = []
        for j, (key, value_schema) in enumerate((schema.get("properties") or {}).items()):
            value = f"t{i}-v{j}"
            rules.append(_parameter_value(value_schema, value))
            part = f"{_literal(f'<parameter={key}>' + chr(10))} {value} {_literal(chr(10) + '</parameter>' + chr(10))}"
            parts.append(part if key in required else f"({part})?")
        head = _literal(f"<function={function['name']}>\n")
        rules.append(f"t{i} ::= {head} {' '.join(parts)} {_literal('</function>')}".replace("  ", " "))
        names.append(f"t{i}")
    one = f"one ::= {_literal('<tool_call>' + chr(10))} ({' | '.join(names)}) {_literal(chr(10) + '</tool_call>')}"
    root = "root ::= one (" + _literal("\n") + " one)*" if parallel else "root ::= one"
    return "\n".join([root, one, *rules]) + "\n"


def _parameter_value(schema: Any, name: str) -> str:
    """The rules of one parameter's value, rooted at `name`: a string as plain text (its enum as
    alternatives, its length bounds kept), anything else as the JSON its schema allows."""
    if isinstance(schema, Mapping) and schema.get("type") == "string":
        if isinstance(schema.get("enum"), list) and all(isinstance(v, str) for v in schema["enum"]):
            return f"{name} ::= " + " | ".join(_literal(v) for v in schema["enum"])
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        repeat = f"{{{low},{high}}}" if isinstance(high, int) else (f"{{{low},}}" if low else "*")
        return f"{name} ::= [^<]{repeat}"
    value = grammar.from_json_schema(dict(schema) if isinstance(schema, Mapping) else {}).gbnf
    return f"{name} ::= {name}-root\n{_prefixed(value, name + '-')}"


def _harmony_functions(tools: Sequence[Mapping[str, Any]], parallel: bool) -> str:
    """gpt-oss's call: the commentary channel addressed to the function, its JSON arguments."""
    rules, names = [], []
    for i, tool in enumerate(tools):
        function = tool["function"]
        arguments = grammar.from_json_schema(function.get("parameters") or {"type": "object"}).gbnf
        rules.append(f"t{i} ::= {_literal(function['name'] + ' <|constrain|>json<|message|>')} t{i}-root")
        rules.append(_prefixed(arguments, f"t{i}-"))
        names.append(f"t{i}")
    return (
        "\n".join([f"root ::= {_literal('<|channel|>commentary to=functions.')} ({' | '.join(names)})", *rules]) + "\n"
    )


BUILDERS = {"qwen3-coder": _xml_functions, "harmony": _harmony_functions}


def _prefixed(gbnf: str, prefix: str) -> str:
    """`gbnf` with every rule it defines renamed `prefix` + its name (rules of several grammars
    put together must not collide), what is quoted or in a character class left as it is."""
    defined = set(re.findall(r"^([A-Za-z0-9-]+)\s*::=", gbnf, re.M))
    return "".join(prefix + token if token in defined else token for token in _TOKENS.findall(gbnf))


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
