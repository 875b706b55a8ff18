"""`localrun bench`: measure the candidates with live progress, then show the table, the
recommendation and a bar chart (or JSON, CSV, Markdown)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Literal

from rich.console import Group
from rich.table import Table
from rich.text import Text

from localrun import __version__
from localrun.bench.ranking import by_model, measured_ok, quality_metric, sorted_rows
from localrun.bench.results import BenchOptions, BenchResult, CandidateResult, Stat
from localrun.bench.runner import resolve_candidates, run_bench
from localrun.commands.bench_progress import ProgressDisplay, status_text
from localrun.commands.loading import resolve_or_pull
from localrun.errors import EngineCrash, UsageError
from localrun.output import Output
from localrun.text import human_bytes, plural

PARETO_MARK = "*"
Format = Literal["table", "json", "csv", "markdown"]


def output_format(*, json: bool = False, csv: bool = False, markdown: bool = False) -> Format:
    """The one format asked for. Two at once are refused rather than one of them silently dropped."""
    asked = [name for name, on in (("--json", json), ("--csv", csv), ("--markdown", markdown)) if on]
    if len(asked) > 1:
        raise UsageError(f"{' and '.join(asked)} are different formats of the same result: choose one")
    return "json" if json else "csv" if csv else "markdown" if markdown else "table"


def bench(models: list[str], opts: BenchOptions, out: Output, fmt: Format = "table") -> BenchResult:
    """Measure with live progress on stderr, then print the result as `fmt`."""
    candidates = resolve_candidates(models, opts, lambda ref: resolve_or_pull(ref, out).model, out.info)
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


def _stat(stat: Stat | None, digits: int) -> str:
    """mean ± sd; a figure measured once has no spread to show."""
    if stat is None:
        return "-"
    return f"{stat.mean:.{digits}f}" + (f" ± {stat.sd:.{digits}f}" if stat.n > 1 else "")


def _digits(stats: list[Stat | None]) -> int:
    """Decimals for a whole column, as many as its smallest figure needs: one rule per column,
    so that 79.8 ± 10.2 does not stand beside 183 ± 29."""
    means = [s.mean for s in stats if s is not None]
    if not means:
        return 0
    low = min(means)
    return 0 if low >= 100 else 1 if low >= 10 else 2


def column_digits(results: list[CandidateResult]) -> dict[str, int]:
    return {name: _digits([getattr(r, name) for r in results]) for name in ("pp", "tg", "ttft_ms")}


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _kld(value: float | None) -> str:
    """KLD with its magnitude visible: 0.0123, or 2.0e-08 rather than a misleading 0.0000."""
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.4f}" if value >= 0.001 else f"{value:.1e}"


def row_cells(r: CandidateResult, digits: dict[str, int] | None = None) -> dict[str, str]:
    """A row's cells; `digits`: the decimals of each speed column (column_digits of every row)."""
    digits = digits or column_digits([r])
    return {
        "": PARETO_MARK if r.pareto else "",
        "model": r.label,
        "size": human_bytes(r.file_size),
        "pp t/s": _stat(r.pp, digits["pp"]),
        "tg t/s": _stat(r.tg, digits["tg"]),
        "TTFT ms": _stat(r.ttft_ms, digits["ttft_ms"]),
        "load s": _num(r.load_s, ".2f"),
        "RSS": "-" if r.peak_rss is None else human_bytes(r.peak_rss),
        "PPL": "-" if r.ppl is None else f"{r.ppl:.3f} ± {r.ppl_error or 0.0:.3f}",
        "KLD": _kld(r.kld),
        "top-1": "-" if r.top1 is None else f"{100 * r.top1:.1f}%",
        "note": status_text(r),
    }


# On a narrow terminal these columns go first, in this order (PPL only where KLD is shown); the
# Pareto mark, the model, tg, KLD and the note always stay (--json and --csv have every column).
DROP_ORDER = ("load s", "TTFT ms", "top-1", "size", "pp t/s", "RSS", "PPL")
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
        if name in names and (name != "PPL" or "KLD" in names):
            names.remove(name)
            dropped.append(name)
    return names, dropped


def table_rows(bench: BenchResult) -> list[dict[str, str] | None]:
    """The cells of each row, model by model; None between two models' rows."""
    digits = column_digits(bench.results)
    rows: list[dict[str, str] | None] = []
    for group in by_model(sorted_rows(bench.results)).values():
        if rows:
            rows.append(None)
        rows += [row_cells(r, digits) for r in group]
    return rows


def _layers(settings: dict) -> str:
    """Where the layers ran: on GPUs here, or split across this machine and its workers."""
    workers = settings.get("workers") or []
    if workers:
        return f"layers split with {plural(len(workers), 'worker')} ({', '.join(workers)}) as each plan said"
    return f"{settings['gpu_layers']} GPU layers"


def caption(bench: BenchResult) -> str:
    s = bench.settings
    scored = next((r for r in bench.results if r.ppl_windows), None)
    several = len(bench.models) > 1
    parts = [f"pp{s['pp']} / tg{s['tg']}, {plural(s['reps'], 'rep')}, {plural(s['threads'], 'thread')}, {_layers(s)}"]
    if not s.get("quality", True):
        parts.append("speed only (--no-quality): no perplexity or KLD, so no recommendation")
    if scored:
        parts.append(f"PPL ± its standard error over {scored.ppl_windows} windows of {s['ppl_ctx']} tokens")
    if several and any(m.reference for m in bench.models):
        parts.append("KLD of each model's quants against its most precise one (the reference)")
    elif bench.reference:
        parts.append(f"KLD against {bench.reference}")
    closer = (
        "closer" if any(m.reference for m in bench.models) or bench.reference or scored else "more precise (quant type)"
    )
    other = "no other quant of the same model" if several else "no other candidate"
    parts.append(f"{PARETO_MARK} Pareto-optimal: {other} both faster (tg) and {closer}")
    return "; ".join(parts)


