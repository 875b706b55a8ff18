"""References within a JSON schema, put in the form llama-cpp-python's converter resolves.

The converter resolves a reference at the root without looking into the root's $defs (so the
references inside them stayed unresolved: every recursive schema was refused), and knows no
reference to the whole schema ("#"). A loop of references that never reaches a value, and a
reference to nothing, are refused by name rather than with the converter's KeyError.
"""

from __future__ import annotations

from typing import Any

from localrun.errors import UsageError
from localrun.text import safe

_SELF = "localrun-root"  # the $defs name under which a schema that refers to itself ("#") is kept


def with_refs_resolvable(schema: dict, source: str) -> dict:
    """The schema in a form whose references the converter resolves: a schema that refers to
    itself ("#") kept under $defs, a reference at the root moved into an anyOf (the converter
    resolves the root's $ref without looking into its $defs, so references inside them stayed
    unresolved), and a loop of references that never reaches a value refused by name."""
    if _refers_to_root(schema):
        defs = dict(schema.get("$defs", {}))
        body = {k: v for k, v in schema.items() if k not in ("$defs", "$schema", "$id")}
        defs[_SELF] = _retarget(body)
        schema = {**{k: v for k, v in schema.items() if k in ("$schema", "$id")}, "$defs": _retarget(defs)}
        schema["$ref"] = f"#/$defs/{_SELF}"
    if "$ref" in schema and len(schema) > 1:
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**rest, "anyOf": [{"$ref": schema["$ref"]}]}
    for start in _refs(schema):
        seen = [start]
        target = _pointer(schema, start)
        if target is None:
            raise UsageError(
                f"{source}: the reference {safe(start)[:80]} points to nothing in the schema",
                hint="references are followed within the schema only: #/$defs/NAME",
            )
        while isinstance(target, dict) and set(target) <= {"$ref", "description", "title"} and "$ref" in target:
            if target["$ref"] in seen:
                loop = " -> ".join([*seen, target["$ref"]])
                raise UsageError(f"{source}: the references {safe(loop)} loop without reaching a value")
            seen.append(target["$ref"])
            target = _pointer(schema, target["$ref"])
    return schema


def _walk(node: Any):
    """Every dict within node, iteratively (a schema's depth is bounded, its breadth is not)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _refs(schema: dict) -> list[str]:
    return sorted({n["$ref"] for n in _walk(schema) if isinstance(n.get("$ref"), str)})


def _refers_to_root(schema: dict) -> bool:
    return any(n.get("$ref") == "#" for n in _walk(schema))


def _retarget(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (f"#/$defs/{_SELF}" if k == "$ref" and v == "#" else _retarget(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_retarget(v) for v in node]
    return node


def _pointer(schema: dict, ref: str) -> Any:
    """What a local reference (#/a/b) points to in schema; None when it points nowhere."""
    if not ref.startswith("#/"):
        return None
    target: Any = schema
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            return None
        target = target[part]
    return target
