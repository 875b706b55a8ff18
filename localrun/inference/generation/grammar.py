"""Structured output: a GBNF grammar for llama.cpp's grammar sampler, from a file, or from a JSON
schema through the converter llama-cpp-python ships (llama_cpp.llama_grammar).

That converter enforces structure, types, enums, lengths, item counts and patterns, but silently
ignores numeric bounds; a schema is checked for what it would ignore before anything loads, so a
reply can never pass the grammar and still fail the schema. Bounds on both sides are rewritten as
an enum, which it does enforce: the integers between them, or for a number a decimal grid of at
most ENUM_RANGE values; anything else it cannot enforce is a clear error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

from localrun.errors import UsageError
from localrun.inference.generation import gbnf
from localrun.inference.generation.json_pattern import json_safe
from localrun.inference.generation.schema_refs import with_refs_resolvable
from localrun.text import safe

ENUM_RANGE = 1024  # bounds admitting this many values at most become an enum the converter enforces
# keywords that constrain values in ways the converter cannot express
_UNENFORCED = (
    "multipleOf",
    "uniqueItems",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "patternProperties",
    "dependentRequired",
    "dependentSchemas",
    "propertyNames",
    "minProperties",
    "maxProperties",
)
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_FORMATS = {"date", "time", "date-time", "uuid"}
_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
# keywords from which the converter can tell a schema's shape without a type
_SHAPES = (
    *_BOUNDS,
    "$ref",
    "anyOf",
    "oneOf",
    "allOf",
    "const",
    "enum",
    "properties",
    "items",
    "prefixItems",
    "pattern",
)
# keywords the converter reads before the type (and the format): with one of them, a format is moot
_BEFORE_FORMAT = ("$ref", "anyOf", "oneOf", "const", "enum", "pattern")
_ROOT_ONLY = ("$defs", "definitions", "$schema", "$id")  # where a $ref looks, and what a schema is
MAX_DEPTH = 64  # levels of schemas within schemas (the check and the converter recurse per level)
# The converter's rule for a character of a string admits raw control characters, which strict
# JSON refuses; this one is llama.cpp's own (json-schema-to-grammar.cpp), which excludes them.
_CHAR_RULE = 'char ::= [^"\\\\] |'
_JSON_CHAR_RULE = 'char ::= [^"\\\\\\x00-\\x1F] |'
_MAY_BE_BOOLEAN = ("additionalProperties", "additionalItems", "unevaluatedItems", "unevaluatedProperties")


@dataclass(frozen=True)
class Grammar:
    gbnf: str
    source: str  # what it came from, to say in errors and /model
    schema: dict | None = None  # the JSON schema, when it came from one (to check replies against)


def json_object() -> Grammar:
    """Any JSON object (OpenAI's response_format json_object)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return Grammar(JSON_GBNF, "JSON object")


def from_text(text: str, source: str = "the grammar") -> Grammar:
    """A GBNF grammar given as text, within the bounds llama.cpp's parser survives."""
    gbnf.check(text, source)
    return Grammar(text, source)


def from_file(path: Path) -> Grammar:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the grammar file {safe(str(path))}: {_reason(exc)}") from None
    return from_text(text, f"grammar {path}")


def schema_text(value: str) -> tuple[str, str]:
    """A schema given as JSON text or as the path of a file holding it: (text, where from)."""
    stripped = value.strip()
    if stripped.startswith(("{", "[")):
        return stripped, "the JSON schema"
    try:
        return Path(value).expanduser().read_text(encoding="utf-8"), f"JSON schema {value}"
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"--json-schema {safe(value)} is neither JSON text nor a readable file ({_reason(exc)})",
            hint='give the schema as JSON text (\'{"type": "object", ...}\') or the path of a file holding it',
        ) from None


def _reason(exc: OSError | UnicodeDecodeError) -> str:
    """Why a file could not be read, without Python's "[Errno 2] ... 'path'" dressing."""
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return (exc.strerror or safe(exc)).lower()


