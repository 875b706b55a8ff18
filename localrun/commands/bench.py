"""`localrun bench`: measure the candidates with live progress, then show the table, the
recommendation and a bar chart (or JSON, CSV, Markdown)."""

from __future__ import annotations

import csv
import io
import time
from typing import Literal

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from localrun.bench.ranking import measured_ok, quality_metric, sorted_rows
from localrun.bench.results import BenchOptions, BenchResult, CandidateResult
from localrun.bench.runner import eta_seconds, resolve_candidates, run_bench
from localrun.commands.loading import obtain
from localrun.errors import EngineCrash
from localrun.output import Output
from localrun.text import human_bytes

PARETO_MARK = "*"
Format = Literal["table", "json", "csv", "markdown"]


def bench(models: list[str], opts: BenchOptions, out: Output, fmt: Format = "table") -> BenchResult:
    """Measure with live progress on stderr, then print the result as `fmt`."""
    candidates = resolve_candidates(models, opts, lambda ref: obtain(ref, out).model, out.info)
    with ProgressDisplay(out) as progress:
        result = run_bench(candidates, opts, out.info, progress)
    if fmt == "json":
        out.data(result.to_dict())
    elif fmt == "csv":
        out.text(to_csv(result))
    elif fmt == "markdown":
        out.text(to_markdown(result))
    else:
        show(out, result)
    for warning in result.warnings:
        out.warn(warning)
    if not result.interrupted and not any(r.status == "ok" for r in result.results):
        raise EngineCrash(
            "no candidate could be measured", hint="the NOTE column says why; --verbose shows llama.cpp's log"
        )
    return result


def _stat(stat) -> str:
    """mean ± sd with as many decimals as a rate of that size needs."""
    if stat is None:
        return "-"
    digits = 0 if stat.mean >= 100 else 1 if stat.mean >= 10 else 2
    return f"{stat.mean:.{digits}f} ± {stat.sd:.{digits}f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _status(r: CandidateResult) -> str:
    if r.status == "ok":
        return "reference" if r.reference else (r.note or "")
    if r.status == "pending":
        return "not measured (interrupted)"
    return f"{r.status}: {r.error}" if r.error else r.status


def row_cells(r: CandidateResult) -> dict[str, str]:
    return {
        "": PARETO_MARK if r.pareto else "",
        "model": r.label,
        "size": human_bytes(r.file_size),
        "pp t/s": _stat(r.pp),
        "tg t/s": _stat(r.tg),
        "TTFT ms": _stat(r.ttft_ms),
        "load s": _num(r.load_s, ".2f"),
        "RSS": "-" if r.peak_rss is None else human_bytes(r.peak_rss),
        "PPL": _num(r.ppl, ".3f"),
        "KLD": _num(r.kld, ".4f"),
        "top-1": "-" if r.top1 is None else f"{100 * r.top1:.1f}%",
        "note": _status(r),
    }


def caption(bench: BenchResult) -> str:
    s = bench.settings
    scored = next((r for r in bench.results if r.ppl_windows), None)
    parts = [f"pp{s['pp']} / tg{s['tg']}, {s['reps']} reps, {s['threads']} threads, {s['gpu_layers']} GPU layers"]
    if scored:
        parts.append(f"PPL over {scored.ppl_windows} windows of {s['ppl_ctx']} tokens")
    if bench.reference:
        parts.append(f"KLD against {bench.reference}")
    parts.append(f"{PARETO_MARK} Pareto-optimal: no other candidate both faster (tg) and closer")
    return "; ".join(parts)


