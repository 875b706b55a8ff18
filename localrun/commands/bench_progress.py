"""bench's live progress: which candidate, which phase, elapsed time and ETA."""

from __future__ import annotations

import time

from rich.live import Live
from rich.text import Text

from localrun.bench.results import CandidateResult
from localrun.bench.runner import eta_seconds
from localrun.output import Output


def status_text(r: CandidateResult) -> str:
    """What became of a candidate, for its NOTE cell and its progress line."""
    if r.status == "ok":
        return "reference" if r.reference else (r.note or "")
    if r.status == "pending":
        return "not measured (interrupted)"
    return f"{r.status}: {r.error}" if r.error else r.status


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressDisplay:
    """Which candidate, which phase, elapsed time and ETA: a live line on a TTY (redrawn from the
    clock four times a second, so it moves during phases that send no event for many seconds),
    one line per candidate otherwise."""

    def __init__(self, out: Output):
        self.out = out
        self.live: Live | None = None
        self.results: list[CandidateResult] = []
        self.started = time.perf_counter()
        self.current_started = self.started
        self.current = -1
        self.phase = ""

    def __enter__(self) -> ProgressDisplay:
        if self.out.interactive:
            self.live = Live(self, console=self.out.err, transient=True, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def __rich__(self) -> Text:
        """The line as of now: Live calls this on every refresh."""
        if self.current < 0:
            return Text("")
        now = time.perf_counter()
        eta = eta_seconds(self.results, self.current, now - self.current_started)
        eta_text = f"ETA {_duration(eta)}" if eta is not None else "ETA after the first candidate"
        return Text(
            f"[{self.current + 1}/{len(self.results)}] {self.results[self.current].label}: {self.phase}  ·  "
            f"{_duration(now - self.started)} elapsed  ·  {eta_text}",
            no_wrap=True,  # one line that is redrawn: cut to the terminal rather than wrapped onto two
            overflow="ellipsis",
        )

    def __call__(self, results: list[CandidateResult], index: int, event: dict) -> None:
        self.results, result = results, results[index]
        if index != self.current:
            self.current, self.current_started = index, time.perf_counter()
        if event.get("event") == "done":
            if self.live is None or result.status != "ok":
                if result.status == "ok" and result.tg:
                    summary = f"tg {result.tg.mean:.1f} tok/s" + (
                        f", PPL {result.ppl:.3f}" if result.ppl is not None else ""
                    )
                else:
                    summary = status_text(result)
                self.out.info(f"[{index + 1}/{len(results)}] {result.label}: {summary}")
            return
        phase = event.get("phase", "")
        if event.get("reps") and phase != "load":
            phase += f" {event.get('rep')}/{event.get('reps')}"
        self.phase = phase
        if self.live is not None:
            self.live.refresh()
