"""How much memory a model needs here, and the best way to run it: GPU layers, context, quant.

The estimate follows what llama.cpp 0.3.36 allocates (checked against its logged buffer sizes
and the process RSS by scripts/fit_accuracy.py):
- weights: tensor bytes per layer; token_embd always stays on the CPU; llama.cpp offloads from
  the last block down, and n_gpu_layers = n_layer + 1 also puts the output layer on the GPU
  (a tied output re-uses token_embd: then that tensor exists on both). CPU layers whose matrices
  the CPU backend repacks (Q4_0/Q4_K/IQ4_NL/MXFP4 on AVX2, ...) hold a second, repacked copy.
- KV cache: per layer n_head_kv * (key_length + value_length) * cells, cells = n_ctx padded to
  256. localrun keeps llama.cpp's default full-size SWA cache (swa_full, needed to rewind a
  conversation), so sliding-window layers hold n_ctx cells too unless swa_full=False.
- compute buffer: the larger of the output phase (logits for every row llama.cpp reserves, plus
  two activations) and the layer phase (FFN/attention activations per token plus the f16 KQ
  masks), per micro-batch, with flash attention (llama.cpp's default on CPU, CUDA and Metal).
- output buffer: n_vocab floats per kept logits row; a fixed overhead (runtime, vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from localrun.hardware import Machine
from localrun.model import quants
from localrun.model.header import HeaderInfo
from localrun.notes import GPU_NONE, NO_FIT, NO_FIT_SPLIT, Note, beyond_trained, context_reduced, gpu_partial, split

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_CTX = 4096
MIN_CTX = 512  # the smallest context the planner reduces to
UBATCH = 512  # the largest micro-batch a context decodes at once (n_ubatch)
CELL_PAD = 256  # llama.cpp pads n_ctx (and the SWA cache) to a multiple of 256
GPU_RESERVE = 512 * MIB  # per GPU: the CUDA/Metal context, fragmentation, the desktop
WORKER_RESERVE = 256 * MIB  # per worker device: its process, its graphs, what else runs there
# Beyond its buffers, llama.cpp's process grows by ~7 MiB (tiny model) to ~52 MiB (Gemma 3, 262k
# tokens): vocabulary strings, maps and caches, graphs, threads (scripts/fit_accuracy.py).
BASE_OVERHEAD = 12 * MIB
VOCAB_OVERHEAD = 200  # bytes per vocabulary token
CTX_OVERHEAD = 128  # bytes per KV cell (cell metadata, host-side masks)
# What localrun's own process adds beyond that (a real `localrun run` against a bare load, both in
# scripts/fit_accuracy.py): the vocabulary parsed and checked as Python objects on a file's first
# load (~60 B a token), the chat template, the renderer, the threads that load and decode.
LOCALRUN_OVERHEAD = 16 * MIB
LOCALRUN_PER_TOKEN = 64

# ggml types the CPU backend repacks for faster matmuls (ggml-cpu/repack.cpp), by CPU feature
_REPACK = {
    "avx2": {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"},
    "avx512f": {"Q2_K"},
    "i8mm": {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"},
    "dotprod": {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"},
}
# bytes per element of the KV cache types llama.cpp accepts
_KV_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
    "iq4_nl": 18 / 32,
}
KV_TYPES = tuple(_KV_BYTES)


@dataclass
class MemoryEstimate:
    weights_ram: int
    weights_vram: int
    kv_ram: int
    kv_vram: int
    compute_ram: int
    compute_vram: int
    overhead: int
    output_ram: int = 0  # llama.cpp's logits buffer, always in host memory

    @property
    def ram(self) -> int:
        return self.weights_ram + self.kv_ram + self.compute_ram + self.output_ram + self.overhead

    @property
    def vram(self) -> int:
        return self.weights_vram + self.kv_vram + self.compute_vram


# all layers on the GPU, some, none, across workers (--rpc), won't fit
Placement = Literal["gpu", "partial", "cpu", "split", "none"]


@dataclass(frozen=True)
class Share:
    """Some of a split model's layers and where they go: this machine's CPU ("here"), one of its
    GPUs, or a worker's device (`endpoint` set: what llama.cpp connects to)."""

    where: str
    layers: int
    memory: int  # bytes the planner expects there
    endpoint: str | None = None


