"""Child side of `localrun bench`: measure one model, print JSON lines (phases, then the result).

Run as `python -m localrun.bench.worker SPEC_JSON`. Each candidate runs in its own process so its
peak RSS is its own, and a llama.cpp abort (SIGABRT on a corrupt vocabulary, SIGSEGV) ends only
this child. Speed follows llama-bench: after a warm-up, pp decodes a prompt in one batch from an
empty cache and tg decodes tokens one at a time from an empty cache. Quality follows
llama-perplexity: fixed windows of ppl_ctx tokens, BOS first, the second half of each window
scored. The reference run writes the token ids and its whole next-token distributions into a
folder (localrun.bench.reference) that later runs read, so every candidate is scored on the same
tokens at the same positions, over the whole vocabulary.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from localrun.bench.reference import ReferenceReader, ReferenceWriter, ensure_room
from localrun.errors import LocalrunError
from localrun.hardware import default_threads
from localrun.inference.generation.sampler import Sampler
from localrun.inference.generation.settings import SamplingOptions
from localrun.inference.llama.log import install
from localrun.inference.llama.runtime import LlamaContext, LlamaModel, Loaded, LoadOptions, load
from localrun.model.quants import FTYPE_NAMES


@dataclass
class WorkerSpec:
    path: str
    eval_text: str
    pp: int = 512
    tg: int = 128
    reps: int = 5
    threads: int | None = None
    gpu_layers: int = 0
    use_extra_bufts: bool = True
    ppl_ctx: int = 512
    ppl_chunks: int | None = None  # None: every whole window of the text
    quality: bool = True  # False: speed only
    ref_out: str | None = None  # folder: write the reference tokens and distributions here (the reference run)
    ref_in: str | None = None  # folder: read them from here (every other run)
    verbose: bool = False
    rpc: list[str] = field(default_factory=list)  # workers (--rpc) and the layers each takes, as planned
    tensor_split: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _emit(event: str, **data: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
    sys.stdout.flush()


def _peak_rss() -> int:
    """This process's peak resident memory. On Linux from VmHWM: ru_maxrss survives exec, so in a
    child it can report the parent's peak instead of ours."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _vram_used() -> int | None:
    """Bytes of GPU memory this process holds (NVIDIA, through nvidia-ml-py); None elsewhere."""
    try:
        import pynvml

        pynvml.nvmlInit()
        used = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    used += int(proc.usedGpuMemory)
        return used or None
    except Exception:  # no NVIDIA driver or library: nothing to report
        return None


def _bos(model) -> int | None:
    """The BOS token when the vocabulary adds one (tokenizing nothing with specials yields it)."""
    ids = model.tokenize("", add_special=True, parse_special=False)
    return ids[0] if len(ids) == 1 else None


