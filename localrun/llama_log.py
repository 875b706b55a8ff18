"""Capture llama.cpp's own log lines instead of letting them spill on the terminal."""

from __future__ import annotations

import ctypes
import re
import sys
from collections import deque

_lines: deque[str] = deque(maxlen=400)
_echo = False
_LEVEL_DEBUG, _LEVEL_CONT = 1, 5  # ggml_log_level
_callback = None  # the ctypes callback must stay referenced for as long as llama.cpp may call it


def install(echo: bool = False) -> None:
    """Route llama.cpp and ggml logs to an in-memory ring buffer (and to stderr when echo)."""
    global _callback, _echo
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