def recommendations(bench: BenchResult) -> list[str]:
    """One per model that has one."""
    if bench.models:
        return [m.recommendation.text for m in bench.models if m.recommendation]
    return [bench.recommendation.text] if bench.recommendation else []


def show(out: Output, bench: BenchResult) -> None:
    """The table, the recommendation and the bar chart on stdout. On a terminal the table fits its
    width by leaving out the least important columns (and says which); piped, it has them all.
    Several models: their rows apart, each labelled with its model."""
    rows = table_rows(bench)
    cells = [r for r in rows if r is not None]
    width = out.out.width  # piped: 10,000 columns
    names, dropped = fit_columns(cells, width)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in names:
        table.add_column(  # only the note wraps, when nothing else is left to drop: a label is copied
            _title(name),
            justify="left" if name in ("", "model", "note") else "right",
            no_wrap=name != "note",
            overflow="fold",
        )
    for row in rows:
        table.add_row(*(Text(row[name]) if row else Text("") for name in names))
    out.table(table)  # piped into a file or a pager the rows stay whole, whatever COLUMNS says
    if dropped:
        shown = ", ".join(_title(n) for n in dropped)
        out.show(_para(f"not shown at {width} columns: {shown} (--json or --csv has every column)", "dim"))
    out.show(_para(caption(bench), "dim"))
    for i, text in enumerate(recommendations(bench)):
        out.show(_para(("\n" if i == 0 else "") + "recommended: " + text, "bold"))
    chart = bar_chart(bench, max(10, min(40, width - 16 - max((len(r.label) for r in bench.results), default=0))))
    for i, line in enumerate(chart.splitlines()):  # the titles are prose; the bars never wrap
        gap = "\n" if i == 0 else ""
        out.show(Text(line) if line.startswith("  ") else _para(gap + line, ""))


def _para(text: str, style: str) -> Group:
    """A paragraph wrapped at word boundaries on a terminal. Output's consoles leave long lines to
    the terminal, which breaks them mid-word; a Text inside a Group keeps its own no_wrap."""
    return Group(Text(text, style=style, no_wrap=False, overflow="fold"))


def _bar(value: float, top: float, width: int) -> str:
    eighths = min(round(8 * width * value / top), 8 * width) if top > 0 else 0
    return "█" * (eighths // 8) + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[eighths % 8]


def bar_chart(bench: BenchResult, width: int = 40) -> str:
    """Generation speed and KL divergence per candidate, as bars of block characters. Speed is
    drawn for every candidate, all models side by side; KLD within each model, against its own
    reference. KLD bars are to scale from 0 to the larger of the --max-kld bar and the largest
    KLD, so a negligible divergence gets no bar rather than the longest one."""
    rows = sorted_rows(measured_ok(bench.results))
    if not rows:
        return ""
    name_width = max(len(r.label) for r in rows)
    lines = ["generation speed (tg, tok/s)"]
    top = max(r.tg.mean for r in rows)  # type: ignore[union-attr]
    digits = column_digits(rows)["tg"]
    for r in rows:
        lines.append(f"  {r.label:<{name_width}}  {_bar(r.tg.mean, top, width):<{width}}  {r.tg.mean:.{digits}f}")  # type: ignore[union-attr]
    compared = [g for g in by_model(rows).values() if quality_metric(g) == "kld" and len(g) > 1]
    if compared:
        top = max(bench.settings.get("max_kld", 0.05), *(r.kld or 0.0 for g in compared for r in g))
        refs = [r.label for g in compared for r in g if r.reference]
        against = f"against {refs[0]}" if len(refs) == 1 else "of each model against its reference"
        lines.append(f"KL divergence {against} (lower is closer; full width = KLD {top:.3g})")
        for r in (r for g in compared for r in g):
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
    "model",
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
    rows = [row for row in table_rows(bench) if row is not None]
    names, _ = fit_columns(rows, 10_000)
    lines = [
        f"**localrun bench** of {_model_names(bench)}",
        "",
        f"- CPU: {m['cpu']} ({plural(m['physical_cores'] or 0, 'core')}), {plural(s['threads'], 'thread')}, "
        f"{_layers(s)}",
        f"- llama.cpp {m['llama_cpp']}, localrun {__version__}",
        f"- date: {bench.date}",
        "",
        "| " + " | ".join(n or "Pareto" for n in names) + " |",
        "| " + " | ".join("---" if n in ("", "model", "note") else "---:" for n in names) + " |",
    ]
    for cells in rows:
        lines.append("| " + " | ".join(cells[n].replace("|", "\\|") for n in names) + " |")
    lines += ["", caption(bench).replace(PARETO_MARK + " Pareto", "Pareto", 1) + "."]
    for text in recommendations(bench):
        lines += ["", f"**Recommended:** {text}"]
    lines += [f"\n> warning: {w}" for w in bench.warnings]
    return "\n".join(lines) + "\n"
