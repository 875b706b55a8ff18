"""Stop strings: text that ends a reply is never shown, not even in part."""

from __future__ import annotations


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop never leaks partially."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""
        self.matched: str | None = None  # the stop string found, once one is

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [(i, s) for i, s in ((self.buf.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            out, self.buf = self.buf[:at], ""
            return out, True
        keep = 0  # the longest tail of buf that is a prefix of some stop string
        for n in range(min(self.hold, len(self.buf)), 0, -1):
            tail = self.buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
                break
        out = self.buf[: len(self.buf) - keep]
        self.buf = self.buf[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