@dataclass
class Plan:
    placement: Placement
    n_gpu_layers: int
    n_ctx: int
    estimate: MemoryEstimate
    fits: bool
    notes: tuple[Note, ...] = ()
    extra_bufts: bool = True  # the self-test's verdict the estimate assumed: the load uses the same
    max_ctx: int = 0  # the largest context (up to the trained one) that fits with the same placement
    kv_cache: str = "f16"  # the KV cache types assumed ("f16", or "q8_0/q4_0" for K/V that differ)
    # a split across workers, in llama.cpp's order: here (the first layers), the workers' devices,
    # this machine's GPUs (the last of them holds the output layer; without a GPU it stays here)
    split: tuple[Share, ...] = ()

    @property
    def rpc(self) -> tuple[str, ...]:
        """The workers' endpoints llama.cpp must know, in order."""
        return tuple(dict.fromkeys(s.endpoint for s in self.split if s.endpoint))

    @property
    def tensor_split(self) -> tuple[int, ...]:
        """llama.cpp's tensor_split for the split: layers per device, the output layer counted on
        the last device as n_gpu_layers counts it (without a GPU here the loader keeps its weights
        here all the same: runtime.LlamaModel); empty when there is no split."""
        counts = [s.layers for s in self.split[1:]]
        if counts:
            counts[-1] += 1
        return tuple(counts)

    @property
    def note(self) -> str | None:
        """The notes as one line, as `show` and `pull` print them."""
        return "; ".join(n.text for n in self.notes) or None


@dataclass
class Option:
    """One candidate quant, planned: what `choose` picks from."""

    key: str
    quality: float
    size: int
    plan: Plan


@dataclass(frozen=True)
class Shape:
    """What a generation context is made of beyond its size: the KV cache types, whether flash
    attention is on (None: llama.cpp's choice, on where it can), logits rows per decode (a
    speculative verify batch needs one per drafted token)."""

    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool | None = None
    logits_rows: int = 1

    @property
    def kv_cache(self) -> str:
        return self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"


def option(
    key: str,
    quant: str | None,
    size: int,
    header: HeaderInfo,
    machine: Machine,
    n_ctx: int | None = None,
    shape: Shape | None = None,
) -> Option:
    """Plan one candidate (a remote quant in `pull`, a pulled one in the resolver, one in `bench`)."""
    known = quants.info(quant or "")
    return Option(key, known.quality if known else 0.0, size, plan(header, machine, n_ctx, shape or Shape()))


def default_ctx(header: HeaderInfo, requested: int | None = None) -> int:
    """The requested context, else 4096 capped by the context the model was trained with."""
    if requested:
        return requested
    return min(DEFAULT_CTX, header.n_ctx_train) if header.n_ctx_train > 0 else DEFAULT_CTX


