"""Render a stream of engine events: live on a terminal, plain when piped, or as JSON.

The live status line (tokens so far, tok/s, TTFT, elapsed) lives on stderr, on the line *below*
the streamed text: before each piece of text it is erased, after it redrawn, so text on stdout
and the status on stderr never interleave, whatever wraps or scrolls. Its text is recomputed
at most STATUS_HZ times a second. Text wraps at word boundaries at the terminal's width as it is
for each piece, so a window resized mid-reply (SIGWINCH) is followed at once.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.markup import escape
from wcwidth import wcwidth

from localrun.inference.generation.events import (
    EventSink,
    Notice,
    PrefillProgress,
    Reasoning,
    SampledToken,
    Speculation,
    Stats,
    ToolCalled,
)
from localrun.output import Output
from localrun.text import safe

STATUS_HZ = 5

# VT100: IND (down one line, scrolling if needed) then RI (back up) makes room below without
# moving the column; DECSC/DECRC save and restore the cursor; NEL goes to the next line start.
_ROOM_BELOW = "\x1bD\x1bM"
_SAVE, _RESTORE, _NEXT_LINE = "\x1b7", "\x1b8", "\x1bE"
_CLEAR_BELOW, _CLEAR_LINE = "\x1b[J", "\r\x1b[K"
_DIM, _RESET = "\x1b[2m", "\x1b[0m"
# Control characters a model may emit (ESC, VT, BS...) would move the cursor or inject terminal
# escapes; on a terminal they are dropped. Piped output stays byte-exact.
_CONTROLS = dict.fromkeys([*range(0, 9), *range(11, 32), 127])  # keeps \t and \n


_ENDED = {"stop": "stopped at a stop string", "cancelled": "cancelled"}


def ending(s: Stats) -> str | None:
    """Why a reply ended, in words; None for the usual end (the model's end-of-text token)."""
    if s.finish_reason == "length":
        return "the context is full" if s.context_full else "stopped at the token limit"
    return _ENDED.get(s.finish_reason)


PROMPT_SPEED_MIN = 16  # fewer tokens read than this: a speed would mostly measure overhead
RATE_MIN_TOKENS = 4  # the live line shows a reply speed from this many tokens (3 intervals) on
SPEC_MIN_DRAFTED = 10  # fewer drafted tokens than this: acceptance as counts, not a percentage


def acceptance(accepted: int, drafted: int) -> str:
    """Speculation's acceptance: a percentage once enough tokens were drafted for it to mean
    something, else the counts (1/1 rather than 100%)."""
    if drafted < SPEC_MIN_DRAFTED:
        return f"{accepted}/{drafted}"
    return f"{100 * accepted / drafted:.0f}%"


def stats_line(s: Stats, model: str | None = None, width: int | None = None) -> str:
    """One line after a reply: what was loaded (one-shot runs), prompt and reply speed, TTFT, and
    why it ended. Figures for work that never finished (a prompt cancelled while read), or not
    known (a server that went away), are left out. With a width (a terminal), the line breaks
    only between its parts, never inside a figure."""
    parts = []
    if model:  # a file by its name: the folder it is in says nothing about the run
        parts.append(safe(Path(model).name if model.endswith(".gguf") else model))
    if s.prompt_tokens:
        cached = ""
        if s.from_disk:
            cached = f" ({s.from_disk:,} from the prompt cache)"
        elif s.cached_tokens:
            cached = f" ({s.cached_tokens:,} cached)"
        read = s.prompt_tokens - s.cached_tokens
        speed = ""
        if s.prompt_tps is None:
            speed = ", not read to the end"
        elif read >= PROMPT_SPEED_MIN:
            speed = f", {s.prompt_tps:.1f} tok/s"
        parts.append(f"prompt {s.prompt_tokens:,} tok{cached}{speed}")
    if s.generated_tokens or s.finish_reason != "cancelled":
        parts.append(f"reply {s.generated_tokens:,} tok, {s.gen_tps:.1f} tok/s")
    if s.drafted:
        parts.append(f"spec {acceptance(s.accepted, s.drafted)} accepted")
    if s.ttft_s is not None:
        parts.append(f"TTFT {s.ttft_s:.2f} s")
    parts.append(f"total {s.total_s:.2f} s")
    if why := ending(s):
        parts.append(why)
    if not width:
        return " · ".join(parts)
    lines, line = [], parts[0]
    for i, part in enumerate(parts[1:], 2):
        room = width - (2 if i < len(parts) else 0)  # a line broken after this part ends with " ·"
        if len(line) + 3 + len(part) > room:
            lines.append(line + " ·")
            line = "  " + part
        else:
            line += " · " + part
    return "\n".join([*lines, line])


def show_stats_line(out: Output, stats: Stats, model: str | None = None) -> None:
    """The stats line on stderr: dim on a colour terminal, broken between its parts at the
    terminal's width (never inside a figure), one line when piped."""
    line = stats_line(stats, model, out.err.width if out.stderr_tty else None)
    if out.stderr_tty and out.color:
        out.status(f"[dim]{escape(line)}[/]")
    else:
        out.info(line)


def call_data(event: ToolCalled) -> dict[str, Any]:
    """A tool call as `run` writes it for a script: its id, the function's name, the arguments as
    an object."""
    return {"id": event.id, "name": event.name, "arguments": json.loads(event.arguments)}


def show_reasoning(out: Output, text: str) -> None:
    """A reply's whole reasoning on stderr (chat's /show thinking): dim on a terminal."""
    out.err.print(safe(text, None, multiline=True), markup=False, highlight=False, style="dim", soft_wrap=True)


def terminal_columns() -> int:
    """The terminal's width now ($COLUMNS when set), at least 20."""
    return max(20, shutil.get_terminal_size((80, 24)).columns)


class WordWrap:
    """Line breaks at spaces, so that no word of a reply is split at the terminal's edge. A word
    is held back until it ends (a space, a newline) or is wider than a line; wide characters
    (CJK) break anywhere, each on its own."""

    def __init__(self, columns: int):
        self.columns = columns
        self.col = 0  # the column after what it has written (columns: the terminal's pending wrap)
        self.word = ""
        self.word_width = 0

    def feed(self, text: str) -> str:
        out = []
        for ch in text:
            if ch == "\n":
                out += [self.flush(), "\n"]
                self.col = 0
            elif ch in " \t":
                out.append(self.flush())
                width = 1 if ch == " " else 8 - self.col % 8
                if self.col + width > self.columns:  # a space at the edge becomes the line break
                    out.append("\n")
                    self.col = 0
                else:
                    out.append(ch)
                    self.col += width
            else:
                width = max(0, wcwidth(ch))
                if width == 2:
                    out.append(self.flush())
                self.word += ch
                self.word_width += width
                if width == 2 or self.word_width >= self.columns:
                    out.append(self.flush())
        return "".join(out)

    def resize(self, columns: int) -> str:
        """The terminal is now `columns` wide: what to write first. A cursor past the new edge
        goes to a new line, where it is known to be whatever the terminal did with the old one."""
        self.columns = columns
        if self.col >= columns:
            self.col = 0
            return "\n"
        return ""

    def flush(self) -> str:
        """The word held back, placed on this line or the next."""
        word, width = self.word, self.word_width
        self.word, self.word_width = "", 0
        if not word:
            return ""
        if self.col > 0 and self.col + width > self.columns:
            self.col = width
            return "\n" + word
        self.col += width
        return word


class LiveRenderer:
    """Text on stdout as it comes, wrapped at word boundaries on a terminal; a live status line on
    stderr when stderr is a terminal. When stdout goes elsewhere (a pipe, `| tee`) the status line
    is shown only while the prompt is read: once text flows, anything drawn on stderr would land
    in the middle of it on the screen."""

    def __init__(self, out: Output, *, show_stats: bool = True, model: str | None = None, show_thinking: bool = False):
        self.out = out
        self.show_stats = show_stats
        self.show_thinking = show_thinking  # the reasoning dimmed on stderr; else counted on the status line
        self.thinking = 0  # reasoning pieces so far
        self.model = model
        self.live = out.stderr_tty and not out.json
        self.below = self.live and out.stdout_tty  # same terminal: status goes on the line below
        self.started = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0  # pieces, close to tokens (a stop string or a split character merges some)
        self.status = ""
        self.next_status = 0.0
        self.ends_with_newline = True
        self.columns = terminal_columns()
        self.width = self.columns - 1
        self.wrap = WordWrap(self.columns) if out.stdout_tty else None
        self.drawn = False
        self.spec = ""  # speculative decoding's acceptance so far, for the status line
        self._ticker: threading.Thread | None = None  # counts the seconds while the prompt is read
        self._ticking = threading.Event()
        self._lock = threading.Lock()  # the ticker's drawing and progress()'s
        if self.live:
            self._draw(self._status_text(self.started))

    def _status_text(self, now: float) -> str:
        elapsed = now - self.started
        if self.first is None:
            return f"… reading the prompt · {elapsed:.1f} s"[: self.width]
        gen = now - self.first
        rate = f" · {(self.tokens - 1) / gen:.1f} tok/s" if gen > 0 and self.tokens >= RATE_MIN_TOKENS else ""
        line = f"… {self.tokens} tok{rate}{self.spec} · TTFT {self.first - self.started:.2f} s · {elapsed:.1f} s"
        return line[: self.width]

    def _draw(self, status: str) -> None:
        self.status = status
        self.drawn = True
        dim = (_DIM, _RESET) if self.out.color else ("", "")
        if self.below:
            sys.stderr.write(f"{_ROOM_BELOW}{_SAVE}{_NEXT_LINE}{dim[0]}{status}{dim[1]}{_RESTORE}")
        else:
            sys.stderr.write(f"{_CLEAR_LINE}{dim[0]}{status}{dim[1]}")
        sys.stderr.flush()

    def _erase(self) -> None:
        if not self.drawn:  # also: erasing at a pending wrap would take the last character with it
            return
        self.drawn = False
        sys.stderr.write(_CLEAR_BELOW if self.below else _CLEAR_LINE)
        sys.stderr.flush()

    def _write(self, text: str) -> None:
        self.out.text(text)
        if text:
            self.ends_with_newline = text.endswith("\n")

    def piece(self, text: str) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.close()
            if self.show_thinking and self.thinking:  # the answer on a line of its own after the reasoning
                sys.stderr.write("\n")
            self.first = now
            if self.live and not self.below:  # stdout is elsewhere: the status line ends here
                self._erase()
                self.live = False
        self.tokens += 1
        if self.below:
            self._erase()
        if self.wrap:  # a terminal: wrap at its width now, which a resize (SIGWINCH) changes mid-reply
            text = self._follow_width() + self.wrap.feed(text.translate(_CONTROLS))
        self._write(text)
        if self.below and self.wrap.col == self.columns:  # type: ignore[union-attr] (below: stdout a terminal)
            # The cursor sits past the last column, waiting to wrap; moving it to draw the
            # status would lose that state and the next character would overwrite this one.
            return
        if self.live:
            if now >= self.next_status:
                self.next_status = now + 1 / STATUS_HZ
                self._draw(self._status_text(now))
            elif self.below:
                self._draw(self.status)

    def _follow_width(self) -> str:
        columns = terminal_columns()
        if columns == self.columns:
            return ""
        self.columns, self.width = columns, columns - 1
        return self.wrap.resize(columns)  # type: ignore[union-attr] (called with a wrapper)

    def notice(self, event: Notice) -> None:
        self.close()
        self._erase()
        self.out.warn(event.text)

    def reasoning(self, event: Reasoning) -> None:
        """A thinking model's reasoning: dimmed on stderr when asked for, else a live count."""
        self.thinking += 1
        self.close()
        if self.show_thinking:
            self._erase()
            dim = (_DIM, _RESET) if self.out.color and self.out.stderr_tty else ("", "")
            sys.stderr.write(f"{dim[0]}{event.text.translate(_CONTROLS)}{dim[1]}")
            sys.stderr.flush()
        elif self.live:
            elapsed = time.perf_counter() - self.started
            self._draw(f"… thinking · {self.thinking} tok · {elapsed:.1f} s"[: self.width])

    def tool_call(self, event: ToolCalled) -> None:
        """A tool call: one JSON line on stdout, on a line of its own (a script reads the calls)."""
        self.close()
        self._erase()
        if self.wrap:
            self._write(self.wrap.flush())
        if not self.ends_with_newline:
            self._write("\n")
        self._write(json.dumps(call_data(event), ensure_ascii=False) + "\n")
        if self.wrap:
            self.wrap.col = 0

    def speculation(self, event: Speculation) -> None:
        self.spec = f" · spec {acceptance(event.accepted, event.drafted)}" if event.drafted else ""

    def progress(self, event: PrefillProgress) -> None:
        """The prompt is being read, a batch at a time, and this thread waits in llama.cpp for
        each (a large model's batch on a CPU takes many seconds): the seconds are counted on the
        status line by a ticker thread until the first piece (or anything else) comes."""
        if not self.live:
            return
        since = time.perf_counter() - event.elapsed_s
        reading = f"… reading the prompt: {event.prompt_tokens} tokens"
        with self._lock:
            self._erase()
            self._draw(f"{reading} · {event.elapsed_s:.1f} s"[: self.width])
        self.close()
        self._ticking.clear()
        self._ticker = threading.Thread(target=self._tick, args=(reading, since), name="localrun-status", daemon=True)
        self._ticker.start()

    def _tick(self, reading: str, since: float) -> None:
        while not self._ticking.wait(1 / STATUS_HZ):
            with self._lock:
                if not self._ticking.is_set():
                    self._draw(f"{reading} · {time.perf_counter() - since:.1f} s"[: self.width])

    def close(self) -> None:
        """Stop counting the seconds (drive() calls it however the stream ended)."""
        if self._ticker is not None:
            self._ticking.set()
            self._ticker.join()
            self._ticker = None

    def finish(self, stats: Stats) -> None:
        self.close()
        self._erase()
        if self.show_thinking and self.thinking and self.first is None:  # it ended thinking: the line ends
            sys.stderr.write("\n")
        if self.wrap:
            self._write(self.wrap.flush())
        if not self.ends_with_newline:
            self.out.text("\n")
        if self.show_stats:
            show_stats_line(self.out, stats, self.model)


class JsonRenderer:
    """One JSON object at the end: the text, the stats, and whatever `extra` says (the model)."""

    def __init__(self, out: Output, extra: dict[str, Any] | None = None):
        self.out = out
        self.extra = extra or {}
        self.parts: list[str] = []
        self.tokens: list[SampledToken] | None = None  # with --logprobs
        self.thoughts: list[str] = []  # a thinking model's reasoning
        self.calls: list[dict[str, Any]] = []  # run --tools: the calls the model wrote

    def piece(self, text: str) -> None:
        self.parts.append(text)

    def tool_call(self, event: ToolCalled) -> None:
        self.calls.append(call_data(event))

    def reasoning(self, event: Reasoning) -> None:
        self.thoughts.append(event.text)

    def logprobs(self, tokens: list[SampledToken]) -> None:
        self.tokens = (self.tokens or []) + tokens

    def progress(self, event: PrefillProgress) -> None:
        pass

    def notice(self, event: Notice) -> None:  # stdout holds only the object: notes go to stderr
        self.out.warn(event.text)

    def finish(self, stats: Stats) -> None:
        data = dict(self.extra)
        data["text"] = "".join(self.parts)
        if self.thoughts:
            data["reasoning"] = "".join(self.thoughts)
        if self.calls:
            data["tool_calls"] = self.calls
        if self.tokens is not None:
            data["logprobs"] = [t.to_dict() for t in self.tokens]
        data.update({k: v for k, v in stats.to_dict().items() if k != "kind"})
        self.out.data(data)


class JsonLinesRenderer:
    """JSON Lines: one {"kind": "piece", "text": ...} per piece, then {"kind": "stats", ...}."""

    def __init__(self, out: Output, extra: dict[str, Any] | None = None):
        self.out = out
        if extra:
            out.json_line({"kind": "start", **extra})
        self.tokens: list[SampledToken] = []  # with --logprobs: the piece's tokens

    def logprobs(self, tokens: list[SampledToken]) -> None:
        self.tokens = tokens

    def piece(self, text: str) -> None:
        line: dict[str, Any] = {"kind": "piece", "text": text}
        if self.tokens:
            line["logprobs"] = [t.to_dict() for t in self.tokens]
            self.tokens = []
        self.out.json_line(line)

    def progress(self, event: PrefillProgress) -> None:
        pass

    def notice(self, event: Notice) -> None:
        self.out.json_line(asdict(event))

    def reasoning(self, event: Reasoning) -> None:
        self.out.json_line({"kind": "reasoning", "text": event.text})

    def tool_call(self, event: ToolCalled) -> None:
        self.out.json_line({"kind": "tool_call", **call_data(event)})

    def finish(self, stats: Stats) -> None:
        self.out.json_line(stats.to_dict())


def make_renderer(
    out: Output,
    *,
    stream: bool = False,
    extra: dict[str, Any] | None = None,
    show_stats: bool = True,
    model: str | None = None,
    show_thinking: bool = False,
) -> EventSink:
    if out.json:
        return JsonLinesRenderer(out, extra) if stream else JsonRenderer(out, extra)
    return LiveRenderer(out, show_stats=show_stats, model=model, show_thinking=show_thinking)
