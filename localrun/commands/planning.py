"""The plan behind `pull`: list a repo's quantizations, read each header with HTTP Range requests,
plan each for this machine and choose one. `pull --dry-run` shows it; `search` makes it for every
repo it finds.

The plan made here travels with the model: a command that pulls first (chat, run, bench) loads
the file with the very plan that chose it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localrun import fit
from localrun.errors import BadModel, UsageError
from localrun.hardware import Machine
from localrun.hub.listing import RepoListing, RepoQuant, list_quants
from localrun.hub.ranges import read_remote_header
from localrun.model.files import ModelFiles
from localrun.model.header import HeaderInfo, keep_header, known_header
from localrun.model.refs import ModelRef
from localrun.store.resolve import Resolved
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
        if self.plan.placement == "split":
            return " + ".join(f"{share.layers} {share.where}" for share in self.plan.split)
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
                "split": [asdict(share) for share in self.plan.split] if self.plan else [],
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
    tag = quant or ref.tag
    if tag or ref.filename:  # a quant or file that is not there is said before any header is read
        listing.select(tag=tag, filename=ref.filename)
    rows = rows_of(listing, read_headers(listing, reading))
    return plan_rows(listing, rows, machine, n_ctx=n_ctx, tag=tag, filename=ref.filename, shape=shape), listing


def plan_rows(
    listing: RepoListing,
    rows: list[Row],
    machine: Machine,
    *,
    n_ctx: int | None = None,
    tag: str | None = None,
    filename: str | None = None,
    shape: fit.Shape = fit.Shape(),
) -> PullResult:
    """Plan every candidate whose header was read for `machine` and choose one (or take the one
    `tag` or `filename` names): pull's choice, and search's for each repo it finds."""
    forced = listing.select(tag=tag, filename=filename) if (tag or filename) else None
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
    pick = fit.choose(options) if forced is None else None
    chosen = forced if forced is not None else (indexes[pick] if pick is not None else None)
    why = _why(rows, chosen, forced is not None, machine)
    return PullResult(
        listing.repo_id,
        listing.commit,
        rows,
        chosen,
        why,
        forced=forced is not None,
        mmproj=listing.mmproj,
        machine=machine,
    )


def rows_of(listing: RepoListing, headers: list[HeaderInfo | BadModel]) -> list[Row]:
    """The table's rows: each candidate with its header, or with the problem that kept it out."""
    return [
        Row(q, h) if isinstance(h, HeaderInfo) else Row(q, problem=_short(h.message, q, listing.repo_id), error=h)
        for q, h in zip(listing.quants, headers)
    ]


def read_headers(listing: RepoListing, reading: Callable[[str], Any] | None = None) -> list[HeaderInfo | BadModel]:
    """Every candidate's GGUF header over HTTP Range requests, a few at a time, or what made it
    unreadable; a header read before (by pull or search, of the same file content) is not read again. `reading(label)` gives a context manager to show while they are read (a spinner)."""

    def read(quant: RepoQuant) -> HeaderInfo | BadModel:
        content = [quant.sha256.get(f) for f in quant.files]
        known = known_header(content)
        if known is not None:
            return known
        try:
            sizes = [quant.sizes.get(f, 0) for f in quant.files]
            header = read_remote_header(listing.repo_id, quant.files, revision=listing.commit, sizes=sizes)
        except BadModel as exc:  # not kept: a header cut short by the network reads again next time
            return exc
        keep_header(content, header)
        return header

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


def memory_figures(row: Row) -> str:
    """The estimated memory of a row's plan, for a table cell: RAM, and VRAM when any."""
    assert row.plan is not None
    est = row.plan.estimate
    return human_bytes(est.ram) + (f" + {human_bytes(est.vram)} GPU" if est.vram else "")


def memory_need(row: Row) -> str:
    assert row.plan is not None
    est = row.plan.estimate
    return f"needs about {human_bytes(est.ram)} RAM" + (f" + {human_bytes(est.vram)} VRAM" if est.vram else "")


def _why(rows: list[Row], chosen: int | None, forced: bool, machine: Machine) -> str:
    """One line: what was chosen and what decided it."""
    if chosen is None:
        gpu = f" and {human_bytes(sum(g.free for g in machine.gpus))} free VRAM" if machine.gpus else ""
        if machine.workers:
            gpu += f" and {human_bytes(sum(w.free for w in machine.workers))} free on the workers"
        return (
            f"nothing fits in {human_bytes(machine.ram_available)} available RAM{gpu} "
            f"({human_bytes(fit.ram_headroom(machine))} of the RAM is kept free for the system)"
        )
    row = rows[chosen]
    plan = row.plan
    label = safe(row.quant.label)
    if plan is None or not plan.fits:
        return f"{label}: as asked" + (f" (won't fit: {memory_need(row)})" if plan else "")
    where = {
        "gpu": "runs fully on the GPU",
        "partial": "fits with part of it on the GPU",
        "cpu": "fits in RAM",
        "split": "fits across this machine and its workers",
    }.get(plan.placement, "fits")
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
