"""`localrun pull`: choose the quantization that fits this machine, say why, download it safely."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from localrun import fit
from localrun.commands.planning import PullResult, Row, memory_need, plan_pull
from localrun.commands.progress import RichDownloadProgress
from localrun.errors import NetworkError, NoSpace
from localrun.hardware import Machine
from localrun.hub.download import DownloadProgress, download
from localrun.hub.listing import RepoQuant
from localrun.hub.settings import offline
from localrun.inference.machine import this_machine
from localrun.model.refs import ModelRef
from localrun.output import Output
from localrun.store.resolve import resolve
from localrun.text import human_bytes, safe


# -- the command ---------------------------------------------------------------------------------
def pull(
    ref: ModelRef,
    out: Output,
    *,
    machine: Machine | None = None,
    n_ctx: int | None = None,
    dry_run: bool = False,
    quant: str | None = None,
    as_step: bool = False,
    shape: fit.Shape = fit.Shape(),
    progress: DownloadProgress | None = None,
) -> PullResult:
    """Plan, show the table and why, download the choice (resumable, verified).

    as_step: the pull serves another command (chat, run...), whose stdout is its own: report on stderr.
    progress: where the download's progress goes (default: a bar on a terminal's stderr).
    """
    console = out.err if as_step else out.out
    show = console.print
    if offline() and not ref.is_local:
        return _pull_offline(ref, out, quant, show, machine, n_ctx, shape)
    machine = machine or this_machine(out.info)
    result, listing = plan_pull(
        ref, machine, n_ctx=n_ctx, quant=quant, reading=out.err.status if out.interactive else None, shape=shape
    )
    result.dry_run = dry_run
    if not out.json:
        show_table(out, console, result)
    for skipped in listing.skipped:
        out.warn(f"skipped an incomplete split: {skipped}")
    if result.chosen is None:
        if dry_run:
            return result
        raise NoSpace(
            f"no quantization of {listing.repo_id} fits this machine",
            hint="try a smaller --ctx, or name one with --quant to download it anyway",
        )
    row = result.rows[result.chosen]
    beyond = [n for n in row.plan.notes if n.kind == "beyond_trained"] if row.plan is not None else []
    if beyond and not as_step:  # a run says its plan's notes itself
        n_ctx, trained = beyond[0].figures
        out.warn(
            f"a context of {n_ctx} is beyond the {trained} tokens this model was trained with: "
            "expect worse output past that"
        )
    if result.forced and not row.fits:
        out.warn(
            f"{safe(row.quant.label)} will not fit in memory ({memory_need(row)})"
            + ("" if dry_run else "; downloading it as asked")
        )
    if dry_run:
        return result
    watched = _Watched(progress if progress is not None else RichDownloadProgress(out))
    result.files = download(listing, row.quant, watched)  # which ends the display, whatever happens
    result.already_there = not watched.downloaded
    if not out.json:
        # A path and a command, to copy: printed whole (soft_wrap), never broken by a newline.
        done = "already pulled:" if result.already_there else "saved"
        show(f"{done} {safe(result.files[0], None)}", markup=False, soft_wrap=True)
        if out.interactive and not as_step:
            out.line(f"chat with it: localrun chat {listing.repo_id}:{row.quant.label}")
    return result


class _Watched:
    """A progress display, and whether any byte had to be fetched."""

    def __init__(self, shown: DownloadProgress):
        self.shown = shown
        self.downloaded = False

    def message(self, text: str, *, warning: bool = False) -> None:
        self.shown.message(text, warning=warning)

    def begin(self, label: str, total: int, done: int) -> None:
        self.downloaded = done < total
        self.shown.begin(label, total, done)

    def update(self, done: int, description: str) -> None:
        self.shown.update(done, description)

    def end(self) -> None:
        self.shown.end()


def _pull_offline(
    ref: ModelRef,
    out: Output,
    quant: str | None,
    show: Callable[..., None],
    machine: Machine | None,
    n_ctx: int | None,
    shape: fit.Shape,
) -> PullResult:
    """HF_HUB_OFFLINE: nothing can be listed; a model already in the cache is all there is."""
    if quant:
        ref = ref.with_tag(quant)
    found = resolve(ref, machine or this_machine(out.info), n_ctx, shape=shape)
    if found is None:
        raise NetworkError(
            f"offline (HF_HUB_OFFLINE=1) and {ref} is not in the cache", hint="unset HF_HUB_OFFLINE to download it"
        )
    model = found.model
    why = f"{safe(model.quant or model.path.name)}: already in the cache (offline, nothing was checked on the Hub)"
    if not out.json:
        show(why, markup=False)
        show(f"already pulled: {safe(model.path, None)}", markup=False, soft_wrap=True)
    repo_quant = RepoQuant(model.quant, [p.name for p in model.files], model.size, {})
    rows = [Row(repo_quant, found.header, found.plan)]
    return PullResult(ref.repo_id or "", None, rows, 0, why, files=list(model.files), already_there=True)


def show_table(out: Output, console: Console, result: PullResult) -> None:
    """The candidates, the choice marked, and why, on `console` (stdout, or stderr in a pull that
    serves another command)."""
    machine = result.machine
    where = ""
    if machine is not None:
        gpus = ", ".join(f"{g.name} {human_bytes(g.free)} free" for g in machine.gpus) or "no GPU"
        where = f" · {human_bytes(machine.ram_available)} RAM available, {gpus}"
    kv = {row.plan.kv_cache for row in result.rows if row.plan}
    if kv:
        where += f" · KV cache {', '.join(sorted(kv))}"
    console.print(f"[bold]{escape(result.repo_id)}[/] [dim]@ {(result.commit or '')[:7]}{escape(where)}[/]")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (
        ("", "left"),
        ("quant", "left"),
        ("size", "right"),
        ("ctx", "right"),
        ("max ctx", "right"),
        ("est. RAM", "right"),
        ("est. VRAM", "right"),
        ("placement", "left"),
        ("verdict", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=name != "verdict")  # type: ignore[arg-type]
    for i, row in enumerate(result.rows):
        est = row.plan.estimate if row.plan else None
        mark = "▶" if i == result.chosen else ""
        style = "bold" if i == result.chosen else ("dim" if not row.fits else None)
        table.add_row(
            mark,
            escape(safe(row.quant.label)),
            human_bytes(row.quant.size),
            str(row.plan.n_ctx) if row.plan else "-",
            str(row.plan.max_ctx) if row.plan and row.fits else "-",
            human_bytes(est.ram) if est else "-",
            human_bytes(est.vram) if est and est.vram else "-",
            row.placement(),
            escape(safe(row.verdict())),
            style=style,
        )
    out.table(table, console=console)
    console.print(result.why, markup=False)
