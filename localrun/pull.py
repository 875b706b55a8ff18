"""`localrun pull`: choose the quantization that fits this machine, say why, download it safely.

Also the one resolver every command uses to turn a model reference into a file to load:
a local path (validated), a pulled model (found in the HF cache, offline), or a pull.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from localrun import hub, quants
from localrun.errors import BadModel, NetworkError, NoSpace, NotFound, UsageError
from localrun.output import Output, human_bytes
from localrun.refs import ModelRef

if TYPE_CHECKING:
    from localrun.fit import Plan, Resources
    from localrun.gguf_info import HeaderInfo

HEADER_READERS = 4  # candidates whose headers are fetched at once


@dataclass
class LocalModel:
    path: Path  # the file to load (the first shard of a split)
    repo_id: str | None
    quant: str | None
    files: list[Path]


@dataclass
class Row:
    """One candidate of the table: its header (read remotely) and its memory plan."""

    candidate: hub.Candidate
    header: "HeaderInfo | None" = None
    plan: "Plan | None" = None
    problem: str | None = None  # e.g. the file is not GGUF: never chosen
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
        data = self.candidate.to_dict()
        est = self.plan.estimate if self.plan else None
        data.update({
            "ram": est.ram if est else None, "vram": est.vram if est else None,
            "placement": self.plan.placement if self.plan else None,
            "n_gpu_layers": self.plan.n_gpu_layers if self.plan else None,
            "n_ctx": self.plan.n_ctx if self.plan else None,
            "fits": self.fits, "note": self.plan.note if self.plan else None, "problem": self.problem,
        })
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
    resources: "Resources | None" = None

    @property
    def model(self) -> LocalModel | None:
        if not self.files:
            return None
        quant = self.rows[self.chosen].candidate.quant if self.chosen is not None else None
        return LocalModel(self.files[0], self.repo_id, quant, self.files)

    def to_dict(self) -> dict:
        chosen = self.rows[self.chosen] if self.chosen is not None else None
        return {
            "repo_id": self.repo_id, "commit": self.commit,
            "resources": asdict(self.resources) if self.resources else None,
            "candidates": [dict(r.to_dict(), chosen=i == self.chosen) for i, r in enumerate(self.rows)],
            "chosen": chosen.candidate.label if chosen else None, "why": self.why, "forced": self.forced,
            "dry_run": self.dry_run, "files": [str(p) for p in self.files], "mmproj": self.mmproj,
        }


# -- pull ----------------------------------------------------------------------------------------
def pull(ref: ModelRef, out: Output, *, n_ctx: int | None = None, dry_run: bool = False,
         quant: str | None = None, res: "Resources | None" = None, as_step: bool = False) -> PullResult:
    """List the repo's quantizations, plan each for this machine, show the table, download the choice.

    as_step: the pull serves another command (chat, run...), whose stdout is its own: report on stderr.
    """
    show = (out.err if as_step else out.out).print
    if ref.is_local:
        raise UsageError(f"{ref.raw} is a local file: pull takes a Hub repo (org/repo[:QUANT])")
    assert ref.repo_id is not None
    if hub.offline():
        return _pull_offline(ref, out, quant, show)
    from localrun import fit

    listing = hub.list_candidates(ref)
    wanted = quant or ref.tag
    forced = listing.select(tag=wanted, filename=ref.filename) if (wanted or ref.filename) else None
    rows = _read_headers(listing, out)
    if forced is not None and rows[forced].problem:
        raise BadModel(f"{rows[forced].candidate.files[0]}: {rows[forced].problem}")
    if all(r.problem for r in rows):
        raise BadModel(f"{listing.repo_id}: {rows[0].candidate.files[0]}: {rows[0].problem}")

    res = res if res is not None else fit.Resources.detect()
    options, indexes = [], []
    for i, row in enumerate(rows):
        if row.header is not None:
            row.plan = fit.plan(row.header, res, n_ctx)
            row.wanted_ctx = fit.default_ctx(row.header, n_ctx)
            info = quants.info(row.candidate.quant or "")
            options.append(fit.Option(row.candidate.label, info.quality if info else 0.0, row.candidate.size, row.plan))
            indexes.append(i)
    if forced is None:
        pick = fit.choose(options)
        chosen = indexes[pick] if pick is not None else None
    else:
        chosen = forced
    result = PullResult(listing.repo_id, listing.commit, rows, chosen, _why(rows, chosen, forced is not None, res),
                        forced=forced is not None, dry_run=dry_run, mmproj=listing.mmproj, resources=res)
    if not out.json:
        show_table(show, result)
    for skipped in listing.skipped:
        out.warn(f"skipped an incomplete split: {skipped}")
    if chosen is None:
        if dry_run:
            return result
        raise NoSpace(f"no quantization of {listing.repo_id} fits this machine",
                      hint="try a smaller --ctx, or name one with --quant to download it anyway")
    row = rows[chosen]
    if forced is not None and not row.fits:
        out.warn(f"{row.candidate.label} will not fit in memory ({_memory(row)})"
                 + ("" if dry_run else "; downloading it as asked"))
    if not dry_run:
        result.files = hub.download(listing, row.candidate, out)
        if not out.json:
            show(f"saved {result.files[0]}", markup=False)
            if out.interactive:
                out.info(f"chat with it: localrun chat {listing.repo_id}:{row.candidate.label}")
    return result


def _pull_offline(ref: ModelRef, out: Output, quant: str | None, show: Callable[..., None]) -> PullResult:
    """HF_HUB_OFFLINE: nothing can be listed; a model already in the cache is all there is."""
    if quant:
        ref = ModelRef(ref.raw, repo_id=ref.repo_id, tag=quant, revision=ref.revision)
    model = find_cached(ref)
    if model is None:
        raise NetworkError(f"offline (HF_HUB_OFFLINE=1) and {ref} is not in the cache",
                           hint="unset HF_HUB_OFFLINE to download it")
    why = f"{model.quant or model.path.name}: already in the cache (offline, nothing was checked on the Hub)"
    if not out.json:
        show(why, markup=False)
        show(f"saved {model.path}", markup=False)
    size = sum(p.stat().st_size for p in model.files)
    rows = [Row(hub.Candidate(model.quant, [p.name for p in model.files], size, {}))]
    return PullResult(ref.repo_id or "", None, rows, 0, why, files=model.files)


def _read_headers(listing: hub.RepoListing, out: Output) -> list[Row]:
    """Every candidate's GGUF header over HTTP Range requests, a few at a time."""
    from localrun import gguf_info

    def read(cand: hub.Candidate) -> Row:
        try:
            header = gguf_info.read_remote_header(listing.repo_id, cand.files, revision=listing.commit,
                                                  sizes=[cand.sizes.get(f, 0) for f in cand.files])
        except BadModel as exc:
            return Row(cand, problem=_short(exc.message, cand, listing.repo_id))
        return Row(cand, header)

    count = len(listing.candidates)
    label = f"reading the GGUF header{'s' * (count > 1)} of {count} file{'s' * (count > 1)}..."
    pool = ThreadPoolExecutor(max_workers=HEADER_READERS)
    try:
        if out.interactive:
            with out.err.status(label):
                return list(pool.map(read, listing.candidates))
        return list(pool.map(read, listing.candidates))
    finally:  # on Ctrl-C, do not wait for the reads still queued
        pool.shutdown(wait=False, cancel_futures=True)


