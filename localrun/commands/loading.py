"""From a model reference to a loaded engine: found in the cache (or pulled first), planned once
on this machine, loaded as planned."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from rich.markup import escape

from localrun import fit, hardware
from localrun.hardware import Machine
from localrun.inference.embedding import Embedder
from localrun.inference.engine import Engine
from localrun.inference.llama.build import build_info
from localrun.inference.machine import this_machine
from localrun.inference.opening import EngineConfig, load_embedder, load_engine
from localrun.inference.safety.filecheck import check_file
from localrun.model.files import ModelFiles
from localrun.model.refs import ModelRef, parse_ref
from localrun.output import Output
from localrun.store.opening import open_checked
from localrun.store.resolve import Resolved, resolve
from localrun.text import human_bytes, safe

T = TypeVar("T")


def resolve_or_pull(
    ref: ModelRef,
    out: Output,
    *,
    n_ctx: int | None = None,
    machine: Machine | None = None,
    shape: fit.Shape = fit.Shape(),
) -> Resolved:
    """The model `ref` names with its plan: a local file, a pulled model (offline), or a pull first."""
    machine = machine or this_machine(out.info)
    found = resolve(ref, machine, n_ctx, shape=shape)
    if found is None:
        from localrun.commands.pull import pull  # the Hub client: only when something is missing

        found = pull(ref, out, machine=machine, n_ctx=n_ctx, as_step=True, shape=shape).resolved
        assert found is not None, "a pull that returns ends with the files on disk"
    return found


def checked_config(cfg: EngineConfig, out: Output) -> EngineConfig:
    """Options that cannot do what they ask on this machine are said, and made to fit: more threads
    than cores spin against each other (10x slower), GPU layers on a CPU-only build do nothing."""
    cores = hardware.cpu_info().logical_cores or 1
    threads, gpu_layers = cfg.n_threads, cfg.n_gpu_layers
    if threads and threads > cores:
        out.warn(
            f"--threads {threads} is more than the {cores} cores here: llama.cpp's threads would wait on "
            f"each other; using {cores}"
        )
        threads = cores
    if gpu_layers and not build_info().gpu_offload:
        out.warn(
            "--gpu-layers is ignored: this llama.cpp build runs on the CPU only "
            "(reinstall llama-cpp-python with CMAKE_ARGS set for your GPU, see the README)"
        )
        gpu_layers = 0
    return replace(cfg, n_threads=threads, n_gpu_layers=gpu_layers)


def open_engine(reference: str, cfg: EngineConfig, out: Output, *, draft: str | None = None) -> Engine:
    """Resolve, plan and load (with a draft model for speculative decoding when given one that
    fits beside it); the plan's notes and what is loaded are said on stderr."""
    cfg = checked_config(cfg, out)
    started = time.perf_counter()
    machine = this_machine(out.info)
    resolved = resolve_or_pull(parse_ref(reference), out, n_ctx=cfg.n_ctx, machine=machine, shape=cfg.shape)
    if draft is not None:
        cfg = replace(cfg, draft=draft_beside(draft, resolved, cfg, machine, out))
    resolved_at = time.perf_counter()
    engine = _load_resolved(
        resolved, out, lambda progress: load_engine(resolved.model, resolved.plan, cfg, out.warn, progress)
    )
    engine.info.resolve_s = resolved_at - started
    return engine


def open_embedder(reference: str, cfg: EngineConfig, max_tokens: int, out: Output) -> Embedder:
    """Resolve, plan and load for embeddings alone: a context of `max_tokens` per input (at most
    what the model was trained with) pooled as the model says; said on stderr as open_engine does."""
    cfg = checked_config(cfg, out)
    machine = this_machine(out.info)
    shape = fit.Shape(logits_rows=max_tokens)  # a pooled decode returns a row per token
    resolved = resolve_or_pull(parse_ref(reference), out, n_ctx=max_tokens, machine=machine, shape=shape)
    tokens = min(max_tokens, resolved.header.n_ctx_train or max_tokens)
    return _load_resolved(
        resolved, out, lambda progress: load_embedder(resolved.model, resolved.plan, cfg, tokens, out.warn, progress)
    )


def _load_resolved(resolved: Resolved, out: Output, load: Callable[[Callable[[float], None] | None], T]) -> T:
    """`load(progress)` of a resolved model, with its plan's note said and, on a terminal, a
    spinner with the load's progress; a load that fails is explained (store.opening)."""
    model, plan = resolved.model, resolved.plan
    if plan.note:
        out.info(plan.note)

    def loading() -> T:
        if not out.interactive:
            return load(None)
        what = f"loading {safe(model.label)} ({human_bytes(model.size)})"
        with out.err.status(escape(what) + "...") as status:

            def progress(fraction: float) -> None:
                status.update(f"{escape(what)}: {100 * fraction:.0f}%")

            return load(progress)

    return open_checked(model, plan, loading, out.info, "a smaller --ctx or quant")


def draft_beside(
    reference: str, target: Resolved, cfg: EngineConfig, machine: Machine, out: Output
) -> ModelFiles | None:
    """The draft model, when it fits in RAM beside the model (None, said, when not). It runs on
    the CPU (the engine loads it with no GPU layers): a small model drafts fast there, and the
    GPU's memory stays the model's; so its CPU plan is what is counted."""
    draft = resolve_or_pull(parse_ref(reference), out, n_ctx=target.plan.n_ctx, machine=machine)
    on_cpu = fit.plan(draft.header, replace(machine, gpus=[], workers=()), target.plan.n_ctx, cfg.shape)
    both = target.plan.estimate.ram + on_cpu.estimate.ram
    room = machine.ram_available - fit.ram_headroom(machine)
    if both > room:
        instead = "prompt lookup only" if cfg.speculate == "auto" else "nothing: plain decoding"
        out.warn(
            f"the draft model {safe(draft.model.label)} does not fit beside the model ({human_bytes(both)} for "
            f"both, {human_bytes(room)} free): speculative decoding uses {instead}"
        )
        return None
    check_file(draft.model.path, draft.plan.extra_bufts, notify=out.info)
    return draft.model
