"""`localrun show`: what a model is (from its GGUF header) and how it would run on this machine.

Works on a local file, a pulled model (read from the HF cache, no network) and a repo that is not
pulled: then only the header is read, with HTTP Range requests - no model file is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from localrun import hub, store
from localrun.errors import BadModel, NotFound
from localrun.output import Output, human_bytes
from localrun.refs import ModelRef

if TYPE_CHECKING:
    from localrun.fit import Plan, Resources
    from localrun.gguf_info import HeaderInfo


@dataclass
class FileItem:
    name: str  # path in the repo, or the file name of a local file
    size: int
    path: Path | None = None  # on this disk; None for a remote file


@dataclass
class Found:
    """The model a reference names: its files and header, and what else is there."""

    label: str  # org/repo:QUANT, or the local path
    source: str  # "local", "pulled" or "remote"
    repo_id: str | None
    commit: str | None
    quant: str | None
    files: list[FileItem]
    header: "HeaderInfo"
    others: list[tuple[str, int]] = field(default_factory=list)  # other quants there: (label, size)
    last_used: float | None = None
    problem: str | None = None  # what validation found that would make llama.cpp fail or abort

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class Description:
    model: Found
    plan: "Plan"  # at the default (or asked) context, on this machine
    resources: "Resources"

    def to_dict(self) -> dict:
        from dataclasses import asdict

        m, h, est = self.model, self.model.header, self.plan.estimate
        return {
            "model": m.label, "source": m.source, "repo_id": m.repo_id, "commit": m.commit,
            "quant": m.quant, "size": m.size,
            "files": [{"name": f.name, "size": f.size, "path": str(f.path) if f.path else None} for f in m.files],
            "architecture": h.architecture, "name": h.name, "n_params": h.n_params, "n_layer": h.n_layer,
            "n_ctx_train": h.n_ctx_train, "n_expert": h.n_expert, "n_expert_used": h.n_expert_used,
            "chat_template": h.chat_template, "license": h.license,
            "plan": {"placement": self.plan.placement, "n_gpu_layers": self.plan.n_gpu_layers,
                     "n_ctx": self.plan.n_ctx, "fits": self.plan.fits, "note": self.plan.note,
                     "ram": est.ram, "vram": est.vram, "estimate": asdict(est)},
            "resources": asdict(self.resources),
            "other_quants": [{"model": label, "size": size} for label, size in m.others],
            "last_used": store.iso(m.last_used),
            "problem": m.problem,
            "header": h.to_dict(),
        }


def describe(ref: ModelRef, *, n_ctx: int | None = None, res: "Resources | None" = None) -> Description:
    """Read the header of what `ref` names - local, pulled, or on the Hub (headers only) - and plan it."""
    from localrun import fit

    res = res if res is not None else fit.Resources.detect()
    if ref.is_local:
        found = _local(ref)
    else:
        listing = store.scan()
        entries = [e for e in store.find(ref, listing) if e.kind == "model"]
        found = _pulled(entries, listing) if entries else _remote(ref, res)
    return Description(found, fit.plan(found.header, res, n_ctx), res)


def _local(ref: ModelRef) -> Found:
    from localrun import gguf_info

    assert ref.path is not None
    if not ref.path.is_file():
        raise NotFound(f"no such model file: {ref.path}")
    header = gguf_info.read_header(ref.path)
    files = [FileItem(p.name, p.stat().st_size, p) for p in gguf_info.shard_paths(ref.path)]
    return Found(str(ref.path), "local", None, None, header.file_type, files, header,
                  last_used=store.last_used(ref.path), problem=_problem(ref.path))


def _problem(path: Path) -> str | None:
    """Why loading this file would fail (checked in Python, as before every load), or None."""
    from localrun import gguf_info

    try:
        gguf_info.validate(path)
    except BadModel as exc:
        return exc.message
    return None


def _pulled(entries: list[store.ModelEntry], listing: store.Listing) -> Found:
    """The first match: store.find orders a repo's entries main revision first, best quant first -
    the one `chat org/repo` loads when several quants are pulled."""
    from localrun import gguf_info

    entry = entries[0]
    if entry.damaged:
        raise BadModel(f"{entry.label}: a file is missing from the cache (its blob was deleted)",
                       hint=f"pull it again to repair it, or `localrun rm {entry.label}`")
    header = gguf_info.read_header(entry.path)
    files = [FileItem(f.name, f.size, f.link) for f in entry.files]
    others = [(e.label, e.size) for e in listing.entries
              if e.repo_id == entry.repo_id and e.kind == "model" and e.label != entry.label]
    return Found(entry.label, "pulled", entry.repo_id, entry.commit, entry.quant, files, header, others,
                  entry.last_used, _problem(entry.path))


def _remote(ref: ModelRef, res: "Resources") -> Found:
    from localrun import gguf_info

    listing = hub.list_candidates(ref)
    if ref.tag or ref.filename:
        index = listing.select(tag=ref.tag, filename=ref.filename)
    else:
        index = _likely_choice(listing.candidates, res)
    cand = listing.candidates[index]
    header = gguf_info.read_remote_header(listing.repo_id, cand.files, revision=listing.commit,
                                          sizes=[cand.sizes.get(f, 0) for f in cand.files])
    files = [FileItem(name, cand.sizes.get(name, 0)) for name in cand.files]
    others = [(f"{listing.repo_id}:{c.label}", c.size) for i, c in enumerate(listing.candidates) if i != index]
    return Found(f"{listing.repo_id}:{cand.label}", "remote", listing.repo_id, listing.commit, cand.quant,
                  files, header, others)


def _likely_choice(candidates: list[hub.Candidate], res: "Resources") -> int:
    """Without a tag, which quant to read: the best one whose files fit in free memory - a cheap
    stand-in for `pull`'s choice, which reads every candidate's header. Architecture, context,
    layers, template and licence are the same in every quant; size and plan are this one's."""
    room = res.ram_available + sum(d.free for d in res.gpus)
    fitting = [i for i, c in enumerate(candidates) if c.size < room]
    if fitting:
        return fitting[0]  # candidates come best quality first
    return min(range(len(candidates)), key=lambda i: candidates[i].size)


