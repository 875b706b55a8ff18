"""`localrun pull`: choose the quantization that fits this machine, say why, download it safely.

The plan made here travels with the model: a command that pulls first (chat, run, bench) loads
the file with the very plan that chose it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from localrun import fit
from localrun.cache.resolve import Resolved, resolve
from localrun.commands.progress import RichDownloadProgress
from localrun.errors import BadModel, NetworkError, NoSpace, UsageError
from localrun.hardware import Machine
from localrun.hub.download import download
from localrun.hub.listing import RepoListing, RepoQuant, list_quants
from localrun.hub.ranges import read_remote_header
from localrun.hub.settings import offline
from localrun.inference.selftest import this_machine
from localrun.model.files import ModelFiles
from localrun.model.header import HeaderInfo
from localrun.model.refs import ModelRef
from localrun.output import Output
from localrun.text import human_bytes, safe

HEADER_READERS = 4  # candidates whose headers are fetched at once


@dataclass
class Row:
    """One candidate of the table: its header (read remotely) and its memory plan."""

    quant: RepoQuant
    header: HeaderInfo | None = None
    plan: fit.Plan | None = None
    problem: str | None = None  # e.g. the file is not GGUF: never chosen
    error: BadModel | None = None  # the whole error behind `problem`, with its hint
    wanted_ctx: int | None = None  # the context asked for (or the default), before any reduction

    @property
    def ctx_reduced(self) -> bool:
        return self.plan is not None and self.wanted_ctx is not None and self.plan.n_ctx < self.wanted_ctx

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.fits

    def placement(self) -> str:
        if self.plan is None or not self.plan.fits:
            return "-"
        if self.plan.placement == "gpu":
            return "GPU"
        if self.plan.placement == "partial":
            total = self.header.n_layer + 1 if self.header else "?"
            return f"GPU {self.plan.n_gpu_layers}/{total} + CPU"
        return "CPU"

    def verdict(self) -> str:
        if self.problem:
            return self.problem
        if not self.fits:
            return "won't fit"
        return "fits, smaller ctx" if self.ctx_reduced else "fits"

    def to_dict(self) -> dict:
        data = self.quant.to_dict()
        est = self.plan.estimate if self.plan else None
        data.update(
            {
                "ram": est.ram if est else None,
                "vram": est.vram if est else None,
                "placement": self.plan.placement if self.plan else None,
                "n_gpu_layers": self.plan.n_gpu_layers if self.plan else None,
                "n_ctx": self.plan.n_ctx if self.plan else None,
                "max_ctx": self.plan.max_ctx if self.fits else None,
                "kv_cache": self.plan.kv_cache if self.plan else None,
                "fits": self.fits,
                "note": self.plan.note if self.plan else None,
                "problem": self.problem,
            }
        )
        return data


@dataclass
class PullResult:
    repo_id: str
    commit: str | None
    rows: list[Row]
    chosen: int | None  # index into rows
    why: str
    forced: bool = False  # named by --quant, a tag or a file name rather than chosen
    dry_run: bool = False
    files: list[Path] = field(default_factory=list)  # what was downloaded (or found), shard order
    mmproj: list[str] = field(default_factory=list)
    machine: Machine | None = None
    already_there: bool = False  # nothing had to be downloaded

    @property
    def resolved(self) -> Resolved | None:
        """The chosen model, its header and its plan, once its files are on disk."""
        if not self.files or self.chosen is None:
            return None
        row = self.rows[self.chosen]
        if row.header is None or row.plan is None:
            return None
        model = ModelFiles(tuple(self.files), f"{self.repo_id}:{row.quant.label}", row.quant.quant, self.repo_id)
        return Resolved(model, row.header, row.plan)

    def to_dict(self) -> dict:
        chosen = self.rows[self.chosen] if self.chosen is not None else None
        return {
            "repo_id": self.repo_id,
            "commit": self.commit,
            "machine": self.machine.to_dict() if self.machine else None,
            "candidates": [dict(r.to_dict(), chosen=i == self.chosen) for i, r in enumerate(self.rows)],
            "chosen": chosen.quant.label if chosen else None,
            "why": self.why,
            "forced": self.forced,
            "dry_run": self.dry_run,
            "files": [str(p) for p in self.files],
            "mmproj": self.mmproj,
        }


# -- planning ------------------------------------------------------------------------------------
def plan_pull(
    ref: ModelRef,
    machine: Machine,
    *,
    n_ctx: int | None = None,
    quant: str | None = None,
    reading: Callable[[str], Any] | None = None,
    shape: fit.Shape = fit.Shape(),
) -> tuple[PullResult, RepoListing]:
    """List the repo's quantizations, read each header over HTTP Range, plan each for `machine`
    and choose one (or take the one named). Nothing is downloaded."""
    if ref.is_local:
        raise UsageError(f"{ref.raw} is a local file: pull takes a Hub repo (org/repo[:QUANT])")
    assert ref.repo_id is not None
    if quant and (ref.tag or ref.filename) and (ref.tag or "").upper() != quant.upper():
        raise UsageError(
            f"{safe(ref.raw)} names {safe(ref.tag or ref.filename)} and --quant names {safe(quant)}",
            hint="name one of them",
        )
    listing = list_quants(ref)
    wanted = quant or ref.tag
    forced = listing.select(tag=wanted, filename=ref.filename) if (wanted or ref.filename) else None
    rows = _read_headers(listing, reading)
    if forced is not None and rows[forced].problem:
        raise _unusable(listing.repo_id, rows[forced])
    if all(r.problem for r in rows):
        raise _unusable(listing.repo_id, rows[0])
    options, indexes = [], []
    for i, row in enumerate(rows):
        if row.header is not None:
            option = fit.option(row.quant.label, row.quant.quant, row.quant.size, row.header, machine, n_ctx, shape)
            row.plan, row.wanted_ctx = option.plan, fit.default_ctx(row.header, n_ctx)
            options.append(option)
            indexes.append(i)
    if forced is None:
        pick = fit.choose(options)
        chosen = indexes[pick] if pick is not None else None
    else:
        chosen = forced
    why = _why(rows, chosen, forced is not None, machine)
    result = PullResult(
        listing.repo_id,
        listing.commit,
        rows,
        chosen,
        why,
        forced=forced is not None,
        mmproj=listing.mmproj,
        machine=machine,
    )
    return result, listing


def _read_headers(listing: RepoListing, reading: Callable[[str], Any] | None) -> list[Row]:
    """Every candidate's GGUF header over HTTP Range requests, a few at a time. `reading(label)`
    gives a context manager to show while they are read (a spinner)."""

    def read(quant: RepoQuant) -> Row:
        try:
            header = read_remote_header(
                listing.repo_id,
                quant.files,
                revision=listing.commit,
                sizes=[quant.sizes.get(f, 0) for f in quant.files],
            )
        except BadModel as exc:
            return Row(quant, problem=_short(exc.message, quant, listing.repo_id), error=exc)
        return Row(quant, header)

    count = len(listing.quants)
    label = f"reading the GGUF header{'s' * (count > 1)} of {count} file{'s' * (count > 1)}..."
    pool = ThreadPoolExecutor(max_workers=HEADER_READERS)
    try:
        if reading is not None:
            with reading(label):
                return list(pool.map(read, listing.quants))
        return list(pool.map(read, listing.quants))
    finally:  # on Ctrl-C, do not wait for the reads still queued
        pool.shutdown(wait=False, cancel_futures=True)


def _unusable(repo_id: str, row: Row) -> BadModel:
    """The error of a candidate that cannot be used, whole: its own words (which name the file) and hint."""
    error = row.error or BadModel(f"{safe(row.quant.files[0])}: {row.problem}")
    message = error.message if repo_id in error.message else f"{repo_id}: {error.message}"
    return BadModel(message, hint=error.hint)


def _short(message: str, quant: RepoQuant, repo_id: str) -> str:
    """A header problem as a table cell: without the file name the row already shows."""
    for name in (*quant.files, quant.files[0].rsplit("/", 1)[-1]):
        for spelled in (f"{safe(name)} in {repo_id} ", f"{safe(name)}: ", f"{safe(name)} "):
            message = message.replace(spelled, "")
    return message


def _memory(row: Row) -> str:
    assert row.plan is not None
    est = row.plan.estimate
    return f"needs about {human_bytes(est.ram)} RAM" + (f" + {human_bytes(est.vram)} VRAM" if est.vram else "")


def _why(rows: list[Row], chosen: int | None, forced: bool, machine: Machine) -> str:
    """One line: what was chosen and what decided it."""
    if chosen is None:
        gpu = f" and {human_bytes(sum(g.free for g in machine.gpus))} free VRAM" if machine.gpus else ""
        return (
            f"nothing fits in {human_bytes(machine.ram_available)} available RAM{gpu} "
            f"({human_bytes(fit.ram_headroom(machine))} of the RAM is kept free for the system)"
        )
    row = rows[chosen]
    plan = row.plan
    label = safe(row.quant.label)
    if plan is None or not plan.fits:
        return f"{label}: as asked" + (f" (won't fit: {_memory(row)})" if plan else "")
    where = {"gpu": "runs fully on the GPU", "partial": "fits with part of it on the GPU", "cpu": "fits in RAM"}.get(
        plan.placement, "fits"
    )
    if forced:
        why = f"{label}: as asked; it {where}"
    elif chosen == next(i for i, r in enumerate(rows) if r.plan is not None):
        why = f"{label}: the best quality here, and it {where}"
    else:
        why = f"{label}: the best quality that {where}"
    why += f" with {plan.n_ctx} ctx"
    if row.ctx_reduced:
        why += f" (reduced from {row.wanted_ctx} to fit)"
    return why


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
) -> PullResult:
    """Plan, show the table and why, download the choice (resumable, verified).

    as_step: the pull serves another command (chat, run...), whose stdout is its own: report on stderr.
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
    trained = row.header.n_ctx_train if row.header is not None else 0
    if not as_step and row.plan is not None and 0 < trained < row.plan.n_ctx:  # a run says its plan's note
        out.warn(
            f"a context of {row.plan.n_ctx} is beyond the {trained} tokens this model was "
            "trained with: expect worse output past that"
        )
    if result.forced and not row.fits:
        out.warn(
            f"{safe(row.quant.label)} will not fit in memory ({_memory(row)})"
            + ("" if dry_run else "; downloading it as asked")
        )
    if dry_run:
        return result
    with RichDownloadProgress(out) as progress:
        result.files = download(listing, row.quant, progress)
    result.already_there = not progress.downloaded
    if not out.json:
        # A path and a command, to copy: printed whole (soft_wrap), never broken by a newline.
        done = "already pulled:" if result.already_there else "saved"
        show(f"{done} {safe(result.files[0], None)}", markup=False, soft_wrap=True)
        if out.interactive and not as_step:
            out.line(f"chat with it: localrun chat {listing.repo_id}:{row.quant.label}")
    return result


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
