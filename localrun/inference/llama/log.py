"""Capture llama.cpp's own log lines instead of letting them spill on the terminal."""

from __future__ import annotations

import ctypes
import re
import sys
from collections import deque

from localrun.text import safe

_lines: deque[str] = deque(maxlen=400)
_echo = False
_LEVEL_DEBUG, _LEVEL_CONT = 1, 5  # ggml_log_level
_callback = None  # the ctypes callback must stay referenced for as long as llama.cpp may call it


def install(echo: bool | None = None) -> None:
    """Route llama.cpp and ggml logs to an in-memory ring buffer, and to stderr when echo is set
    (None leaves the echo as it was: importing llama_cpp must not silence a --verbose run)."""
    global _callback, _echo
    if echo is not None:
        _echo = echo
    if _callback is not None:
        return
    import llama_cpp

    last_level = [0]

    @llama_cpp.llama_log_callback
    def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        if level != _LEVEL_CONT:
            last_level[0] = level
        # Debug lines (hundreds per graph reservation) would push the buffer sizes and the
        # error that explains a failure out of the ring: keep them only on the echo.
        if last_level[0] != _LEVEL_DEBUG:
            _lines.append(line)
        if _echo:
            sys.stderr.write(line)

    _callback = _on_log
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def recent(n: int = 20) -> list[str]:
    """The last n captured lines, joined where llama.cpp split one message over calls."""
    return "".join(list(_lines)).splitlines()[-n:]


def clear() -> None:
    _lines.clear()


_BUFFER_RE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")


def buffer_sizes(lines: list[str]) -> dict[str, dict[str, int]]:
    """The buffers llama.cpp says it allocated, in bytes, per kind and buffer type:
    {"model": {"CPU_Mapped": ..., "CPU_REPACK": ...}, "KV": {"CPU": ...}, "compute": {...}, "output": {...}}"""
    found: dict[str, dict[str, int]] = {"model": {}, "KV": {}, "compute": {}, "output": {}}
    for line in lines:
        if m := _BUFFER_RE.search(line):
            kind = found[m.group(2)]
            kind[m.group(1)] = kind.get(m.group(1), 0) + round(float(m.group(3)) * (1 << 20))
    return found


_SOURCE_PATH = re.compile(r"\S*/([^/\s]+:\d+:)")  # /long/build/path/ggml.c:123: -> ggml.c:123:
# The most telling first: an assert names the broken invariant, "error loading model" the reason a
# load failed; the generic "failed to load model" that follows them says nothing more.
_FAILURE_WORDS = ("ggml_assert", "error loading model", "error", "failed", "terminate", "abort")


def last_error(lines: list[str], *, or_last_line: bool = False) -> str:
    """The line of llama.cpp's log that explains a failure (an assert, an error), short and safe to
    print; with or_last_line the last line when none does. Serves a failed load in this process
    and a child that died (self-test, probes, bench)."""
    cleaned = [_SOURCE_PATH.sub(r"\1", line.strip()) for line in lines if line.strip()]
    for word in _FAILURE_WORDS:
        for line in reversed(cleaned):
            if word in line.lower():
                return safe(line, 300)
    return safe(cleaned[-1], 300) if or_last_line and cleaned else ""