def show(out: Output, bench: BenchResult) -> None:
    """The table, the recommendation and the bar chart on stdout."""
    rows = [row_cells(r) for r in sorted_rows(bench.results)]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in rows[0]:
        if name == "note" and not any(cells["note"] for cells in rows):
            continue
        table.add_column(
            name.upper() if name in ("model", "size", "note") else name,
            justify="left" if name in ("", "model", "note") else "right",
            no_wrap=name != "note",
            overflow="fold",
        )
    for cells in rows:
        table.add_row(*(Text(v) for v in list(cells.values())[: len(table.columns)]))
    if out.stdout_tty:
        out.show(table)
    else:  # piped into a file or a pager the rows stay whole, whatever COLUMNS says
        wide = Console(file=io.StringIO(), width=max(out.out.width, 240), no_color=True, highlight=False)
        with wide.capture() as captured:
            wide.print(table)
        out.text("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    out.show(Text(caption(bench), style="dim"))
    if bench.recommendation:
        out.show(Text("\nrecommended: " + bench.recommendation.text, style="bold"))
    chart = bar_chart(bench)
    if chart:
        out.show(Text("\n" + chart))


def _bar(value: float, top: float, width: int) -> str:
    eighths = round(8 * width * value / top) if top > 0 else 0
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def bar_chart(bench: BenchResult, width: int = 40) -> str:
    """Generation speed and KL divergence per candidate, as bars of block characters."""
    rows = sorted_rows(measured_ok(bench.results))
    if not rows:
        return ""
    name_width = max(len(r.label) for r in rows)
    lines = ["generation speed (tg, tok/s)"]
    top = max(r.tg.mean for r in rows)  # type: ignore[union-attr]
    for r in rows:
        lines.append(f"  {r.label:<{name_width}}  {_bar(r.tg.mean, top, width):<{width}}  {r.tg.mean:.1f}")  # type: ignore[union-attr]
    if quality_metric(rows) == "kld" and len(rows) > 1:
        lines.append(f"KL divergence against {bench.reference} (lower is closer)")
        top = max(r.kld or 0.0 for r in rows)
        for r in rows:
            lines.append(f"  {r.label:<{name_width}}  {_bar(r.kld or 0.0, top, width):<{width}}  {r.kld:.4f}")
    return "\n".join(lines)


CSV_FIELDS = (
    "label",
    "quant",
    "path",
    "file_size",
    "status",
    "reference",
    "pareto",
    "pp_mean",
    "pp_sd",
    "tg_mean",
    "tg_sd",
    "ttft_ms_mean",
    "ttft_ms_sd",
    "load_s",
    "peak_rss",
    "vram",
    "threads",
    "gpu_layers",
    "ppl",
    "ppl_error",
    "kld",
    "kld_p99",
    "top1",
    "eval_tokens",
    "signal",
    "error",
    "note",
)


def to_csv(bench: BenchResult) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for r in sorted_rows(bench.results):
        row = {k: v for k, v in r.to_dict().items() if k in CSV_FIELDS}
        for name in ("pp", "tg", "ttft_ms"):
            stat = getattr(r, name)
            row[f"{name}_mean"] = None if stat is None else round(stat.mean, 3)
            row[f"{name}_sd"] = None if stat is None else round(stat.sd, 3)
        writer.writerow(row)
    return buf.getvalue()


def to_markdown(bench: BenchResult) -> str:
    rows = [row_cells(r) for r in sorted_rows(bench.results)]
    names = list(rows[0])
    lines = [
        "| " + " | ".join(n or "Pareto" for n in names) + " |",
        "| " + " | ".join("---" if n in ("", "model", "note") else "---:" for n in names) + " |",
    ]
    for cells in rows:
        lines.append("| " + " | ".join(v.replace("|", "\\|") for v in cells.values()) + " |")
    lines += ["", caption(bench).replace(PARETO_MARK + " Pareto", "Pareto", 1) + "."]
    if bench.recommendation:
        lines += ["", f"**Recommended:** {bench.recommendation.text}"]
    return "\n".join(lines) + "\n"


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
            f"{_duration(now - self.started)} elapsed  ·  {eta_text}"
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
                    summary = _status(result)
                self.out.info(f"[{index + 1}/{len(results)}] {result.label}: {summary}")
            return
        phase = event.get("phase", "")
        if event.get("reps") and phase != "load":
            phase += f" {event.get('rep')}/{event.get('reps')}"
        self.phase = phase
        if self.live is not None:
            self.live.refresh()
