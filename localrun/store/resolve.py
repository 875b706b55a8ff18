"""The one resolver: a model reference -> the model to load, with its header and its plan.

Every command goes through here: chat, run, bench, show, rm, list (and serve). A local path is
validated and planned; a repo reference is looked up among the pulled models, offline: a tag or
file names one; without, the planner chooses among those present (the best quality that fits
this machine), as `pull` would. A damaged entry (a blob deleted by hand) is never chosen, and a
file whose sha256 check a pull did not finish is checked here before anything loads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from localrun import fit
from localrun.errors import BadModel, LocalrunError, UsageError
from localrun.hardware import Machine
from localrun.hub import integrity
from localrun.model import aliases
from localrun.model.files import ModelFiles, local_files
from localrun.model.header import HeaderInfo, read_header
from localrun.model.quants import quant_from_filename, tag_names
from localrun.model.refs import ModelRef, parse_ref
from localrun.model.validate import validate
from localrun.store.scan import CacheEntry, Listing, scan
from localrun.text import safe


@dataclass
class Resolved:
    """A model ready to load: its files, what its header says, and how it will run here."""

    model: ModelFiles
    header: HeaderInfo
    plan: fit.Plan
    entry: CacheEntry | None = None  # where it is in the cache; None for a local file


def matches(entry: CacheEntry, ref: ModelRef) -> bool:
    """Whether a cached entry is what `ref` names (every entry of the repo when it names no quant)."""
    if entry.repo_id.lower() != (ref.repo_id or "").lower():
        return False
    if ref.revision and not (ref.revision in entry.refs or entry.commit.startswith(ref.revision)):
        return False
    if ref.filename:
        wanted = ref.filename.strip("/")
        return any(f.name == wanted for f in entry.files)
    if ref.tag:  # a projector is never a quant of the model, even when its name says F16
        return entry.kind == "model" and tag_names(ref.tag, entry.quant, entry.files[0].name)
    return True


def aliases_of(entry: CacheEntry, named: dict[str, str] | None = None) -> list[str]:
    """The aliases of your own that name this pulled model (an alias of the repo names each quant)."""
    found = []
    for name, target in (aliases.load() if named is None else named).items():
        try:
            ref = parse_ref(target, expand=False)
        except UsageError:
            continue
        if not ref.is_local and matches(entry, ref):
            found.append(name)
    return sorted(found)


def find(ref: ModelRef, listing: Listing | None = None) -> list[CacheEntry]:
    """The cached entries a repo reference names, in the listing's order (main revision first)."""
    if ref.is_local:
        raise UsageError(f"{ref.raw} is a local file, not a pulled model")
    listing = listing if listing is not None else scan()
    return [e for e in listing.entries if matches(e, ref)]


def pulled_models(ref: ModelRef, listing: Listing | None = None) -> list[CacheEntry]:
    """The models `ref` names that can load, all from one revision (the named one, else main, else
    the most recently pulled), best quant first. A named model that is damaged is an error."""
    found = [e for e in find(ref, listing) if e.kind == "model"]
    if not found:
        return []
    revision = found[0].commit  # the listing puts the preferred revision first
    same = [e for e in found if e.commit == revision]
    intact = [e for e in same if not e.damaged]
    if not intact:
        broken = same[0]
        raise BadModel(
            f"{broken.label}: a file is missing from the cache (its blob was deleted)",
            hint=f"pull it again to repair it, or `localrun rm {broken.label}`",
        )
    return intact


def resolve(
    ref: ModelRef,
    machine: Machine,
    n_ctx: int | None = None,
    listing: Listing | None = None,
    *,
    validated: bool = True,
    shape: fit.Shape = fit.Shape(),
) -> Resolved | None:
    """What to load for `ref` on this machine; None when a repo reference names nothing pulled.
    validated=False reads the header without the checks a load needs (`show` reports them)."""
    check = validate if validated else read_header
    if ref.is_local:
        assert ref.path is not None
        model = local_files(ref.path)
        header = check(model.path)
        model = ModelFiles(model.files, model.label, header.file_type or quant_from_filename(model.path.name))
        return Resolved(model, header, fit.plan(header, machine, n_ctx, shape))
    entries = pulled_models(ref, listing)
    if not entries:
        return None
    if len(entries) == 1:
        entry = entries[0]
        _check_unverified(entry)
        header = check(entry.path)
        return Resolved(entry.model, header, fit.plan(header, machine, n_ctx, shape), entry)
    found = _choose(entries, machine, n_ctx, shape)
    assert found.entry is not None
    _check_unverified(found.entry)
    if validated:
        validate(found.model.path)
    return found


def _check_unverified(entry: CacheEntry) -> None:
    """Hash the files of `entry` whose sha256 check a pull did not finish; a corrupt one is
    deleted (never loaded, never kept) and the error says to pull again."""
    if not entry.unverified:
        return
    marked = integrity.unverified([f.blob for f in entry.files])
    for f in entry.files:
        if f.blob in marked and not integrity.recheck(f.blob, [f.link]):
            raise BadModel(
                f"{safe(entry.label)}: {safe(f.name)} was corrupt (a pull stopped while checking it); it was deleted",
                hint=f"pull it again: `localrun pull {safe(entry.label)}`",
            )
    entry.unverified = False


def _choose(entries: list[CacheEntry], machine: Machine, n_ctx: int | None, shape: fit.Shape) -> Resolved:
    """Several quants pulled and none named: plan each, and load the one `pull` would choose."""
    headers: list[HeaderInfo] = []
    usable: list[CacheEntry] = []
    failure: LocalrunError | None = None
    for entry in entries:
        try:
            headers.append(read_header(entry.path))
            usable.append(entry)
        except LocalrunError as exc:  # an unreadable quant is passed over, not chosen
            failure = failure or exc
    if not usable:
        assert failure is not None
        raise failure
    options = [fit.option(e.label, e.quant, e.size, h, machine, n_ctx, shape) for e, h in zip(usable, headers)]
    chosen = fit.choose(options)
    if chosen is None:  # nothing fits: the one needing the least memory has the best chance
        chosen = min(range(len(options)), key=lambda i: options[i].plan.estimate.ram + options[i].plan.estimate.vram)
    entry = usable[chosen]
    return Resolved(entry.model, headers[chosen], options[chosen].plan, entry)
