"""Markers in a growing text: each one says, at a position, whether it matches there, cannot match
there, or could still match once more text arrives. The reply parser holds back the text from the
first position that could still match, so a marker cut across two chunks is never leaked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

PARTIAL = -1  # the text from the position is a proper prefix of a match: wait for more


class Marker(Protocol):
    def match(self, text: str, at: int) -> int | None:
        """The end of a match starting at `at`, PARTIAL if the rest of text could still become one,
        or None if no match can start there."""
        ...

    @property
    def first_chars(self) -> str:
        """The characters a match can start with (a quick filter before match)."""
        ...

    @property
    def pattern(self) -> str:
        """A regular expression for the marker (a lazy grammar's trigger)."""
        ...


@dataclass(frozen=True)
class Literal:
    """A fixed string, such as `<think>` or `[TOOL_CALLS]`."""

    text: str

    @property
    def first_chars(self) -> str:
        return self.text[0]

    @property
    def pattern(self) -> str:
        return re.escape(self.text)

    def match(self, text: str, at: int) -> int | None:
        if text.startswith(self.text, at):
            return at + len(self.text)
        if self.text.startswith(text[at:]):
            return PARTIAL
        return None


_SPACE = " \t\r\n"


@dataclass(frozen=True)
class JsonObjectStart:
    """The start of a JSON object whose first key is `key`: `{`, spaces, `"key"`, spaces, `:`.
    Used for formats where a call is a bare JSON object, so that other JSON in a reply is released
    as soon as its first key rules the call out."""

    key: str

    @property
    def first_chars(self) -> str:
        return "{"

    @property
    def pattern(self) -> str:
        return r"\{\s*" + re.escape(f'"{self.key}"') + r"\s*:"

    def match(self, text: str, at: int) -> int | None:
        i = at
        for part in ("{", None, f'"{self.key}"', None, ":"):
            if part is None:
                while i < len(text) and text[i] in _SPACE:
                    i += 1
                continue
            rest = text[i : i + len(part)]
            if rest != part[: len(rest)]:
                return None
            if len(rest) < len(part):
                return PARTIAL
            i += len(part)
        return i


def earliest(text: str, start: int, markers: tuple[Marker, ...], final: bool = False) -> tuple[int, int, int] | None:
    """The first position from `start` where a marker matches or could still match, as
    (position, end or PARTIAL, index of the marker). At one position a marker that could still
    match wins over one that matched (a longer marker may be on its way); then the longest match.
    With `final` no more text comes, so only whole matches count."""
    if not markers:
        return None
    candidates = re.compile("[" + re.escape("".join(sorted({c for m in markers for c in m.first_chars}))) + "]")
    for candidate in candidates.finditer(text, start):
        pos = candidate.start()
        best: tuple[int, int, int] | None = None
        for index, marker in enumerate(markers):
            end = marker.match(text, pos)
            if end is None:
                continue
            if end == PARTIAL:
                if final:
                    continue
                return pos, PARTIAL, index
            if best is None or end > best[1]:
                best = (pos, end, index)
        if best is not None:
            return best
    return None
