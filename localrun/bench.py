"""`localrun bench`: compare quantizations of a model on this machine, for speed and for quality.

Each candidate is measured in a fresh child process (localrun.bench_worker), highest precision
first: that one is the reference. Speed is llama-bench's protocol (pp: a prompt in one batch; tg:
one token at a time; mean and sd over repetitions after a warm-up). Quality is perplexity over
localrun/data/eval.txt in llama-perplexity's fixed windows, and the mean KL divergence of each
candidate's next-token distributions from the reference's on the very same tokens. The reference
distributions are kept whole when they fit in 128 MiB, else as the top 256 log-probs per position
plus one bucket for the remaining mass (for Gemma's 262k vocabulary the full ones would be ~2 GB
for 4.5k tokens); KL over that coarser partition is a lower bound, tight when the tail is small.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from localrun.bench_worker import WorkerSpec
from localrun.errors import EngineCrash, NotFound, UsageError
from localrun.output import Output
from localrun.quants import info as quant_info
from localrun.quants import quant_from_filename

SCHEMA = "localrun.bench/1"


@dataclass
class BenchOptions:
    pp: int = 512
    tg: int = 128
    reps: int = 5
    threads: int | None = None
    gpu_layers: int | None = None  # None: all layers when the build can offload, else 0
    ppl_ctx: int = 512
    ppl_chunks: int | None = None
    kld_top_k: int = 256
    quants: str | None = None  # "Q4_K_M,Q8_0" pulls those; "fit" pulls every quant that fits
    max_kld: float = 0.05  # the recommendation's bar: the fastest candidate within this KLD
    eval_text: Path | None = None
    verbose: bool = False


@dataclass
class Candidate:
    label: str
    path: Path
    quant: str | None
    size: int

    @property
    def precision(self) -> tuple[float, int]:
        known = quant_info(self.quant) if self.quant else None
        return (known.quality if known else -1.0, self.size)


@dataclass
class Stat:
    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: list[float], scale: float = 1.0) -> "Stat | None":
        if not values:
            return None
        scaled = [v * scale for v in values]
        return cls(statistics.fmean(scaled), statistics.stdev(scaled) if len(scaled) > 1 else 0.0, len(scaled))


@dataclass
class CandidateResult:
    label: str
    path: str
    quant: str | None
    file_size: int
    status: str = "pending"  # ok | crashed | failed | interrupted (while measured) | pending (not reached)
    error: str | None = None
    signal: str | None = None
    reference: bool = False
    load_s: float | None = None
    pp: Stat | None = None  # tok/s
    tg: Stat | None = None  # tok/s
    ttft_ms: Stat | None = None
    peak_rss: int | None = None
    vram: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    ppl: float | None = None
    ppl_error: float | None = None
    kld: float | None = None
    kld_p99: float | None = None
    top1: float | None = None  # share of positions whose most likely token matches the reference's
    eval_tokens: int | None = None
    ppl_windows: int | None = None
    note: str | None = None
    pareto: bool = False
    seconds: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Recommendation:
    label: str
    text: str


@dataclass
class BenchResult:
    settings: dict
    machine: dict
    results: list[CandidateResult]
    reference: str | None = None
    recommendation: Recommendation | None = None
    interrupted: bool = False
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "settings": self.settings, "machine": self.machine,
                "reference": self.reference,
                "recommendation": asdict(self.recommendation) if self.recommendation else None,
                "interrupted": self.interrupted, "elapsed_s": round(self.elapsed_s, 2),
                "candidates": [r.to_dict() for r in self.results]}


# -- candidates ----------------------------------------------------------------------------------
def _local_facts(path: Path) -> tuple[str | None, int]:
    """The quant a file holds (its general.file_type, else what its name says) and its size with
    every shard. An unreadable file still becomes a candidate: its worker reports the failure."""
    from localrun import gguf_info
    from localrun.errors import LocalrunError

    try:
        header = gguf_info.read_header(path)
        return header.file_type or quant_from_filename(path.name), header.file_size
    except LocalrunError:
        return quant_from_filename(path.name), path.stat().st_size


def _repo_candidates(ref, opts: BenchOptions, out: Output) -> list[tuple[Path, str | None, int, str]]:
    from dataclasses import replace

    from localrun import store

    if opts.quants:
        wanted = _wanted_quants(ref, opts, out)
        found = []
        from localrun.pull import resolve_model

        for quant in wanted:
            local = resolve_model(replace(ref, tag=quant, filename=None), out, allow_pull=True)
            found.append((local.path, *_local_facts(local.path), f"{ref.repo_id}:{local.quant or quant}"))
        return found
    entries = [e for e in store.find(ref) if e.kind == "model"]
    if not entries:
        raise NotFound(f"nothing pulled from {ref.repo_id} to bench",
                       hint=f"pull quants first (`localrun pull {ref.repo_id}:Q4_K_M`), or pass --quants Q4_K_M,Q8_0 or --quants fit")
    revision = entries[0].commit  # the newest-named revision (main first): never mix revisions
    return [(e.path, e.quant, e.size, e.label) for e in entries if e.commit == revision]


def _wanted_quants(ref, opts: BenchOptions, out: Output) -> list[str]:
    if (opts.quants or "").strip().lower() != "fit":
        return [q.strip() for q in (opts.quants or "").split(",") if q.strip()]
    from localrun import fit, gguf_info, hub

    listing = hub.list_candidates(ref)
    res = fit.Resources.detect()
    wanted = []
    for cand in listing.candidates:
        if not cand.quant:
            continue
        header = gguf_info.read_remote_header(listing.repo_id, cand.files, revision=listing.commit)
        if fit.plan(header, res, n_ctx=max(opts.ppl_ctx, opts.pp + opts.tg)).fits:
            wanted.append(cand.quant)
    if not wanted:
        raise NotFound(f"no quant of {ref.repo_id} fits this machine", hint="run `localrun hw` to see the memory")
    out.info(f"quants that fit: {', '.join(wanted)}")
    return wanted


def resolve_candidates(models: list[str], opts: BenchOptions, out: Output) -> list[Candidate]:
    """MODEL arguments -> candidates: local files as they are; a repo -> its pulled (or --quants) files."""
    from localrun.refs import parse_ref

    if opts.quants and all(parse_ref(m).is_local for m in models):
        raise UsageError("--quants needs a repo (org/repo), not local files")
    found: list[tuple[Path, str | None, int, str]] = []
    for raw in models:
        ref = parse_ref(raw)
        if ref.is_local:
            path = ref.path
            if not path.is_file():
                raise NotFound(f"no such model file: {path}")
            found.append((path, *_local_facts(path), path.name))
        else:
            found.extend(_repo_candidates(ref, opts, out))
    seen: set[str] = set()
    unique = []
    for item in found:
        key = os.path.realpath(item[0])
        if key not in seen:
            seen.add(key)
            unique.append(item)
    if not unique:
        raise UsageError("nothing to bench")
    quant_counts: dict[str | None, int] = {}
    for _, quant, _, _ in unique:
        quant_counts[quant] = quant_counts.get(quant, 0) + 1
    candidates = [Candidate(quant if quant and quant_counts[quant] == 1 else name, Path(path), quant, size)
                  for path, quant, size, name in unique]
    return sorted(candidates, key=lambda c: c.precision, reverse=True)


# -- running -------------------------------------------------------------------------------------
Progress = Callable[[list[CandidateResult], int, dict], None]  # (all results, index measured now, event)


def eval_text_path(opts: BenchOptions) -> Path:
    if opts.eval_text:
        return Path(opts.eval_text)
    return Path(str(resources.files("localrun") / "data" / "eval.txt"))


def run_worker(spec: WorkerSpec, result: CandidateResult, on_event: Callable[[dict], None]) -> dict | None:
    """Measure one candidate in a child process; fill `result` (status ok/failed/crashed) and
    return the worker's raw figures when it finished."""
    from localrun.selftest import _signal_name

    start = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        # No gdb backtrace from ggml on an abort: it is slow and buries llama.cpp's reason.
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "localrun.bench_worker", spec.to_json()],
                                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env)
        data: dict | None = None
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "phase":
                    on_event(event)
                else:
                    data = event
            proc.wait()
        except BaseException:  # Ctrl-C: the child gets it too; make sure it is gone
            proc.kill()
            proc.wait()
            result.status = "interrupted"
            raise
        finally:
            result.seconds = time.perf_counter() - start
            if spec.verbose:  # llama.cpp's log of this candidate, after it (live it would tear the progress line)
                log.seek(0)
                sys.stderr.write(log.read())
        if data is not None and data.get("event") == "result":
            _fill(result, data)
            result.status = "ok"
            return data
        if data is not None and data.get("event") == "error":
            result.status, result.error = "failed", data.get("message")
            return None
        log.seek(0)  # the log is read again for the reason of the failure
        result.signal = _signal_name(proc.returncode)
        result.status = "crashed" if result.signal else "failed"
        what = f"llama.cpp crashed ({result.signal})" if result.signal else f"exit {proc.returncode}"
        reason = _last_words(log.read())
        result.error = what + (f": {reason}" if reason else "")
        return None