def from_json_schema(value: str | dict) -> Grammar:
    """The grammar for a JSON schema (a dict, JSON text, or a file); UsageError for a schema that
    cannot be parsed or enforced."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if isinstance(value, dict):
        schema, source = value, "the JSON schema"
    else:
        text, source = schema_text(value)
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{source} is not valid JSON: {exc}") from None
        except RecursionError:
            raise UsageError(f"{source} nests too deeply to be a schema (over {MAX_DEPTH} levels)") from None
    if not isinstance(schema, dict):
        raise UsageError(f"{source} must be a JSON object (a schema)")
    try:
        enforceable = with_refs_resolvable(_enforceable(schema, "$", source, 0), source)
    except RecursionError:  # data nested within the schema (a const, an enum's values)
        raise UsageError(f"{source} nests too deeply to be a schema (over {MAX_DEPTH} levels)") from None
    try:
        rules = json_schema_to_gbnf(json.dumps(enforceable))
    except (ValueError, AssertionError, KeyError, TypeError, AttributeError, RecursionError, MemoryError) as exc:
        raise UsageError(
            f"{source} cannot be turned into a grammar: {safe(exc)}",
            hint="the converter handles objects, arrays, strings, enums, const, $ref, anyOf/oneOf",
        ) from None
    rules = _strict_json_strings(rules)
    gbnf.check(rules, f"the grammar of {source}")
    return Grammar(rules, source, schema)


def _strict_json_strings(rules: str) -> str:
    """The converter's grammar with llama.cpp's rule for a string's characters (see _CHAR_RULE),
    and a character beyond U+FFFF as one code point: the converter writes JSON's surrogate pair
    (\\ud83e\\udd99), which the grammar reads as two surrogates no token can ever write."""
    rules = _SURROGATE_PAIR.sub(lambda m: f"\\U{_code_point(m.group(1), m.group(2)):08X}", rules)
    lines = rules.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("char ::= "):
            if not line.startswith(_CHAR_RULE):  # a converter of another shape: never pass it unchecked
                raise RuntimeError(f"unexpected rule from the JSON schema converter: {line}")
            lines[i] = _JSON_CHAR_RULE + line[len(_CHAR_RULE) :]
    return "\n".join(lines)


_SURROGATE_PAIR = re.compile(r"\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})", re.IGNORECASE)


def _code_point(high: str, low: str) -> int:
    return 0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00)


def _needs_escape(value: Any) -> bool:
    """Whether a string within value (keys too) needs a JSON escape: the converter writes these
    literals with JSON's backslashes unescaped, which the grammar reads as its own escapes."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any(c in '"\\' or c < " " for c in item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# where a schema holds other schemas: one, a name -> schema map, or a list of them
