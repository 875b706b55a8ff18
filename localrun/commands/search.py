"""`localrun search`: GGUF repos on the Hub, each with the best quantization that fits this machine.

The Hub's search lists the repos. For each one, pull's own planner (commands/planning.py) lists
its quantizations, reads their headers with HTTP Range requests and chooses, so the choice shown
is the one `pull --dry-run` makes. Repos are planned a few at a time (each reads its headers a few
at a time too); the listing is kept per repo and commit (hub/repo_cache.py) and each header by
its files' content (model.header.known_header, which pull reads too), so a second search asks the
Hub for the list alone, and a pull after a search reads no header again.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone

from localrun import fit
from localrun.commands.planning import PullResult, Row, memory_figures, plan_rows, read_headers, rows_of
from localrun.errors import BadModel, LocalrunError, NotFound, UsageError
from localrun.hardware import Machine
from localrun.hub import repo_cache
from localrun.hub.errors import translate_hub_error
from localrun.hub.listing import RepoNotFound, list_quants
from localrun.hub.search import SORTS, HubModel, params_range, search_models
from localrun.hub.settings import any_token
from localrun.inference.machine import this_machine
from localrun.model.header import HeaderInfo
from localrun.model.refs import parse_ref
from localrun.output import Output
from localrun.text import count, human_bytes, plural, safe

REPO_PLANNERS = 4  # repos planned at once (each reads up to planning.HEADER_READERS headers at once)
MAX_LIMIT = 100


@dataclass
class Found:
    """One repo of the search, with pull's plan for it, or the reason there is none."""

    model: HubModel
    plan: PullResult | None = None
    note: str | None = None  # why there is no plan: gated, no GGUF model file, an error
    cached: bool = False  # its listing and headers were read by an earlier search

    @property
    def best(self) -> Row | None:
        """The candidate pull would choose; None when nothing fits."""
        if self.plan is None or self.plan.chosen is None:
            return None
        return self.plan.rows[self.plan.chosen]

    @property
    def fits(self) -> bool:
        return self.best is not None and self.best.fits

    @property
    def architecture(self) -> str | None:
        """The Hub's word for it, else its header's."""
        header = next((r.header for r in self.plan.rows if r.header), None) if self.plan else None
        return self.model.architecture or (header.architecture if header else None)

    @property
    def smallest(self) -> Row | None:
        """The candidate that needs the least memory: what a repo too big for this machine quotes."""
        planned = [r for r in self.plan.rows if r.plan] if self.plan else []
        return min(planned, key=need, default=None)

    def to_dict(self) -> dict:
        best, smallest = self.best, self.smallest
        return {
            **self.model.to_dict(),
            "fits": self.fits,
            "best": best.to_dict() if best else None,
            "smallest": smallest.to_dict() if smallest and not best else None,
            "why": self.plan.why if self.plan else None,
            "note": self.note,
            "from_cache": self.cached,
            "candidates": [r.to_dict() for r in self.plan.rows] if self.plan else [],
        }


@dataclass
class SearchResult:
    query: str | None
    sort: str
    found: list[Found]  # in the Hub's order
    machine: Machine
    fits_only: bool = False
    arch: str | None = None  # only this architecture

    @property
    def shown(self) -> list[Found]:
        return [f for f in self.found if (f.fits or not self.fits_only) and _same_arch(f.architecture, self.arch)]

    def to_dict(self) -> dict:
        return {
            "query": self.query,
            "sort": self.sort,
            "fits_only": self.fits_only,
            "arch": self.arch,
            "machine": self.machine.to_dict(),
            "results": [f.to_dict() for f in self.shown],
        }


def _same_arch(architecture: str | None, wanted: str | None) -> bool:
    return wanted is None or (architecture or "").lower() == wanted.lower()


def need(row: Row) -> int:
    """The memory a planned candidate needs, RAM and VRAM together."""
    assert row.plan is not None
    return row.plan.estimate.ram + row.plan.estimate.vram


# -- computing -----------------------------------------------------------------------------------
def plan_repo(model: HubModel, machine: Machine, n_ctx: int | None = None, shape: fit.Shape = fit.Shape()) -> Found:
    """Pull's plan for one repo at the commit the search reported, from what an earlier search
    kept when it can. A gated repo is not read without a token; an error becomes its note."""
    if model.gated and not any_token():
        return Found(model, note="gated: accept its licence on the Hub, then set HF_TOKEN")
    try:
        ref = parse_ref(model.repo_id, model.commit, expand=False)
    except UsageError:
        ref = None
    if ref is None or ref.repo_id != model.repo_id or ref.tag or ref.filename:  # the answer came from the network
        return Found(model, note="not a repo name localrun can use")
    kept = repo_cache.recall(model.repo_id, model.commit) if model.commit else None
    if isinstance(kept, LocalrunError):
        return Found(model, note=_note(model, kept), cached=True)
    try:
        listing = kept if kept is not None else list_quants(ref, suggest=False)
        if kept is None:
            repo_cache.remember(listing)
        headers = read_headers(listing)  # each kept by its content: read once, by search or pull
        result = plan_rows(listing, rows_of(listing, headers), machine, n_ctx=n_ctx, shape=shape)
    except Exception as exc:  # one repo's failure is its row's note, not the end of the search
        known = exc if isinstance(exc, LocalrunError) else translate_hub_error(exc)
        if known is None:
            raise
        lasting = isinstance(known, (NotFound, BadModel)) and not isinstance(known, RepoNotFound)
        if lasting and model.commit:  # what this commit holds: for good (a token may reach a private repo)
            repo_cache.remember_problem(model.repo_id, model.commit, known)
        return Found(model, note=_note(model, known))
    return Found(model, result, cached=kept is not None and all(isinstance(h, HeaderInfo) for h in headers))