def _last_words(log: str) -> str:
    """The line of a child's log that explains its death: an assert or error, else its last line."""
    import re

    lines = [re.sub(r"\S*/([^/\s]+:\d+:)", r"\1", line.strip()) for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line.lower() for word in ("ggml_assert", "error", "failed", "terminate", "abort")):
            return line[-300:]
    return lines[-1][-300:] if lines else ""


def _fill(r: CandidateResult, d: dict) -> None:
    r.quant = r.quant or d.get("quant")
    r.load_s = d["load_s"]
    r.pp, r.tg = Stat.of(d["pp"]), Stat.of(d["tg"])
    r.ttft_ms = Stat.of(d["ttft"], 1000.0)
    r.peak_rss, r.vram, r.threads, r.gpu_layers = d["peak_rss"], d.get("vram"), d["threads"], d["gpu_layers"]
    r.ppl, r.ppl_error, r.eval_tokens, r.ppl_windows = d["ppl"], d["ppl_error"], d["eval_tokens"], d["chunks"]
    r.kld, r.kld_p99, r.top1 = d.get("kld"), d.get("kld_p99"), d.get("top1")
    r.note = d.get("kld_note")


def _machine() -> dict:
    from localrun.hardware import build_info, cpu_info

    cpu = cpu_info()
    return {"cpu": cpu.model, "physical_cores": cpu.physical_cores, "llama_cpp": build_info().version}


