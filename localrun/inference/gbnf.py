"""Bounds on a GBNF grammar, checked in Python before llama.cpp parses it.

llama.cpp's grammar parser and sampler recurse without a bound, and some shapes cost time
quadratic in their size. Measured with llama-cpp-python 0.3.36 on an 8 MiB stack (the main
thread's, and uvicorn's worker threads'): 20,000 nested parentheses in one rule segfault the
parser (15,000 parse); a chain of 120,000 rules each referring to the next segfaults (60,000
parse in 4.5 s); 30,000 rules each starting with a reference to the next take 28 s to parse, and
100,000 alternatives in one rule 16 s. The bounds below sit two orders of magnitude under the
crashes and keep a grammar's set-up under a few tens of milliseconds, while leaving room for
every grammar a JSON schema of sensible size turns into.
"""

from __future__ import annotations

from dataclasses import dataclass

from localrun.errors import UsageError


@dataclass(frozen=True)
class GrammarLimits:
    size: int = 128 * 1024  # characters of GBNF
    rules: int = 2048
    nesting: int = 100  # parentheses open at once
    alternatives: int = 4096  # '|' in the whole grammar


LIMITS = GrammarLimits()


@dataclass(frozen=True)
class Shape:
    """What a grammar's text holds, as far as the bounds care."""

    size: int
    rules: int
    nesting: int
    alternatives: int


def measure(text: str) -> Shape:
    """Count rules, alternatives and the deepest nesting of parentheses, outside literals,
    character classes and comments. One pass, no recursion: any text is measured safely."""
    rules = alternatives = depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"' or c == "[":  # a literal or a class: skip to its unescaped end
            end = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != end:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < n and text[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(0, depth - 1)
        elif c == "|":
            alternatives += 1
        elif c == ":" and text.startswith("::=", i):
            rules += 1
            i += 2
        i += 1
    return Shape(n, rules, deepest, alternatives)


def check(text: str, source: str, limits: GrammarLimits = LIMITS) -> None:
    """UsageError when the grammar is empty or over a bound, naming which."""
    if not text.strip():
        raise UsageError(f"{source} is empty", hint='a grammar needs a root rule, e.g. root ::= "yes" | "no"')
    shape = measure(text)
    for what, value, bound in (
        ("characters", shape.size, limits.size),
        ("rules", shape.rules, limits.rules),
        ("levels of nested parentheses", shape.nesting, limits.nesting),
        ("alternatives", shape.alternatives, limits.alternatives),
    ):
        if value > bound:
            raise UsageError(
                f"{source} is too large to enforce: {value:,} {what}, over the limit of {bound:,}",
                hint="simplify it (fewer alternatives or rules, less nesting)",
            )