def _note(model: HubModel, problem: LocalrunError) -> str:
    """The problem in words that follow the repo's name."""
    message = problem.message
    for prefix in (f"{model.repo_id}: ", f"{model.repo_id} "):
        message = message.removeprefix(prefix)
    return message


def search(
    query: str | None,
    out: Output,
    *,
    sort: str = "downloads",
    limit: int = 20,
    author: str | None = None,
    fits_only: bool = False,
    arch: str | None = None,
    params: str | None = None,
    machine: Machine | None = None,
    n_ctx: int | None = None,
    shape: fit.Shape = fit.Shape(),
) -> SearchResult:
    """Search the Hub for GGUF repos and plan each for this machine, a few at a time. `params` is a
    range of parameter counts as `--params` takes it (1B-8B); `arch` keeps one architecture."""
    if sort not in SORTS:
        raise UsageError(f"unknown sort {safe(sort)!r}", hint="sort by " + ", ".join(SORTS))
    if not 1 <= limit <= MAX_LIMIT:
        raise UsageError(f"--limit must be between 1 and {MAX_LIMIT}")
    hub_range = params_range(params) if params else None
    models = search_models(query, sort=sort, limit=limit, author=author, params=hub_range)
    # the Hub cannot filter by architecture: leave out those it names otherwise (the rest, once read)
    models = [m for m in models if m.architecture is None or _same_arch(m.architecture, arch)]
    machine = machine or this_machine(out.info)
    found: list[Found | None] = [None] * len(models)
    pool = ThreadPoolExecutor(max_workers=REPO_PLANNERS)
    progress = out.err.status(_progress(0, len(models))) if out.interactive and models else nullcontext()
    try:
        with progress as status:
            futures = {pool.submit(plan_repo, m, machine, n_ctx, shape): i for i, m in enumerate(models)}
            for done, future in enumerate(as_completed(futures), 1):
                found[futures[future]] = future.result()
                if status is not None:
                    status.update(_progress(done, len(models)))
    finally:  # on Ctrl-C, do not wait for the repos still queued
        pool.shutdown(wait=False, cancel_futures=True)
    return SearchResult(query, sort, [f for f in found if f is not None], machine, fits_only, arch)


def _progress(done: int, total: int) -> str:
    return f"fitting {plural(total, 'repo')} to this machine: {done} done..."


# -- rendering -----------------------------------------------------------------------------------
def _updated(iso: str | None, now: datetime | None = None) -> str:
    """How long ago, in a few characters: today, 3d, 5w, 8mo, 2y."""
    if not iso:
        return "-"
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    days = ((now or datetime.now(timezone.utc)) - then).days
    for unit, length in (("y", 365), ("mo", 30), ("w", 7), ("d", 1)):
        if days >= length:
            return f"{days // length}{unit}"
    return "today"


def _cells(found: Found) -> list[str]:
    model, best = found.model, found.best
    header = next((r.header for r in found.plan.rows if r.header), None) if found.plan else None
    params = model.n_params or (header.n_params if header else None)
    arch = found.architecture
    cells = [
        safe(model.repo_id, None),
        count(params) if params else "-",
        safe(arch or "-", 12),
        count(model.downloads),
        count(model.likes),
        _updated(model.last_modified),
    ]
    if best is not None and best.fits:
        assert best.plan is not None
        return [
            *cells,
            safe(best.quant.label, 16),
            human_bytes(best.quant.size),
            memory_figures(best),
            str(best.plan.max_ctx),
        ]
    smallest = found.smallest
    if found.plan is not None and smallest is not None:
        return [*cells, "too big", human_bytes(smallest.quant.size), memory_figures(smallest), "-"]
    return [*cells, "gated" if model.gated and found.note else "-", "-", "-", "-"]


def show_search(out: Output, result: SearchResult) -> None:
    if out.json:
        out.data(result.to_dict())
        return
    shown = result.shown
    if not shown:
        what = f"matching {safe(result.query)!r} " if result.query else ""
        what += f"of architecture {safe(result.arch)} " if result.arch else ""
        fitting = " that fit this machine" if result.fits_only and result.found else ""
        out.info(f"no GGUF repos {what}found on the Hub{fitting}")
        return
    header = ["repo", "params", "arch", "downloads", "likes", "updated", "fit", "size", "needs", "ctx"]
    out.columns(header, [_cells(f) for f in shown], right=("params", "downloads", "likes", "size", "needs", "ctx"))
    for found in shown:
        if found.note and not found.model.gated:
            out.info(f"{safe(found.model.repo_id)}: {found.note}")
    machine = result.machine
    gpus = ", ".join(f"{g.name} {human_bytes(g.free)} free" for g in machine.gpus) or "no GPU"
    out.info(
        f"fit: the quantization `localrun pull` chooses here ({human_bytes(machine.ram_available)} RAM "
        f"available, {gpus}); needs: its estimated memory; ctx: the largest context it reaches; "
        "too big: the smallest quantization needs more"
    )