def _cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds the whole machine has been busy, CPU seconds of this process)."""
    machine = psutil.cpu_times()
    # guest time is already counted in user time; iowait is idle
    busy = sum(machine) - machine.idle - sum(getattr(machine, f, 0.0) for f in ("iowait", "guest", "guest_nice"))
    own = psutil.Process().cpu_times()
    return time.perf_counter(), busy, own.user + own.system


# The kernel counts CPU time in 10 ms ticks: over a shorter window the share is mostly rounding.
MIN_CPU_WINDOW = 0.5


def others_cpu_share(before: tuple[float, float, float], after: tuple[float, float, float]) -> float | None:
    """The share of the machine's CPU time that other processes used between two _cpu_seconds(),
    None when the window was too short to tell."""
    wall = after[0] - before[0]
    if wall < MIN_CPU_WINDOW:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, min(1.0, others / (wall * (psutil.cpu_count() or 1))))


def measure_speed(loaded: Loaded, prompt: list[int], spec: WorkerSpec) -> dict:
    """pp and tg rates over spec.reps repetitions after one warm-up, time to first token, and how
    much of the CPU other processes took meanwhile (they make the rates noisy)."""
    ctx = loaded.ctx
    cpu_before = _cpu_seconds()
    sampler = Sampler(loaded.model, SamplingOptions(temperature=0, repeat_penalty=1.0), n_ctx=ctx.n_ctx)
    pp_rates: list[float] = []
    tg_rates: list[float] = []
    ttft: list[float] = []
    for rep in range(spec.reps + 1):  # rep 0 is the warm-up
        _emit("phase", phase="warm-up" if rep == 0 else "speed", rep=rep, reps=spec.reps)
        if spec.pp:
            ctx.reset()
            start = time.perf_counter()
            ctx.decode(prompt[: spec.pp])
            done = time.perf_counter()
            sampler.sample(ctx)
            first = time.perf_counter()
            if rep:
                pp_rates.append(spec.pp / (done - start))
                ttft.append(first - start)
        if spec.tg:
            n = spec.tg if rep else min(spec.tg, 8)
            ctx.reset()
            start = time.perf_counter()
            for token in prompt[:n]:
                ctx.decode([token])
            if rep:
                tg_rates.append(n / (time.perf_counter() - start))
    sampler.close()
    return {"pp": pp_rates, "tg": tg_rates, "ttft": ttft, "others_cpu": others_cpu_share(cpu_before, _cpu_seconds())}


def _log_softmax(rows):
    """Row-wise log-softmax in float32 (a 262k vocabulary makes float64 copies costly), summed in float64."""
    rows = rows - rows.max(axis=1, keepdims=True)
    norm = np.log(np.exp(rows).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    rows -= norm
    return rows


def windows(n_tokens: int, spec: WorkerSpec) -> int:
    """How many whole windows of spec.ppl_ctx tokens are scored (at most spec.ppl_chunks)."""
    n_chunks = n_tokens // spec.ppl_ctx
    if spec.ppl_chunks:
        n_chunks = min(n_chunks, spec.ppl_chunks)
    if n_chunks < 1:
        raise ValueError(f"the evaluation text has {n_tokens} tokens, fewer than one window of {spec.ppl_ctx}")
    return n_chunks


def scored_per_window(spec: WorkerSpec) -> int:
    """Positions scored in each window: the second half, as llama-perplexity scores them."""
    return spec.ppl_ctx - 1 - spec.ppl_ctx // 2


def measure_quality(model, tokens: list[int], spec: WorkerSpec, ref: ReferenceReader | None) -> dict:
    """Perplexity over fixed windows; with `ref`, KL divergence and top-token agreement against it.
    The reference run (spec.ref_out) writes its own distributions for the later runs."""
    n_ctx = spec.ppl_ctx
    n_chunks = windows(len(tokens), spec)
    first = n_ctx // 2
    bos = _bos(model)
    opts = LoadOptions(
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=spec.threads,
        n_gpu_layers=spec.gpu_layers,
        use_extra_bufts=spec.use_extra_bufts,
        logits_all=True,
        verbose=True,
        rpc=tuple(spec.rpc),
        tensor_split=tuple(spec.tensor_split),
    )
    nll: list[np.ndarray] = []
    kld: list[np.ndarray] = []
    top1: list[np.ndarray] = []
    writer = (
        ReferenceWriter(
            Path(spec.ref_out), tokens, model.vocab_fingerprint(), n_chunks * scored_per_window(spec), model.n_vocab
        )
        if spec.ref_out
        else None
    )
    with LlamaContext(model, opts) as ctx:
        for chunk in range(n_chunks):
            _emit("phase", phase="quality", rep=chunk + 1, reps=n_chunks)
            window = list(tokens[chunk * n_ctx : (chunk + 1) * n_ctx])
            if bos is not None:
                window[0] = bos
            ctx.reset()
            # Like llama-perplexity, ask for logits only where they are scored: the output layer
            # over a large vocabulary costs as much as the rest of the model.
            ctx.logits_all = False
            ctx.decode(window[:first])
            ctx.logits_all = True
            ctx.decode(window[first:])
            logp = _log_softmax(np.stack([ctx.logits(i) for i in range(n_ctx - 1 - first)]))
            targets = np.asarray(tokens[chunk * n_ctx + first + 1 : (chunk + 1) * n_ctx])
            nll.append(-logp[np.arange(len(targets)), targets])
            if writer is not None:
                writer.add(logp)
            if ref is not None:
                compared = ref.compare(logp)
                kld.append(compared.kld)
                top1.append(compared.same_top)
    if writer is not None:
        writer.close()
    all_nll = np.concatenate(nll)
    result: dict = {
        "ppl": float(np.exp(all_nll.mean())),
        "ppl_error": float(np.exp(all_nll.mean()) * all_nll.std(ddof=1) / np.sqrt(len(all_nll)))
        if len(all_nll) > 1
        else 0.0,
        "scored": len(all_nll),
        "chunks": n_chunks,
        "kld_reference": writer.encoding if writer else None,
    }
    if ref is not None:
        all_kld = np.concatenate(kld)
        result.update(
            kld=float(all_kld.mean()),
            kld_p99=float(np.percentile(all_kld, 99)),
            top1=float(np.concatenate(top1).mean()),
        )
    return result


def _file_type(model: LlamaModel) -> str | None:
    raw = model.meta("general.file_type")
    try:
        return FTYPE_NAMES.get(int(raw)) if raw is not None else None
    except ValueError:
        return None


def run(spec: WorkerSpec) -> dict:
    install(echo=True)  # llama.cpp's log goes to our stderr, which the parent keeps for crash reports
    threads = spec.threads or default_threads()
    _emit("phase", phase="load")
    opts = LoadOptions(
        n_ctx=max(spec.pp + spec.tg, 64),
        n_batch=max(spec.pp, 32),
        n_threads=threads,
        n_gpu_layers=spec.gpu_layers,
        use_extra_bufts=spec.use_extra_bufts,
        verbose=True,
        rpc=tuple(spec.rpc),
        tensor_split=tuple(spec.tensor_split),
    )
    start = time.perf_counter()
    loaded = load(spec.path, opts)
    load_s = time.perf_counter() - start
    model = loaded.model
    text = Path(spec.eval_text).read_text(encoding="utf-8")
    own_tokens = model.tokenize(text, add_special=True, parse_special=False)
    ref = None
    tokens = own_tokens
    note = None
    if spec.ref_in:
        reference = ReferenceReader(Path(spec.ref_in))
        if reference.vocab == model.vocab_fingerprint():
            tokens, ref = reference.tokens, reference
        else:
            note = "vocabulary differs from the reference: no KLD; perplexity on its own tokenization"
    if spec.ref_out:  # before minutes of measuring: is there room for the reference's distributions?
        ensure_room(Path(spec.ref_out), windows(len(tokens), spec) * scored_per_window(spec), model.n_vocab)
    prompt = (tokens[1:] * (1 + (spec.pp + spec.tg) // max(len(tokens) - 1, 1)))[: max(spec.pp, spec.tg)]
    speed = measure_speed(loaded, prompt, spec)
    peak_rss = _peak_rss()  # inference memory, before the quality pass allocates logits for every position
    vram = _vram_used() if spec.gpu_layers else None
    loaded.ctx.close()
    quality = measure_quality(model, tokens, spec, ref) if spec.quality else {}
    result = {
        "quant": _file_type(model),
        "n_vocab": model.n_vocab,
        "n_layer": model.n_layer,
        "load_s": load_s,
        "peak_rss": peak_rss,
        "vram": vram,
        "threads": threads,
        "gpu_layers": min(spec.gpu_layers, model.n_layer + 1),
        "eval_tokens": len(tokens),
        "vocab": model.vocab_fingerprint(),
        "kld_note": note,
        **speed,
        **quality,
    }
    model.close()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = WorkerSpec(**json.loads(args[0]))
    try:
        result = run(spec)
    except LocalrunError as exc:  # the parent raises it again when it concerns the whole bench (NoSpace)
        _emit("error", message=exc.message.splitlines()[0], hint=exc.hint, kind=type(exc).__name__)
        return 1
    except Exception as exc:  # reported to the parent as a failed candidate, not a crash
        _emit("error", message=f"{type(exc).__name__}: {exc}".splitlines()[0], hint=None, kind=None)
        return 1
    _emit("result", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