# -- showing -------------------------------------------------------------------------------------
def count(n: int) -> str:
    """A parameter count as model cards write it: 270M, 7.6B."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def _template(template: str | None) -> str:
    if template is None:
        return "none: chat falls back to a built-in format (choose one with --chat-format or --template)"
    return f"yes ({human_bytes(len(template.encode()))})"


def _plan_line(d: Description) -> str:
    plan, est = d.plan, d.plan.estimate
    where = {"gpu": "all layers on the GPU", "cpu": "CPU",
             "partial": f"{plan.n_gpu_layers}/{d.model.header.n_layer + 1} layers on the GPU"}.get(plan.placement, "-")
    memory = f"~{human_bytes(est.ram)} RAM" + (f" + {human_bytes(est.vram)} VRAM" if est.vram else "")
    parts = (f"weights {human_bytes(est.weights_ram + est.weights_vram)}, "
             f"KV cache {human_bytes(est.kv_ram + est.kv_vram)}, "
             f"compute {human_bytes(est.compute_ram + est.compute_vram + est.overhead)}")
    verdict = "fits" if plan.fits else "does not fit"
    line = f"{verdict}: {where}, {plan.n_ctx} ctx, {memory} ({parts})"
    return f"{line}; {plan.note}" if plan.note else line


def show(out: Output, d: Description) -> None:
    """The description as label/value lines on stdout, or JSON."""
    if out.json:
        out.data(d.to_dict())
        return
    from rich.text import Text

    m, h = d.model, d.model.header
    source = {"local": "local file", "pulled": "pulled", "remote": "on the Hub, not pulled: header read only"}
    out.show(Text(f"{m.label}  ({source[m.source]})", style="bold"))
    if m.problem:
        out.warn(f"this file will not load: {m.problem}")
    rows: list[tuple[str, str]] = [
        ("Architecture", h.architecture + (f" ({h.name})" if h.name else "")),
        ("Parameters", count(h.n_params)),
        ("Quantization", m.quant or h.file_type or "-"),
        ("Trained context", f"{h.n_ctx_train} tokens" if h.n_ctx_train else "-"),
        ("Layers", str(h.n_layer)),
    ]
    if h.n_expert:
        rows.append(("Experts", f"{h.n_expert}, {h.n_expert_used} used per token"))
    rows.append(("Chat template", _template(h.chat_template)))
    if h.license:
        rows.append(("Licence", h.license))
    for i, f in enumerate(m.files):
        rows.append(("Files" if i == 0 else "", f"{f.name}  {human_bytes(f.size)}"))
    if len(m.files) > 1:
        rows.append(("", f"{len(m.files)} shards, {human_bytes(m.size)} in all"))
    if m.source == "pulled" and m.files[0].path is not None:
        rows.append(("Path", str(m.files[0].path)))  # what to hand to another llama.cpp tool
    r = d.resources
    gpus = ", ".join(f"{g.name} {human_bytes(g.free)} free" for g in r.gpus) or "no GPU"
    rows.append(("This machine", f"{human_bytes(r.ram_available)} RAM available, {gpus}"))
    rows.append(("Memory plan", _plan_line(d)))
    if m.source != "remote":
        rows.append(("Last used", store.ago(m.last_used)))
    if m.others:
        title = "Other quants" if m.source == "remote" else "Also pulled"
        rows.append((title, ", ".join(f"{label.split(':', 1)[1]} {human_bytes(size)}" for label, size in m.others)))
    # Plain lines that the terminal wraps, not a rich Table: that pads every line to the console
    # width and cuts paths and plans into columns, also when piped.
    width = max(len(key) for key, _ in rows) + 2
    for key, value in rows:
        line = Text(key.ljust(width), style="bold")
        line.append(value)
        out.show(line)