def _short(message: str, cand: hub.Candidate, repo_id: str) -> str:
    """A header problem as a table cell: without the file name the row already shows."""
    for name in (*cand.files, cand.files[0].rsplit("/", 1)[-1]):
        for spelled in (f"{name} in {repo_id} ", f"{name}: ", f"{name} "):
            message = message.replace(spelled, "")
    return message


def _memory(row: Row) -> str:
    assert row.plan is not None
    est = row.plan.estimate
    return f"needs about {human_bytes(est.ram)} RAM" + (f" + {human_bytes(est.vram)} VRAM" if est.vram else "")


def _why(rows: list[Row], chosen: int | None, forced: bool, res: "Resources") -> str:
    """One line: what was chosen and what decided it."""
    if chosen is None:
        from localrun.fit import ram_headroom

        gpu = f" and {human_bytes(sum(d.free for d in res.gpus))} free VRAM" if res.gpus else ""
        return (f"nothing fits in {human_bytes(res.ram_available)} available RAM{gpu} "
                f"({human_bytes(ram_headroom(res))} of the RAM is kept free for the system)")
    row = rows[chosen]
    plan = row.plan
    if plan is None or not plan.fits:
        return f"{row.candidate.label}: as asked" + (f" (won't fit: {_memory(row)})" if plan else "")
    where = {"gpu": "runs fully on the GPU", "partial": "fits with part of it on the GPU",
             "cpu": "fits in RAM"}.get(plan.placement, "fits")
    if forced:
        why = f"{row.candidate.label}: as asked; it {where}"
    elif chosen == next(i for i, r in enumerate(rows) if r.plan is not None):
        why = f"{row.candidate.label}: the best quality here, and it {where}"
    else:
        why = f"{row.candidate.label}: the best quality that {where}"
    why += f" with {plan.n_ctx} ctx"
    if row.ctx_reduced:
        why += f" (reduced from {row.wanted_ctx} to fit)"
    return why


