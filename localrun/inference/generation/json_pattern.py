"""A JSON schema `pattern` rewritten so that the grammar it becomes only writes valid JSON.

The converter (llama_cpp.llama_grammar) turns a pattern into grammar rules for the characters
between a string's quotes, as if they needed no escaping: `.` and classes such as `[^,]` or
`[ -~]` let a raw quote, backslash or control character into the string, which ends it early or
makes it invalid JSON. Here every character set of the pattern (a class, `.`, `\\d`, `\\w`,
`\\s`) becomes an explicit class of the characters a JSON string holds unescaped, and a literal
quote, backslash or control character is refused. The grammar then admits a subset of what the
pattern matches, all of it valid JSON. Escapes the converter would copy into the grammar as
they are (`\\.`) are written as one-character classes, which it copies whole.
"""

from __future__ import annotations

from localrun.inference.generation.gbnf import LIMITS

MAX_CODE = 0x10FFFF
# What a JSON string cannot hold unescaped (control characters, quote, backslash), and the
# surrogates, which no UTF-8 text holds.
_UNSAFE = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0xD800, 0xDFFF)]
_SETS = {
    "d": [(0x30, 0x39)],
    "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "s": [(0x09, 0x0D), (0x20, 0x20)],
}
_CONTROL_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "f": 0x0C, "v": 0x0B, "0": 0x00}
_STRUCTURE = set("()|*+?")
_META = set("|.()[]{}*+?^$\\-")

Ranges = list[tuple[int, int]]


def json_safe(pattern: str) -> str:
    """The pattern with its character sets made JSON-safe, anchored once at each end around one
    group (the converter leaves a top-level `|` bare, so `^ab|cd$` would let a string end early);
    ValueError says what cannot be."""
    body = pattern[1:] if pattern.startswith("^") else None
    if body is None or not body.endswith("$") or _escaped_at(body, len(body) - 1):
        raise ValueError("it must be anchored at both ends: ^...$")
    return "^(" + _rewrite(body[:-1]) + ")$"


def _escaped_at(text: str, i: int) -> bool:
    slashes = 0
    while i - 1 - slashes >= 0 and text[i - 1 - slashes] == "\\":
        slashes += 1
    return slashes % 2 == 1


def _rewrite(pattern: str) -> str:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            ranges, i = _escape(pattern, i + 1)
            out.append(_class(ranges))
        elif c == ".":
            out.append(_class(_complement([(0x0A, 0x0A), (0x0D, 0x0D)])))
            i += 1
        elif c == "[":
            ranges, i = _parse_class(pattern, i + 1)
            out.append(_class(ranges))
        elif c == "{":
            end = pattern.find("}", i)
            if end < 0:
                raise ValueError("an unclosed {")
            counts = pattern[i + 1 : end].split(",")
            if (
                not all(c.strip().isdigit() or (k == 1 and not c.strip()) for k, c in enumerate(counts))
                or len(counts) > 2
            ):
                raise ValueError(f"a bad repetition {pattern[i : end + 1]}")
            if any(c.strip() and int(c) > LIMITS.count for c in counts):
                raise ValueError(f"a repetition over {LIMITS.count} ({pattern[i : end + 1]})")
            out.append(pattern[i : end + 1])
            i = end + 1
        elif c in _STRUCTURE:
            out.append(c)
            i += 1
        elif c in "^$":
            raise ValueError(f"{c} inside the pattern is not supported (only ^ at its start and $ at its end)")
        else:
            out.append(_class([(ord(c), ord(c))]) if c in _META or _unsafe(ord(c)) else c)
            i += 1
    return "".join(out)


def _escape(pattern: str, i: int) -> tuple[Ranges, int]:
    """The characters an escape at pattern[i] (after its backslash) stands for, and where it ends."""
    if i >= len(pattern):
        raise ValueError("it ends with a lone backslash")
    e = pattern[i]
    if e.lower() in _SETS:
        ranges = _SETS[e.lower()]
        return (_complement(ranges) if e.isupper() else ranges), i + 1
    if e in "xu":
        width = 2 if e == "x" else 4
        digits = pattern[i + 1 : i + 1 + width]
        if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise ValueError(f"a bad escape \\{e}{digits}")
        code = int(digits, 16)
        return [(code, code)], i + 1 + width
    if e in _CONTROL_ESCAPES:
        code = _CONTROL_ESCAPES[e]
        return [(code, code)], i + 1
    if e.isalnum():
        raise ValueError(f"the escape \\{e} is not supported")
    return [(ord(e), ord(e))], i + 1


def _parse_class(pattern: str, i: int) -> tuple[Ranges, int]:
    """The characters of the class that starts at pattern[i] (after its '['), and where it ends."""
    negated = i < len(pattern) and pattern[i] == "^"
    i += negated
    ranges: Ranges = []
    first = True
    while True:
        if i >= len(pattern):
            raise ValueError("an unclosed [")
        c = pattern[i]
        if c == "]" and not first:
            i += 1
            break
        first = False
        if c == "\\":
            item, i = _escape(pattern, i + 1)
        else:
            item, i = [(ord(c), ord(c))], i + 1
        if len(item) == 1 and item[0][0] == item[0][1] and pattern[i : i + 1] == "-" and pattern[i + 1 : i + 2] != "]":
            if pattern[i + 1 : i + 2] == "\\":
                high, i = _escape(pattern, i + 2)
            else:
                high, i = ([(ord(pattern[i + 1]), ord(pattern[i + 1]))], i + 2) if i + 1 < len(pattern) else ([], i)
            if len(high) != 1 or high[0][0] != high[0][1] or high[0][0] < item[0][0]:
                raise ValueError("a bad range in a class")
            item = [(item[0][0], high[0][0])]
        ranges.extend(item)
    return (_complement(ranges) if negated else _merge(ranges)), i


def _merge(ranges: Ranges) -> Ranges:
    merged: Ranges = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return merged


def _complement(ranges: Ranges) -> Ranges:
    out: Ranges = []
    start = 0
    for low, high in _merge(ranges):
        if low > start:
            out.append((start, low - 1))
        start = high + 1
    if start <= MAX_CODE:
        out.append((start, MAX_CODE))
    return out


def _unsafe(code: int) -> bool:
    return any(low <= code <= high for low, high in _UNSAFE)


def _class(ranges: Ranges) -> str:
    """A class of the characters in `ranges` a JSON string holds unescaped, in GBNF's escapes."""
    safe = _complement(_UNSAFE + _complement(ranges))
    if not safe:
        raise ValueError(
            "part of it only matches characters JSON must escape (a quote, backslash or control character)"
        )
    return "[" + "".join(_code(lo) if lo == hi else f"{_code(lo)}-{_code(hi)}" for lo, hi in safe) + "]"


def _code(code: int) -> str:
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"
