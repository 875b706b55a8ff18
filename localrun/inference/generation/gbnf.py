"""Bounds on a GBNF grammar, checked in Python before llama.cpp parses it.

llama.cpp's grammar parser and sampler recurse without a bound, and some shapes cost time
quadratic in their size or worse. Measured with llama-cpp-python 0.3.36 on an 8 MiB stack (the
main thread's, and the server's worker threads'): 20,000 nested parentheses in one rule segfault
the parser (15,000 parse in 15 ms); a chain of 120,000 rules each referring to the next
segfaults (60,000 parse in 4.5 s); 30,000 rules each starting with a reference to the next take
28 s, 100,000 alternatives in one rule 16 s, and a repetition of a repeated rule
(`x{0,300}` of `y{0,300}`) 16 s, growing with the product of the counts. The bounds below sit
an order of magnitude or more under the crashes and keep a grammar's set-up to tens of
milliseconds, while leaving room for what a JSON schema of sensible size turns into.
"""

from __future__ import annotations

from dataclasses import dataclass

from localrun.errors import UsageError


@dataclass(frozen=True)
class GrammarLimits:
    size: int = 128 * 1024  # characters of GBNF
    rules: int = 2048
    nesting: int = 2500  # parentheses open at once (a JSON schema's maxLength nests one per character)
    alternatives: int = 4096  # '|' in the whole grammar
    count: int = 2000  # the largest {m,n} count (llama.cpp's own bound, within one rule)
    repetition: int = 10_000  # counts multiplied along rule references (x{0,300} of y{0,300}: 16 s)


LIMITS = GrammarLimits()


@dataclass(frozen=True)
class Shape:
    """What a grammar's text holds, as far as the bounds care."""

    size: int
    rules: int
    nesting: int
    alternatives: int
    count: int
    repetition: int


def _is_word(c: str) -> bool:
    return c.isalnum() or c in "-_"


def measure(text: str) -> Shape:
    """Count rules, alternatives, the deepest nesting of parentheses and the repetition counts,
    outside literals, character classes and comments; then multiply the counts along rule
    references (llama.cpp writes each repetition out). No recursion: any text is measured safely."""
    alternatives = depth = deepest = count = 0
    refs: dict[str, set[str]] = {}
    reps: dict[str, int] = {}
    rule = ""
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
        elif _is_word(c):
            start = i
            while i < n and _is_word(text[i]):
                i += 1
            word = text[start:i]
            after = i
            while after < n and text[after] in " \t":
                after += 1
            if text.startswith("::=", after):
                rule = word
                refs.setdefault(rule, set())
                i = after + 2
            else:
                if rule:
                    refs[rule].add(word)
                i -= 1  # the loop's step moves past the word
        elif c == "{":
            end = text.find("}", i)
            end = n if end < 0 else end
            numbers = [int(part) for part in text[i + 1 : end].split(",") if part.strip().isdigit()]
            biggest = max(numbers, default=0)
            count = max(count, biggest)
            if rule:
                reps[rule] = max(reps.get(rule, 1), biggest)
            i = end
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth = max(0, depth - 1)
        elif c == "|":
            alternatives += 1
        i += 1
    return Shape(n, len(refs), deepest, alternatives, count, _repetition(refs, reps))


def _repetition(refs: dict[str, set[str]], reps: dict[str, int]) -> int:
    """The largest product of repetition counts along a chain of rule references (a reference
    back into the chain counts once), by an iterative depth-first walk."""
    weight: dict[str, int] = {}
    for root in refs:
        if root in weight:
            continue
        on_path = {root}
        stack = [(root, iter(sorted(refs[root])))]
        while stack:
            name, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(name)
                below = max((weight.get(r, 1) for r in refs[name] if r in refs and r not in on_path), default=1)
                weight[name] = min(reps.get(name, 1) * below, 10**12)
            elif child in refs and child not in weight and child not in on_path:
                on_path.add(child)
                stack.append((child, iter(sorted(refs[child]))))
    return max(weight.values(), default=1)


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
        ("as the count of one repetition", shape.count, limits.count),
        (
            "repetitions within repetitions (counts multiplied along rule references)",
            shape.repetition,
            limits.repetition,
        ),
    ):
        if value > bound:
            raise UsageError(
                f"{source} is too large to enforce: {value:,} {what}, over the limit of {bound:,}",
                hint="simplify it (fewer alternatives or rules, less nesting, smaller repetitions)",
            )