def _pad(n: int, to: int = CELL_PAD) -> int:
    return -(-n // to) * to


def repack_types(cpu_features: list[str] | None) -> set[str]:
    types: set[str] = set()
    for feature in cpu_features or ():
        types |= _REPACK.get(feature, set())
    return types


def kv_cells(header: HeaderInfo, n_ctx: int, n_ubatch: int = UBATCH, swa_full: bool = True) -> list[int]:
    """KV cells per layer. Sliding-window layers hold window + ubatch cells unless swa_full."""
    cells = _pad(n_ctx)
    swa_cells = cells
    if header.sliding_window and not swa_full:
        swa_cells = _pad(min(cells, header.sliding_window + n_ubatch))
    flags = header.swa_layers or [False] * header.n_layer
    return [swa_cells if flags[i] else cells for i in range(header.n_layer)]


def kv_element_bytes(kv_type: str) -> float:
    per_elem = _KV_BYTES.get(kv_type.lower())
    if per_elem is None:
        raise ValueError(f"unknown KV cache type {kv_type!r}; one of {', '.join(_KV_BYTES)}")
    return per_elem


def kv_bytes_per_layer(
    header: HeaderInfo,
    n_ctx: int,
    kv_type: str = "f16",
    n_ubatch: int = UBATCH,
    swa_full: bool = True,
    type_v: str | None = None,
) -> list[int]:
    """KV cache bytes per layer; `kv_type` is K's type and V's too unless type_v says otherwise."""
    k_elem, v_elem = kv_element_bytes(kv_type), kv_element_bytes(type_v or kv_type)
    cells = kv_cells(header, n_ctx, n_ubatch, swa_full)
    return [
        int(header.n_head_kv[i] * (header.key_length * k_elem + header.value_length * v_elem) * cells[i])
        for i in range(header.n_layer)
    ]


def compute_bytes(
    header: HeaderInfo,
    n_ctx: int,
    n_ubatch: int = UBATCH,
    logits_rows: int | None = None,
    swa_full: bool = True,
    flash_attn: bool = True,
) -> tuple[int, int]:
    """(output phase, layer phase) bytes of llama.cpp's compute buffer for one micro-batch.

    llama.cpp reserves logits for every token of a micro-batch (n_outputs_max = n_batch by
    default). The layer phase: FFN activations (gate, up, product: 3 x n_ff, experts included)
    and a few n_embd-wide tensors per token, plus one f16 KQ mask per attention kind.
    """
    ub = max(1, min(n_ubatch, _pad(n_ctx)))
    rows = ub if logits_rows is None else max(1, min(logits_rows, ub))
    output_phase = 4 * (rows * header.n_vocab + 2 * ub * header.n_embd)
    n_ff = header.n_ff
    if header.n_expert and header.n_expert_used:  # the chosen experts' activations, router logits
        n_ff = max(n_ff, header.n_expert_used * (header.n_ff_expert or header.n_ff) + header.n_expert)
    q_dim = header.n_head * header.key_length
    attn = 3 * q_dim + 2 * max(header.n_head_kv, default=0) * (header.key_length + header.value_length)
    per_token = 4 * max(3 * n_ff + 5 * header.n_embd, attn + 3 * header.n_embd)
    cells = kv_cells(header, n_ctx, ub, swa_full)
    masks = [_pad(n_ctx)] + ([min(cells)] if any(header.swa_layers) else [])  # iSWA: two masks
    mask_bytes = 2 if flash_attn else 4  # without flash attention the masks are f32, and the
    layer_phase = ub * per_token + sum(mask_bytes * c * ub for c in masks)
    if not flash_attn:  # f32 attention scores are materialised
        layer_phase += 4 * ub * _pad(n_ctx) * header.n_head
    return output_phase, layer_phase


def estimate(
    header: HeaderInfo,
    n_ctx: int,
    n_gpu_layers: int,
    kv_type: str = "f16",
    *,
    n_batch: int = 512,
    n_outputs: int = 1,
    logits_rows: int | None = None,
    extra_bufts: bool = True,
    cpu_features: list[str] | None = None,
    swa_full: bool = True,
    type_v: str | None = None,
    flash_attn: bool = True,
) -> MemoryEstimate:
    """Memory for `n_ctx` tokens with `n_gpu_layers` offloaded (llama.cpp's count: n_layer + 1 = all).

    n_outputs: logits rows kept per decode (1 for chat; n_batch for perplexity); logits_rows:
    rows llama.cpp reserves in the compute graph (default: a whole micro-batch).
    """
    n_layer = header.n_layer
    n_gpu = max(0, min(n_gpu_layers, n_layer + 1))
    gpu_blocks = min(n_gpu, n_layer)
    on_gpu = [i >= n_layer - gpu_blocks for i in range(n_layer)]
    output_on_gpu = n_gpu > n_layer
    ubatch = min(n_batch, UBATCH)

    cpu_layer_bytes = sum(b for b, g in zip(header.layer_bytes, on_gpu) if not g)
    gpu_layer_bytes = sum(b for b, g in zip(header.layer_bytes, on_gpu) if g)
    output_bytes = header.output_bytes + (header.embd_bytes if header.output_tied else 0)
    weights_ram = header.embd_bytes + header.other_bytes + cpu_layer_bytes
    weights_vram = gpu_layer_bytes
    if output_on_gpu:
        weights_vram += output_bytes  # a tied output: a GPU copy of token_embd
    else:
        weights_ram += header.output_bytes  # a tied output is token_embd itself, already counted
    if extra_bufts and header.layer_bytes:
        kinds = repack_types(cpu_features)
        repackable = sum(b for t, b in header.matmul_bytes.items() if t in kinds)
        weights_ram += repackable * cpu_layer_bytes // max(1, sum(header.layer_bytes))

    kv = kv_bytes_per_layer(header, n_ctx, kv_type, ubatch, swa_full, type_v)
    kv_vram = sum(b for b, g in zip(kv, on_gpu) if g)
    kv_ram = sum(kv) - kv_vram

    output_phase, layer_phase = compute_bytes(header, n_ctx, ubatch, logits_rows, swa_full, flash_attn)
    if n_gpu == 0:
        compute_ram, compute_vram = max(output_phase, layer_phase), 0
    else:
        compute_vram = max(layer_phase, output_phase if output_on_gpu else 0)
        host = 4 * ubatch * header.n_embd * 2  # inputs and the hand-over between devices
        compute_ram = max(host, 0 if output_on_gpu else output_phase)

    overhead = (
        BASE_OVERHEAD
        + LOCALRUN_OVERHEAD
        + (VOCAB_OVERHEAD + LOCALRUN_PER_TOKEN) * header.n_vocab
        + CTX_OVERHEAD * _pad(n_ctx)
    )
    output_ram = 4 * header.n_vocab * max(1, n_outputs)
    return MemoryEstimate(weights_ram, weights_vram, kv_ram, kv_vram, compute_ram, compute_vram, overhead, output_ram)


def ram_headroom(machine: Machine) -> int:
    """RAM left free for the system and other programs: 10% of RAM, at least 1 GiB."""
    return max(GIB, machine.ram_total // 10)


def _vram_budget(machine: Machine) -> int:
    return sum(max(0, g.free - GPU_RESERVE) for g in machine.gpus)


def _fits(est: MemoryEstimate, machine: Machine) -> bool:
    ram_room = machine.ram_available - ram_headroom(machine)
    if machine.unified:  # one pool: the GPU's working-set limit, and everything against RAM
        return est.vram <= _vram_budget(machine) and est.ram + est.vram <= ram_room
    # each extra GPU holds its own copy of the compute buffer
    extra_compute = est.compute_vram * max(0, len(machine.gpus) - 1)
    return est.ram <= ram_room and est.vram + extra_compute <= _vram_budget(machine)


def _generation_estimate(header: HeaderInfo, machine: Machine, n_ctx: int, n_gpu: int, shape: Shape) -> MemoryEstimate:
    """The estimate for a generation context on this machine (its shape, its repack verdict)."""
    return estimate(
        header,
        n_ctx,
        n_gpu,
        shape.type_k,
        extra_bufts=machine.extra_bufts,
        cpu_features=machine.cpu.features,
        logits_rows=shape.logits_rows,
        n_outputs=shape.logits_rows,
        type_v=shape.type_v,
        flash_attn=shape.flash_attn is not False,
    )


def _best_layers(header: HeaderInfo, machine: Machine, n_ctx: int, shape: Shape) -> tuple[int, MemoryEstimate] | None:
    """The most GPU layers that fit (n_layer + 1 = all), or None when not even the CPU has room."""

    top = header.n_layer + 1 if machine.gpus else 0
    for n_gpu in range(top, -1, -1):
        guess = _generation_estimate(header, machine, n_ctx, n_gpu, shape)
        if _fits(guess, machine):
            return n_gpu, guess
    return None


def plan(header: HeaderInfo, machine: Machine, n_ctx: int | None = None, shape: Shape = Shape()) -> Plan:
    """Where to run the model: all on the GPU, partly, on the CPU, or not at all; with a margin.

    Plans are for generation: runtime contexts without logits_all reserve one logits row.

    When nothing fits at the requested (or default) context, halve it down to 512 and say so.
    """
    if machine.workers:
        return _plan_split(header, machine, n_ctx, shape)
    ctx = wanted = default_ctx(header, n_ctx)
    while True:
        found = _best_layers(header, machine, ctx, shape)
        if found is not None or ctx <= MIN_CTX:
            break
        ctx = max(MIN_CTX, ctx // 2)
    total = header.n_layer + 1
    if found is None:
        est = _generation_estimate(header, machine, wanted, 0, shape)
        notes = tuple(n for n in (NO_FIT, beyond_trained(wanted, header.n_ctx_train)) if n)
        return Plan("none", 0, wanted, est, False, notes, machine.extra_bufts, kv_cache=shape.kv_cache)
    n_gpu, est = found
    beyond = beyond_trained(ctx, header.n_ctx_train)
    notes = [beyond] if beyond else []
    if ctx != wanted:
        notes.append(context_reduced(ctx))
    if n_gpu == total:
        placement = "gpu"
    elif n_gpu > 0:
        placement = "partial"
        notes.append(gpu_partial(n_gpu, total))
    else:
        placement = "cpu"
        if machine.gpus:
            notes.append(GPU_NONE)
    reach = max(ctx, _max_ctx(header, machine, n_gpu, shape))
    return Plan(placement, n_gpu, ctx, est, True, tuple(notes), machine.extra_bufts, reach, shape.kv_cache)


def _plan_split(header: HeaderInfo, machine: Machine, n_ctx: int | None, shape: Shape) -> Plan:
    """The plan across this machine and its workers: layers in proportion to the memory each has
    free (after what stays here whatever the split: embeddings, compute, logits); the context
    halved down to 512 when the layers do not fit at the one asked."""
    ctx = wanted = default_ctx(header, n_ctx)
    while True:
        shares = _split(header, machine, ctx, shape)
        if shares is not None or ctx <= MIN_CTX:
            break
        ctx = max(MIN_CTX, ctx // 2)
    if shares is None:
        est = _generation_estimate(header, machine, wanted, 0, shape)
        notes = tuple(n for n in (NO_FIT_SPLIT, beyond_trained(wanted, header.n_ctx_train)) if n)
        return Plan("none", 0, wanted, est, False, notes, machine.extra_bufts, kv_cache=shape.kv_cache)
    away = sum(s.layers for s in shares[1:])
    n_gpu = away + 1 if away else 0  # llama.cpp counts the output layer with the last device's
    # here as llama.cpp holds it with the last `away` blocks elsewhere (the output layer here); this
    # machine's GPUs as VRAM; what each worker holds is in its share
    here = _generation_estimate(header, machine, ctx, away, shape)
    gpus = sum(s.memory for s in shares[1:] if s.endpoint is None)
    est = replace(here, weights_vram=gpus, kv_vram=0, compute_vram=0)
    shares[0] = replace(shares[0], memory=est.ram)
    notes = [n for n in (beyond_trained(ctx, header.n_ctx_train),) if n]
    if ctx != wanted:
        notes.append(context_reduced(ctx))
    notes.append(split([(s.where, s.layers) for s in shares]))
    return Plan("split", n_gpu, ctx, est, True, tuple(notes), machine.extra_bufts, ctx, shape.kv_cache, tuple(shares))


def _split(header: HeaderInfo, machine: Machine, n_ctx: int, shape: Shape) -> list[Share] | None:
    """Layers per device (here first, then each worker's devices, then this machine's GPUs), in
    proportion to the memory each has free for layers; None when they do not all fit."""
    n = header.n_layer
    kv = kv_bytes_per_layer(header, n_ctx, shape.type_k, UBATCH, True, shape.type_v)
    per_layer = (sum(header.layer_bytes) + sum(kv)) / max(1, n)
    repack = 0.0
    if machine.extra_bufts and header.layer_bytes:
        kinds = repack_types(machine.cpu.features)
        repack = sum(b for t, b in header.matmul_bytes.items() if t in kinds) / max(1, sum(header.layer_bytes))
    per_layer_here = per_layer + repack * sum(header.layer_bytes) / max(1, n)
    _, layer_phase = compute_bytes(header, n_ctx, UBATCH, shape.logits_rows, True, shape.flash_attn is not False)
    cpu_only = _generation_estimate(header, machine, n_ctx, 0, shape)
    here_fixed = cpu_only.ram - cpu_only.weights_ram - cpu_only.kv_ram + header.embd_bytes + header.other_bytes
    output = header.output_bytes + (header.embd_bytes if header.output_tied else 0)
    # (name, endpoint, memory free for layers)
    places: list[tuple[str, str | None, int]] = [("here", None, machine.ram_available - ram_headroom(machine))]
    for worker in machine.workers:
        for d in worker.devices:
            # a CPU lent on Linux reports all its RAM as free (ggml-cpu): keep this machine's headroom
            reserve = max(GIB, d.total // 10) if d.free == d.total else WORKER_RESERVE
            places.append((worker.device_name(d.index), worker.endpoint, d.free - reserve - layer_phase))
    if not machine.unified:
        for i, g in enumerate(machine.gpus):
            places.append((f"GPU {i}", None, g.free - GPU_RESERVE - layer_phase))
    # the output layer: on this machine's last GPU, else here (the loader keeps it here, so that a
    # worker sends one row of activations per token, not the logits)
    output_on_gpu = places[-1][0].startswith("GPU ")
    if not output_on_gpu:
        here_fixed += header.output_bytes  # a tied output is token_embd, already here
    room = [max(0, free) for _, _, free in places]
    room[0] -= here_fixed
    if output_on_gpu:
        room[-1] -= output
    if room[0] < 0 or room[-1] < 0:
        return None
    costs = [per_layer_here] + [per_layer] * (len(places) - 1)
    layers = _proportional(n, room, costs)
    if layers is None:
        return None
    shares = []
    for i, ((name, endpoint, _), count) in enumerate(zip(places, layers)):
        memory = int(count * costs[i]) + (here_fixed if i == 0 else layer_phase)
        if i == len(places) - 1 and output_on_gpu:
            memory += output
        shares.append(Share(name, count, memory, endpoint))
    return shares


def _proportional(n: int, room: list[int], costs: list[float]) -> list[int] | None:
    """`n` layers shared in proportion to `room`, none beyond what a place's room holds at its
    cost per layer (the rest goes where there is room left); None when they do not all fit.
    Rounding favours the places listed first (here, then the workers in order)."""
    capacity = [int(r // c) if c > 0 else n for r, c in zip(room, costs)]
    if sum(capacity) < n:
        return None
    total = sum(room) or 1
    exact = [n * r / total for r in room]
    counts = [min(int(e), cap) for e, cap in zip(exact, capacity)]
    by_remainder = sorted(range(len(room)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    for i in by_remainder:  # the largest remainders first, one layer each
        if sum(counts) < n and counts[i] < capacity[i]:
            counts[i] += 1
    while sum(counts) < n:  # what a full place could not take goes where most room is left
        i = max(range(len(room)), key=lambda i: (capacity[i] - counts[i], -i))
        counts[i] += 1
    return counts


def _max_ctx(header: HeaderInfo, machine: Machine, n_gpu: int, shape: Shape) -> int:
    """The largest context, in whole KV cells pads up to the trained context, that fits with
    n_gpu layers on the GPU (memory grows with the context: a bisection)."""
    top = max(header.n_ctx_train if header.n_ctx_train > 0 else 32 * DEFAULT_CTX, MIN_CTX) // CELL_PAD
    lo, hi = 0, top  # in pads: lo fits (or is 0), hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(_generation_estimate(header, machine, mid * CELL_PAD, n_gpu, shape), machine):
            lo = mid
        else:
            hi = mid - 1
    return lo * CELL_PAD


def choose(options: list[Option]) -> int | None:
    """Index of the best option: the best quality fully on the GPU, else the best that fits RAM."""

    def best(indices: list[int]) -> int | None:
        return max(indices, key=lambda i: (options[i].quality, -options[i].size), default=None)

    on_gpu = [i for i, o in enumerate(options) if o.plan.fits and o.plan.placement == "gpu"]
    if on_gpu:
        return best(on_gpu)
    return best([i for i, o in enumerate(options) if o.plan.fits])