_SUBSCHEMA = ("items", "additionalProperties", "additionalItems", "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def _enforceable(node: Any, where: str, source: str, depth: int = 0) -> Any:
    """The schema with numeric bounds as enums; UsageError at the first thing nothing would
    enforce. Only schema positions are looked into: a property named "minimum", or an `enum`,
    `const` or `default` value, is data, not a keyword."""
    if not isinstance(node, dict):
        return node
    if depth > MAX_DEPTH:
        raise UsageError(f"{source} nests schemas deeper than {MAX_DEPTH} levels (at {where[:80]}...)")
    for key in _UNENFORCED:
        if key in node:
            raise UsageError(
                f"{source}: {key!r} at {where} cannot be enforced by the grammar",
                hint="drop it from the schema, or check replies yourself",
            )
    types = node.get("type")
    for name in [types] if isinstance(types, str) else types if isinstance(types, list) else [types]:
        if name is not None and name not in _TYPES:
            raise UsageError(
                f"{source}: {safe(json.dumps(name))[:60]} at {where} is not a JSON Schema type",
                hint=f"the types: {', '.join(_TYPES)}",
            )
    shaped = any(key in node for key in _SHAPES) or node.get("additionalProperties", True) is not True
    if node and types is None and not shaped and "format" not in node:
        raise UsageError(
            f"{source}: the schema at {where} says nothing the grammar can enforce (it has no type)",
            hint='give it a type, e.g. {"type": "string"}',
        )
    moot = any(key in node for key in _BEFORE_FORMAT)
    if node.get("format") and types in ("string", None) and node["format"] not in _FORMATS and not moot:
        raise UsageError(
            f"{source}: format {safe(node['format'])!r} at {where} cannot be enforced by the grammar",
            hint=f"formats it enforces: {', '.join(sorted(_FORMATS))}; or use a pattern",
        )
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        value = node.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > gbnf.LIMITS.count:
            raise UsageError(
                f"{source}: {key} {value:g} at {where} is over the {gbnf.LIMITS.count:,} the grammar can enforce",
                hint="the converter writes every character or item out; give a smaller bound",
            )
    for key in ("enum", "const", "properties"):
        if key in node and _needs_escape(list(node[key]) if key == "properties" else node[key]):
            what = "a property name" if key == "properties" else f"a value of {key}"
            raise UsageError(
                f"{source}: {what} at {where} holds a quote, backslash or control character, "
                "which the grammar's converter cannot write",
                hint="leave such characters out of enum and const values and property names",
            )
    out = dict(node)
    if isinstance(node.get("pattern"), str):
        try:
            out["pattern"] = json_safe(node["pattern"])
        except ValueError as exc:
            raise UsageError(
                f"{source}: the pattern at {where} cannot be enforced: {exc}",
                hint="JSON strings escape quotes, backslashes and control characters; leave them out of the pattern",
            ) from None
    for key in _SUBSCHEMA:
        if key in node:
            value = node[key]
            out[key] = (
                [_subschema(v, f"{where}.{key}[{i}]", source, depth) for i, v in enumerate(value)]
                if isinstance(value, list)
                else value
                if key in _MAY_BE_BOOLEAN and isinstance(value, bool)
                else _subschema(value, f"{where}.{key}", source, depth)
            )
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out[key] = {name: _subschema(v, f"{where}.{key}.{name}", source, depth) for name, v in node[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            out[key] = [_subschema(v, f"{where}.{key}[{i}]", source, depth) for i, v in enumerate(node[key])]
    if any(key in node for key in _BOUNDS):
        return _bounds_as_enum(out, where, source)
    if isinstance(types, list) and len(types) > 1:
        # The converter reads a type list as the bare types, dropping every other keyword
        # (properties, required, maxLength, enum...): one branch per type keeps them.
        rest = {k: v for k, v in out.items() if k not in ("type", *_ROOT_ONLY)}
        kept = {k: v for k, v in out.items() if k in _ROOT_ONLY}
        return {**kept, "anyOf": [{**rest, "type": t} for t in types]}
    return out


def _subschema(node: Any, where: str, source: str, depth: int) -> Any:
    if isinstance(node, bool):
        raise UsageError(
            f"{source}: a boolean schema ({json.dumps(node)}) at {where} cannot be turned into a grammar",
            hint='give a schema instead, e.g. {"type": "string"}',
        )
    return _enforceable(node, where, source, depth + 1)


def _bounds(node: dict) -> tuple[Decimal | None, bool, Decimal | None, bool]:
    """(low, low exclusive, high, high exclusive): the tighter of each side's keywords, with
    draft 4's boolean exclusiveMinimum/exclusiveMaximum read as flags on minimum/maximum."""

    def side(plain: str, exclusive: str, tighter: Any) -> tuple[Decimal | None, bool]:
        found: list[tuple[Decimal, bool]] = []
        value, flag = node.get(plain), node.get(exclusive)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append((Decimal(str(value)), flag is True))
        if isinstance(flag, (int, float)) and not isinstance(flag, bool):
            found.append((Decimal(str(flag)), True))
        if not found:
            return None, False
        return tighter(found, key=lambda bound: (bound[0], bound[1] if tighter is max else not bound[1]))

    low, low_open = side("minimum", "exclusiveMinimum", max)
    high, high_open = side("maximum", "exclusiveMaximum", min)
    return low, low_open, high, high_open


def _bounds_as_enum(node: dict, where: str, source: str) -> dict:
    """Bounds on both sides as the enum of the values between them: every integer, or for a
    number a decimal grid of at most ENUM_RANGE points (0..10 in steps of 0.01, 0..1 of 0.001).
    Other types the node allows (["number", "null"]) stay allowed beside the enum."""
    lo, low_open, hi, high_open = _bounds(node)
    if lo is None or hi is None:
        raise UsageError(
            f"{source}: a bound on one side only at {where} cannot be enforced by the grammar",
            hint="give both minimum and maximum (the values between are enforced), or drop the bound",
        )
    types = node.get("type", "number")
    types = [types] if isinstance(types, str) else list(types)
    integral = "integer" in types and "number" not in types
    step = Decimal(1)
    if not integral:
        while (hi - lo) / (step / 10) < ENUM_RANGE - 1 and step > Decimal("1e-6"):
            step /= 10
    first = (lo / step).to_integral_value(ROUND_CEILING) * step
    last = (hi / step).to_integral_value(ROUND_FLOOR) * step
    if low_open and first == lo:
        first += step
    if high_open and last == hi:
        last -= step
    if last < first:
        raise UsageError(f"{source}: the bounds at {where} admit no value")
    if (last - first) / step >= ENUM_RANGE:
        raise UsageError(
            f"{source}: bounds at {where} cannot be enforced by the grammar",
            hint=f"integer bounds spanning fewer than {ENUM_RANGE} values are; narrow them or drop them",
        )
    count = int((last - first) / step) + 1
    grid = [first + i * step for i in range(count)]
    values = [int(v) if v == v.to_integral_value() else float(v) for v in grid]
    rest = {k: v for k, v in node.items() if k not in (*_BOUNDS, "type")}
    others = [t for t in types if t not in ("integer", "number")]
    if not others:
        return {**rest, "enum": values}
    return {**rest, "anyOf": [{"enum": values}, *({"type": t} for t in others)]}
