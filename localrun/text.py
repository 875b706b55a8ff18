"""Text for people: sizes, counts, and strings from files or repos made safe to print.

A model file or a Hub repo can carry anything in its names and metadata, including escape
sequences that would retitle or clear a terminal, or megabytes of junk in a corrupt field.
Everything localrun shows that came from outside goes through `safe()` first.
"""

from __future__ import annotations

import re
import time

# C0 controls but tab and newline, DEL, C1 controls, and the bidirectional overrides that can
# make a name read differently from what it is.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
EXCERPT = 120  # characters of an outside string quoted in a message


def human_bytes(n: int | float) -> str:
    """Sizes as people read them: 512 B, 0.99 MiB, 3.4 MiB, 4.1 GiB (never four digits)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1000 or unit == "TiB":
            if unit == "B":
                return f"{value:.0f} B"
            return f"{value:.2f} {unit}" if abs(value) < 1 else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: object, limit: int | None = EXCERPT, *, multiline: bool = False) -> str:
    """`text` with control characters escaped (\\x1b), cut to `limit` characters with an ellipsis.
    multiline keeps newlines and tabs (a chat template shown whole); otherwise they are escaped."""
    value = str(text)
    if limit is not None and len(value) > limit:
        value = value[:limit] + "…"
    return (_UNSAFE if multiline else _UNSAFE_LINE).sub(_escape, value)


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 file', '3 files'."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def ago(ts: float | None, now: float | None = None) -> str:
    """How long ago, in words: 'just now', '5 minutes ago', 'never'."""
    if ts is None:
        return "never"
    seconds = max(0.0, (now or time.time()) - ts)
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


def count(n: int) -> str:
    """A parameter count as model cards write it: 270M, 7.6B."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5GiB', '100000' as bytes (binary units); ValueError for anything else."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (say 4G, 512M or a number of bytes)")
    return int(float(m.group(1)) * 1024 ** "bkmgt".index((m.group(2) or "b").lower()))


FOREVER_SECONDS = 292 * 365 * 86400.0  # Go's longest duration: a longer one (Ollama's too) means forever
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: float | str) -> float | None:
    """A duration as people and Ollama's clients write it, in seconds; None: forever. A number of
    seconds, or Go's form ("5m", "1h30m", "300ms"); negative, or beyond FOREVER_SECONDS, is forever.
    ValueError for anything else (a boolean, NaN, text that is no duration)."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    try:
        if isinstance(value, (int, float)):
            seconds = float(value)
        else:
            text = value.strip()
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            if re.fullmatch(r"\d+(?:\.\d+)?", body):  # a bare number: seconds
                seconds = sign * float(body)
            else:
                parts = _GO_DURATION.findall(body)
                if not body or "".join(n + u for n, u in parts) != body:
                    raise ValueError("not a duration")
                seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    except OverflowError:  # an integer too large for a float: forever either way
        return None
    if seconds != seconds:
        raise ValueError("not a duration")
    return None if seconds < 0 or seconds >= FOREVER_SECONDS else seconds
