"""`localrun bench`: measure the candidates with live progress, then show the table, the
recommendation and a bar chart (or JSON, CSV, Markdown)."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Literal

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from localrun import __version__
from localrun.bench.ranking import measured_ok, quality_metric, sorted_rows
from localrun.bench.results import BenchOptions, BenchResult, CandidateResult
from localrun.bench.runner import eta_seconds, resolve_candidates, run_bench
from localrun.commands.loading import obtain
from localrun.errors import EngineCrash
from localrun.output import Output
from localrun.text import human_bytes, plural

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


def _kld(value: float | None) -> str:
    """KLD with its magnitude visible: 0.0123, or 2.0e-08 rather than a misleading 0.0000."""
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.4f}" if value >= 0.001 else f"{value:.1e}"


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
        "PPL": "-" if r.ppl is None else f"{r.ppl:.3f} ± {r.ppl_error or 0.0:.3f}",
        "KLD": _kld(r.kld),
        "top-1": "-" if r.top1 is None else f"{100 * r.top1:.1f}%",
        "note": _status(r),
    }


# On a narrow terminal these columns go first, in this order; the Pareto mark, the model, tg, the
# quality figures and the note always stay (--json and --csv have every column).
DROP_ORDER = ("load s", "TTFT ms", "top-1", "size", "pp t/s", "RSS")
NOTE_MIN = 24  # columns are dropped until the note has this much; then it wraps onto more lines
GAP = 2  # between columns: rich's padding of one space on each side


def _title(name: str) -> str:
    return name.upper() if name in ("model", "size", "note") else name


def fit_columns(rows: list[dict[str, str]], width: int) -> tuple[list[str], list[str]]:
    """The columns to show at `width` and those left out for room. Columns with no figure in any
    row (KLD without a reference, quality with --no-quality) are not shown either."""
    names = [n for n in rows[0] if n == "" or any(cells[n] not in ("", "-") for cells in rows)]

    def needed(cols: list[str]) -> int:
        widths = [
            min(max(len(c["note"]) for c in rows), NOTE_MIN)
            if n == "note"
            else max(len(_title(n)), *(len(c[n]) for c in rows))
            for n in cols
        ]
        return sum(widths) + GAP * (len(cols) - 1)

    dropped = []
    for name in DROP_ORDER:
        if needed(names) <= width:
            break
        if name in names:
            names.remove(name)
            dropped.append(name)
    return names, dropped


def caption(bench: BenchResult) -> str:
    s = bench.settings
    scored = next((r for r in bench.results if r.ppl_windows), None)
    parts = [
        f"pp{s['pp']} / tg{s['tg']}, {plural(s['reps'], 'rep')}, {plural(s['threads'], 'thread')}, "
        f"{s['gpu_layers']} GPU layers"
    ]
    if not s.get("quality", True):
        parts.append("speed only (--no-quality): no perplexity or KLD, so no recommendation")
    if scored:
        parts.append(f"PPL ± its standard error over {scored.ppl_windows} windows of {s['ppl_ctx']} tokens")
    if bench.reference:
        parts.append(f"KLD against {bench.reference}")
    closer = "closer" if bench.reference or scored else "more precise (quant type)"
    parts.append(f"{PARETO_MARK} Pareto-optimal: no other candidate both faster (tg) and {closer}")
    return "; ".join(parts)


def show(out: Output, bench: BenchResult) -> None:
    """The table, the recommendation and the bar chart on stdout. On a terminal the table fits its
    width by leaving out the least important columns (and says which); piped, it has them all."""
    rows = [row_cells(r) for r in sorted_rows(bench.results)]
    width = out.out.width  # piped: 10,000 columns
    names, dropped = fit_columns(rows, width)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in names:
        wraps = name in ("model", "note")  # only when nothing else is left to drop
        table.add_column(
            _title(name),
            justify="left" if name in ("", "model", "note") else "right",
            no_wrap=not wraps,
            overflow="fold",
        )
    for cells in rows:
        table.add_row(*(Text(cells[name]) for name in names))
    out.table(table)  # piped into a file or a pager the rows stay whole, whatever COLUMNS says
    if dropped:
        shown = ", ".join(_title(n) for n in dropped)
        out.show(_para(f"not shown at {width} columns: {shown} (--json or --csv has every column)", "dim"))
    out.show(_para(caption(bench), "dim"))
    if bench.recommendation:
        out.show(_para("\nrecommended: " + bench.recommendation.text, "bold"))
    chart = bar_chart(bench, max(10, min(40, width - 16 - max((len(r.label) for r in bench.results), default=0))))
    if chart:
        out.show(Text("\n" + chart))


def _para(text: str, style: str) -> Group:
    """A paragraph wrapped at word boundaries on a terminal. Output's consoles leave long lines to
    the terminal, which breaks them mid-word; a Text inside a Group keeps its own no_wrap."""
    return Group(Text(text, style=style, no_wrap=False, overflow="fold"))


def _bar(value: float, top: float, width: int) -> str:
    eighths = min(round(8 * width * value / top), 8 * width) if top > 0 else 0
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def bar_chart(bench: BenchResult, width: int = 40) -> str:
    """Generation speed and KL divergence per candidate, as bars of block characters. KLD bars are
    to scale from 0 to the larger of the --max-kld bar and the largest KLD, so a negligible
    divergence gets no bar rather than the longest one."""
    rows = sorted_rows(measured_ok(bench.results))
    if not rows:
        return ""
    name_width = max(len(r.label) for r in rows)
    lines = ["generation speed (tg, tok/s)"]
    top = max(r.tg.mean for r in rows)  # type: ignore[union-attr]
    for r in rows:
        lines.append(f"  {r.label:<{name_width}}  {_bar(r.tg.mean, top, width):<{width}}  {r.tg.mean:.1f}")  # type: ignore[union-attr]
    if quality_metric(rows) == "kld" and len(rows) > 1:
        top = max(bench.settings.get("max_kld", 0.05), *(r.kld or 0.0 for r in rows))
        lines.append(f"KL divergence against {bench.reference} (lower is closer; full width = KLD {top:.3g})")
        for r in rows:
            lines.append(f"  {r.label:<{name_width}}  {_bar(r.kld or 0.0, top, width):<{width}}  {_kld(r.kld)}")
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
    "repo",
    "others_cpu",
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


def _model_names(bench: BenchResult) -> str:
    """repo:QUANT for pulled models, the file name for local ones."""
    return ", ".join(f"`{r.repo}:{r.quant}`" if r.repo and r.quant else f"`{Path(r.path).name}`" for r in bench.results)


def to_markdown(bench: BenchResult) -> str:
    """A report to paste: what ran, where and when, then the table, the caption, the verdict."""
    s, m = bench.settings, bench.machine
    rows = [row_cells(r) for r in sorted_rows(bench.results)]
    names, _ = fit_columns(rows, 10_000)
    lines = [
        f"**localrun bench** of {_model_names(bench)}",
        "",
        f"- CPU: {m['cpu']} ({plural(m['physical_cores'] or 0, 'core')}), {plural(s['threads'], 'thread')}, "
        f"{s['gpu_layers']} GPU layers",
        f"- llama.cpp {m['llama_cpp']}, localrun {__version__}",
        f"- date: {bench.date}",
        "",
        "| " + " | ".join(n or "Pareto" for n in names) + " |",
        "| " + " | ".join("---" if n in ("", "model", "note") else "---:" for n in names) + " |",
    ]
    for cells in rows:
        lines.append("| " + " | ".join(cells[n].replace("|", "\\|") for n in names) + " |")
    lines += ["", caption(bench).replace(PARETO_MARK + " Pareto", "Pareto", 1) + "."]
    if bench.recommendation:
        lines += ["", f"**Recommended:** {bench.recommendation.text}"]
    lines += [f"\n> warning: {w}" for w in bench.warnings]
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