def show_table(show: Callable[..., None], result: PullResult) -> None:
    """The candidates, the choice marked, and why; `show` is a console's print (stdout, or stderr)."""
    from rich.markup import escape
    from rich.table import Table

    res = result.resources
    machine = ""
    if res is not None:
        gpus = ", ".join(f"{d.name} {human_bytes(d.free)} free" for d in res.gpus) or "no GPU"
        machine = f" · {human_bytes(res.ram_available)} RAM available, {gpus}"
    show(f"[bold]{escape(result.repo_id)}[/] [dim]@ {(result.commit or '')[:7]}{escape(machine)}[/]")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name, justify in (("", "left"), ("quant", "left"), ("size", "right"), ("ctx", "right"),
                          ("est. RAM", "right"), ("est. VRAM", "right"), ("placement", "left"), ("verdict", "left")):
        table.add_column(name, justify=justify, no_wrap=name != "verdict")  # type: ignore[arg-type]
    for i, row in enumerate(result.rows):
        est = row.plan.estimate if row.plan else None
        mark = "▶" if i == result.chosen else ""
        style = "bold" if i == result.chosen else ("dim" if not row.fits else None)
        table.add_row(mark, escape(row.candidate.label), human_bytes(row.candidate.size),
                      str(row.plan.n_ctx) if row.plan else "-",
                      human_bytes(est.ram) if est else "-", human_bytes(est.vram) if est and est.vram else "-",
                      row.placement(), escape(row.verdict()), style=style)
    show(table)
    show(result.why, markup=False)


# -- resolving a reference to a file to load -----------------------------------------------------


def resolve_model(ref: ModelRef, out: Output, *, allow_pull: bool = True) -> LocalModel:
    """A local path (validated), a pulled model found in the cache offline, or a pull first."""
    from localrun import gguf_info

    if ref.is_local:
        model = _local_model(ref)
    else:
        found = find_cached(ref)
        if found is None:
            if not allow_pull:
                raise NotFound(f"{ref} is not pulled", hint=f"run `localrun pull {ref}` first")
            found = pull(ref, out, as_step=True).model  # offline, pull() finds nothing cached and says so
            assert found is not None
        model = found
    gguf_info.validate(model.path)
    return model


def _local_model(ref: ModelRef) -> LocalModel:
    path = ref.path
    assert path is not None
    if not path.is_file():
        raise NotFound(f"no such model file: {path}")
    from localrun.gguf_info import shard_paths

    files = shard_paths(path)  # a split loads from its first shard; llama.cpp finds the rest
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BadModel(f"{path.name} is one shard of {len(files)}; missing: {', '.join(missing)}")
    return LocalModel(files[0], None, quants.quant_from_filename(path.name), files)


def find_cached(ref: ModelRef) -> LocalModel | None:
    """The model a repo reference names, if it is in the HF cache: no network. An explicit tag or
    file must match; otherwise the best quality present. Newest snapshot first."""
    assert ref.repo_id is not None
    snapshots = hub.repo_folder(ref.repo_id) / "snapshots"
    if not snapshots.is_dir():
        return None
    for snap in _snapshots(snapshots, ref.revision):
        files = {p.relative_to(snap).as_posix(): (p.stat().st_size, None)
                 for p in snap.rglob("*") if p.name.lower().endswith(".gguf") and p.is_file()}
        candidates, _, _ = hub.group_candidates(files)
        if not candidates:
            continue
        index = 0
        if ref.tag or ref.filename:
            try:
                index = hub.select(ref.repo_id, candidates, tag=ref.tag, filename=ref.filename)
            except NotFound:
                continue
        cand = candidates[index]
        paths = [snap / f for f in cand.files]
        return LocalModel(paths[0], ref.repo_id, cand.quant, paths)
    return None


def _snapshots(folder: Path, revision: str | None) -> list[Path]:
    refs = folder.parent / "refs"
    named = refs / (revision or "main")
    if revision and not named.is_file():
        return sorted(p for p in folder.iterdir() if p.name.startswith(revision))
    first = named.read_text().strip() if named.is_file() else None
    others = sorted((p for p in folder.iterdir() if p.is_dir() and p.name != first),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    return ([folder / first] if first and (folder / first).is_dir() else []) + (others if not revision else [])