def _default_gpu_layers() -> int:
    from localrun.hardware import build_info

    return 999 if build_info().gpu_offload else 0


def run_bench(models: list[str], opts: BenchOptions, out: Output, progress: Progress | None = None) -> BenchResult:
    """Resolve the candidates and measure each, reference first. Ctrl-C returns what was measured."""
    from localrun import selftest
    from localrun.hardware import default_threads

    if opts.reps < 1 or opts.pp < 0 or opts.tg < 0 or opts.ppl_ctx < 16:
        raise UsageError("--reps must be at least 1, --pp/--tg not negative, --ppl-ctx at least 16")
    candidates = resolve_candidates(models, opts, out)
    text = eval_text_path(opts)
    if not text.is_file():
        raise NotFound(f"no such evaluation text: {text}")
    threads = opts.threads or default_threads()
    gpu_layers = _default_gpu_layers() if opts.gpu_layers is None else opts.gpu_layers
    extra_bufts = selftest.use_extra_bufts(out.info)
    settings = {"pp": opts.pp, "tg": opts.tg, "reps": opts.reps, "threads": threads, "gpu_layers": gpu_layers,
                "ppl_ctx": opts.ppl_ctx, "ppl_chunks": opts.ppl_chunks, "kld_top_k": opts.kld_top_k,
                "max_kld": opts.max_kld, "eval_text": str(text), "use_extra_bufts": extra_bufts}
    bench = BenchResult(settings, _machine(), [CandidateResult(c.label, str(c.path), c.quant, c.size) for c in candidates])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="localrun-bench-") as tmp:
        ref_file = Path(tmp) / "reference.npz"
        try:
            for index, (cand, result) in enumerate(zip(candidates, bench.results)):
                have_ref = bench.reference is not None
                spec = WorkerSpec(path=str(cand.path), eval_text=str(text), pp=opts.pp, tg=opts.tg, reps=opts.reps,
                                  threads=threads, gpu_layers=gpu_layers, use_extra_bufts=extra_bufts,
                                  ppl_ctx=opts.ppl_ctx, ppl_chunks=opts.ppl_chunks, kld_top_k=opts.kld_top_k,
                                  ref_out=None if have_ref else str(ref_file),
                                  ref_in=str(ref_file) if have_ref else None, verbose=opts.verbose)
                result.status = "running"
                data = run_worker(spec, result, lambda event: progress and progress(bench.results, index, event))
                if data is not None and not have_ref:
                    bench.reference, result.reference, result.kld, result.top1 = result.label, True, 0.0, 1.0
                    result.kld_p99 = 0.0
                    settings["kld_top_k"] = data["kld_top_k"]  # what was kept: n_vocab = whole distributions
                if progress:
                    progress(bench.results, index, {"event": "done"})
        except KeyboardInterrupt:
            bench.interrupted = True
            for result in bench.results:
                if result.status == "running":
                    result.status = "interrupted"
    bench.elapsed_s = time.perf_counter() - started
    from localrun.bench_report import mark_pareto, recommend

    mark_pareto(bench.results)
    bench.recommendation = recommend(bench)
    return bench


def eta_seconds(bench_results: list[CandidateResult], current: int, current_elapsed: float) -> float | None:
    """Seconds left: the time per byte of finished candidates, times the bytes still to measure."""
    done = [r for r in bench_results if r.status in ("ok", "failed", "crashed") and r.seconds]
    if not done:
        return None
    rate = sum(r.seconds or 0.0 for r in done) / max(sum(r.file_size for r in done), 1)
    left = sum(r.file_size for r in bench_results[current:]) * rate - current_elapsed
    return max(left, 0.0)


def bench_command(models: list[str], opts: BenchOptions, out: Output, fmt: str = "table") -> BenchResult:
    """`localrun bench`: measure with live progress on stderr, then print the result as `fmt`."""
    from localrun import bench_report

    with bench_report.ProgressDisplay(out) as progress:
        result = run_bench(models, opts, out, progress)
    if fmt == "json":
        out.data(result.to_dict())
    elif fmt == "csv":
        out.text(bench_report.to_csv(result))
    elif fmt == "markdown":
        out.text(bench_report.to_markdown(result))
    else:
        bench_report.show(out, result)
    if not result.interrupted and not any(r.status == "ok" for r in result.results):
        raise EngineCrash("no candidate could be measured", hint="the NOTE column says why; --verbose shows llama.cpp's log")
    return result
