"""`localrun show`: what a model is (from its GGUF header) and how it would run on this machine.

Works on a local file, a pulled model (read from the HF cache, no network) and a repo that is not
pulled: then only the headers are read, with HTTP Range requests - no model file is downloaded.
Without a tag it shows what `chat` would load (pulled), or what `pull` would choose (remote).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from rich.text import Text

from localrun.commands.planning import plan_pull
from localrun.fit import Plan, Shape
from localrun.hardware import Machine
from localrun.inference.machine import this_machine
from localrun.inference.prompting.families import detect
from localrun.inference.safety.filecheck import remembered_problem
from localrun.model.header import HeaderInfo
from localrun.model.refs import ModelRef
from localrun.model.validate import problem
from localrun.output import Output, Whole
from localrun.store.resolve import resolve
from localrun.store.scan import iso, scan
from localrun.store.usage import last_used
from localrun.text import ago, count, human_bytes, safe

Source = Literal["local", "pulled", "remote"]


@dataclass
class FileItem:
    name: str  # path in the repo, or the file name of a local file
    size: int
    path: Path | None = None  # on this disk; None for a remote file


@dataclass
class Description:
    """The model a reference names: its files and header, its plan here, and what else is there."""

    label: str  # org/repo:QUANT, or the local path
    source: Source
    repo_id: str | None
    commit: str | None
    quant: str | None
    files: list[FileItem]
    header: HeaderInfo
    plan: Plan  # at the default (or asked) context, on this machine
    machine: Machine
    others: list[tuple[str, int]] = field(default_factory=list)  # other quants there: (label, size)
    last_used: float | None = None
    problem: str | None = None  # what validation found that would make llama.cpp fail or abort

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        h, est = self.header, self.plan.estimate
        return {
            "model": self.label,
            "source": self.source,
            "repo_id": self.repo_id,
            "commit": self.commit,
            "quant": self.quant,
            "size": self.size,
            "files": [{"name": f.name, "size": f.size, "path": str(f.path) if f.path else None} for f in self.files],
            "architecture": h.architecture,
            "name": h.name,
            "n_params": h.n_params,
            "n_layer": h.n_layer,
            "n_ctx_train": h.n_ctx_train,
            "n_expert": h.n_expert,
            "n_expert_used": h.n_expert_used,
            "chat_template": h.chat_template,
            "replies": _replies(h.chat_template),
            "license": h.license,
            "plan": {
                "placement": self.plan.placement,
                "n_gpu_layers": self.plan.n_gpu_layers,
                "n_ctx": self.plan.n_ctx,
                "max_ctx": self.plan.max_ctx if self.plan.fits else None,
                "kv_cache": self.plan.kv_cache,
                "fits": self.plan.fits,
                "note": self.plan.note,
                "split": [asdict(share) for share in self.plan.split],
                "ram": est.ram,
                "vram": est.vram,
                "estimate": asdict(est),
            },
            "machine": self.machine.to_dict(),
            "other_quants": [{"model": label, "size": size} for label, size in self.others],
            "last_used": iso(self.last_used),
            "problem": self.problem,
            "header": h.to_dict(),
        }


def describe(
    ref: ModelRef, *, n_ctx: int | None = None, machine: Machine | None = None, shape: Shape = Shape()
) -> Description:
    """Read the header of what `ref` names - local, pulled, or on the Hub (headers only) - and plan it."""
    machine = machine or this_machine()
    if ref.is_local:
        found = resolve(ref, machine, n_ctx, validated=False, shape=shape)
        assert found is not None
        files = [FileItem(p.name, p.stat().st_size, p) for p in found.model.files]
        return Description(
            found.model.label,
            "local",
            None,
            None,
            found.model.quant,
            files,
            found.header,
            found.plan,
            machine,
            last_used=last_used(found.model.path),
            problem=_problem(found.model.path),
        )
    listing = scan()
    found = resolve(ref, machine, n_ctx, listing, validated=False, shape=shape)
    if found is not None and found.entry is not None:
        entry = found.entry
        files = [FileItem(f.name, f.size, f.link) for f in entry.files]
        others = [
            (e.label, e.size)
            for e in listing.entries
            if e.repo_id == entry.repo_id and e.kind == "model" and e.label != entry.label
        ]
        return Description(
            entry.label,
            "pulled",
            entry.repo_id,
            entry.commit,
            entry.quant,
            files,
            found.header,
            found.plan,
            machine,
            others,
            entry.last_used,
            _problem(entry.path),
        )
    return _remote(ref, machine, n_ctx, shape)


def _problem(path: Path) -> str | None:
    """Why a load would fail: what validation finds, else what a first load in a child ran into."""
    return problem(path) or remembered_problem(path)


def _remote(ref: ModelRef, machine: Machine, n_ctx: int | None, shape: Shape) -> Description:
    """What `pull` would download: the quant named, else the one it would choose (else the smallest)."""
    result, listing = plan_pull(ref, machine, n_ctx=n_ctx, shape=shape)
    readable = [i for i, row in enumerate(result.rows) if row.header is not None]
    index = result.chosen if result.chosen is not None else min(readable, key=lambda i: result.rows[i].quant.size)
    row = result.rows[index]
    assert row.header is not None and row.plan is not None
    files = [FileItem(name, row.quant.sizes.get(name, 0)) for name in row.quant.files]
    others = [(f"{listing.repo_id}:{q.label}", q.size) for i, q in enumerate(listing.quants) if i != index]
    return Description(
        f"{listing.repo_id}:{row.quant.label}",
        "remote",
        listing.repo_id,
        listing.commit,
        row.quant.quant,
        files,
        row.header,
        row.plan,
        machine,
        others,
    )


# -- showing -------------------------------------------------------------------------------------
def _replies(template: str | None) -> dict | None:
    """How the template's replies are taken apart (from its source alone: the header's)."""
    if not template:
        return None
    found = detect(template)
    return {
        "reasoning": found.reasoning.name if found.reasoning else None,
        "tool_calls": found.tools.name,
        "thinking_switch": found.thinking_switch.variable if found.thinking_switch else None,
        "evidence": list(found.evidence),
    }


def _template(template: str | None) -> str:
    if template is None:
        return "none: chat falls back to a built-in format (choose one with --chat-format or --template)"
    return f"yes ({human_bytes(len(template.encode()))})"


def _plan_line(d: Description) -> str:
    plan, est = d.plan, d.plan.estimate
    where = {
        "gpu": "all layers on the GPU",
        "cpu": "CPU",
        "partial": f"{plan.n_gpu_layers}/{d.header.n_layer + 1} layers on the GPU",
        "split": "split across workers",
    }.get(plan.placement, "-")
    memory = f"~{human_bytes(est.ram)} RAM" + (f" + {human_bytes(est.vram)} VRAM" if est.vram else "")
    parts = (
        f"weights {human_bytes(est.weights_ram + est.weights_vram)}, "
        f"KV cache {human_bytes(est.kv_ram + est.kv_vram)} {plan.kv_cache}, "
        f"compute {human_bytes(est.compute_ram + est.compute_vram + est.overhead)}"
    )
    verdict = "fits" if plan.fits else "does not fit"
    reach = f" (up to {plan.max_ctx} fit)" if plan.fits and plan.max_ctx > plan.n_ctx else ""
    line = f"{verdict}: {where}, {plan.n_ctx} ctx{reach}, {memory} ({parts})"
    return f"{line}; {plan.note}" if plan.note else line


def show(out: Output, d: Description) -> None:
    """The description as label/value lines on stdout, or JSON."""
    if out.json:
        out.data(d.to_dict())
        return
    h = d.header
    source = {"local": "local file", "pulled": "pulled", "remote": "on the Hub, not pulled: header read only"}
    out.show(Text(f"{safe(d.label, None)}  ({source[d.source]})", style="bold"))
    if d.problem:
        out.warn(f"this file will not load: {d.problem}")
    rows: list[tuple[str, str]] = [
        ("Architecture", safe(h.architecture) + (f" ({safe(h.name)})" if h.name else "")),
        ("Parameters", count(h.n_params)),
        ("Quantization", d.quant or h.file_type or "-"),
        ("Trained context", f"{h.n_ctx_train} tokens" if h.n_ctx_train else "-"),
        ("Layers", str(h.n_layer)),
    ]
    if h.n_expert:
        rows.append(("Experts", f"{h.n_expert}, {h.n_expert_used} used per token"))
    rows.append(("Chat template", _template(h.chat_template)))
    if h.chat_template:
        found = detect(h.chat_template)
        thinking = found.reasoning.name if found.reasoning else "no"
        if found.thinking_switch is not None:
            thinking += f" (switch: {found.thinking_switch.variable}, --think/--no-think)"
        rows.append(("Thinking", thinking))
        rows.append(
            ("Tool calls", found.tools.name + ("" if found.template_describes_tools else ", described by localrun"))
        )
    if h.license:
        rows.append(("Licence", safe(h.license)))
    for i, f in enumerate(d.files):
        rows.append(("Files" if i == 0 else "", Whole(f"{safe(f.name, None)}  {human_bytes(f.size)}")))
    if len(d.files) > 1:
        rows.append(("", f"{len(d.files)} shards, {human_bytes(d.size)} in all"))
    if d.source == "pulled" and d.files[0].path is not None:
        rows.append(("Path", Whole(safe(d.files[0].path, None))))  # what to hand to another llama.cpp tool
    m = d.machine
    gpus = ", ".join(f"{g.name} {human_bytes(g.free)} free" for g in m.gpus) or "no GPU"
    rows.append(("This machine", f"{human_bytes(m.ram_available)} RAM available, {gpus}"))
    rows.append(("Memory plan", _plan_line(d)))
    if d.source != "remote":
        rows.append(("Last used", ago(d.last_used)))
    if d.others:
        title = "Other quants" if d.source == "remote" else "Also pulled"
        rows.append(
            (title, ", ".join(f"{safe(label.split(':', 1)[1])} {human_bytes(size)}" for label, size in d.others))
        )
    out.fields(rows)
