"""`localrun bench`: compare quantizations of a model on this machine, for speed and for quality.

Each candidate is measured in a fresh child process (localrun.bench.worker), highest precision
first: that one is the reference. Speed is llama-bench's protocol (pp: a prompt in one batch; tg:
one token at a time; mean and sd over repetitions after a warm-up). Quality is perplexity over
localrun/data/eval.txt in llama-perplexity's fixed windows, and the mean KL divergence of each
candidate's next-token distributions from the reference's on the very same tokens, over the whole
vocabulary: the reference's distributions are kept in a temporary folder (localrun.bench.reference).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from localrun import fit, hardware
from localrun.bench.ranking import noise_warnings, summarize
from localrun.bench.results import BenchOptions, BenchResult, Candidate, CandidateResult, Stat, precision
from localrun.bench.worker import WorkerSpec
from localrun.errors import LocalrunError, NoSpace, NotFound, UsageError
from localrun.hub.listing import list_quants
from localrun.hub.ranges import read_remote_header
from localrun.inference.llama.build import build_info
from localrun.inference.llama.log import last_error
from localrun.inference.machine import this_machine
from localrun.inference.safety import selftest
from localrun.model.files import ModelFiles, local_files
from localrun.model.header import HeaderInfo, read_header
from localrun.model.quants import quant_from_filename
from localrun.model.refs import ModelRef, parse_ref
from localrun.store.resolve import pulled_models
from localrun.store.usage import touch
from localrun.text import count

# -- candidates ----------------------------------------------------------------------------------
Fetch = Callable[[ModelRef], ModelFiles]  # a repo reference -> the model, pulled first when needed


def _local(path: Path) -> Candidate:
    """A local file as a candidate, its quant from its header (else its name), its model by the
    name in its header. An unreadable file still becomes a candidate: its worker reports the failure."""
    model = local_files(path)
    try:
        header: HeaderInfo | None = read_header(path)
    except LocalrunError:
        header = None
    quant = header.file_type if header else None
    files = ModelFiles(model.files, path.name, quant or quant_from_filename(path.name))
    return Candidate(files, model_name(header) if header else path.name)


def model_name(header: HeaderInfo) -> str:
    """Which model a file is a quantization of: the name llama-quantize keeps from the original,
    else its architecture and size."""
    return header.name or f"{header.architecture} {count(header.n_params)}"


def _repo_candidates(
    ref: ModelRef, opts: BenchOptions, fetch: Fetch, notify: Callable[[str], None]
) -> list[ModelFiles]:
    if opts.quants:
        return [fetch(ref.with_tag(quant)) for quant in _wanted_quants(ref, opts, notify)]
    entries = pulled_models(ref)  # one revision, never mixed; damaged files are not measured
    if not entries:
        raise NotFound(
            f"nothing pulled from {ref.repo_id} to bench",
            hint=f"pull quants first (`localrun pull {ref.repo_id}:Q4_K_M`), "
            "or pass --quants Q4_K_M,Q8_0 or --quants fit",
        )
    return [e.model for e in entries]


def _wanted_quants(ref: ModelRef, opts: BenchOptions, notify: Callable[[str], None]) -> list[str]:
    if (opts.quants or "").strip().lower() != "fit":
        return [q.strip() for q in (opts.quants or "").split(",") if q.strip()]
    listing = list_quants(ref)
    machine = this_machine(notify)
    n_ctx = max(opts.ppl_ctx, opts.pp + opts.tg)
    wanted = []
    for quant in listing.quants:
        if not quant.quant:
            continue
        header = read_remote_header(
            listing.repo_id, quant.files, revision=listing.commit, sizes=[quant.sizes.get(f, 0) for f in quant.files]
        )
        if fit.option(quant.label, quant.quant, quant.size, header, machine, n_ctx).plan.fits:
            wanted.append(quant.quant)
    if not wanted:
        raise NotFound(f"no quant of {ref.repo_id} fits this machine", hint="run `localrun hw` to see the memory")
    notify(f"quants that fit: {', '.join(wanted)}")
    return wanted


def _split_over_workers(cand: Candidate, n_ctx: int, notify: Callable[[str], None]) -> fit.Plan | None:
    """With --rpc: the candidate's plan across this machine and the workers, said; else None."""
    machine = this_machine()
    if not machine.workers:
        return None
    plan = fit.plan(read_header(cand.files.path), machine, n_ctx)
    if not plan.fits:
        raise NoSpace(f"{cand.files.label} does not fit across this machine and its workers")
    notify(f"{cand.files.label}: {plan.note}")
    return plan


def resolve_candidates(
    models: list[str], opts: BenchOptions, fetch: Fetch, notify: Callable[[str], None]
) -> list[Candidate]:
    """MODEL arguments -> candidates, model by model (in the order named), each model's most
    precise first: local files as they are; a repo -> its pulled (or --quants) models. With one
    model they are labelled by quant when that names one, else by file name; with several, so that
    every row says which model it is: org/repo:QUANT, or a local file's name."""
    refs = [parse_ref(m) for m in models]
    if opts.quants and all(ref.is_local for ref in refs):
        raise UsageError("--quants needs a repo (org/repo), not local files")
    found: list[Candidate] = []
    for ref in refs:
        if ref.is_local:
            assert ref.path is not None
            found.append(_local(ref.path))
        else:
            found.extend(
                Candidate(m, m.repo_id or ref.repo_id or "") for m in _repo_candidates(ref, opts, fetch, notify)
            )
    seen: set[str] = set()
    unique = []
    for cand in found:
        key = os.path.realpath(cand.files.path)
        if key not in seen:
            seen.add(key)
            unique.append(cand)
    if not unique:
        raise UsageError("nothing to bench")
    names = list(dict.fromkeys(c.model for c in unique))
    counts: dict[str | None, int] = {}
    for cand in unique:
        counts[cand.files.quant] = counts.get(cand.files.quant, 0) + 1

    def label(m: ModelFiles) -> str:
        if len(names) > 1:
            return m.label if m.repo_id else m.path.name
        return m.quant if m.quant and counts[m.quant] == 1 else m.label

    labelled = [
        Candidate(ModelFiles(c.files.files, label(c.files), c.files.quant, c.files.repo_id), c.model) for c in unique
    ]
    by_precision = sorted(labelled, key=lambda c: precision(c.files), reverse=True)
    return sorted(by_precision, key=lambda c: names.index(c.model))


# -- running -------------------------------------------------------------------------------------
BenchProgress = Callable[[list[CandidateResult], int, dict], None]  # (all results, index measured now, event)


def eval_text_path(opts: BenchOptions) -> Path:
    if opts.eval_text:
        return Path(opts.eval_text)
    return Path(str(resources.files("localrun") / "data" / "eval.txt"))


def run_worker(spec: WorkerSpec, result: CandidateResult, on_event: Callable[[dict], None]) -> dict | None:
    """Measure one candidate in a child process; fill `result` (status ok/failed/crashed) and
    return the worker's raw figures when it finished."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        # No gdb backtrace from ggml on an abort: it is slow and buries llama.cpp's reason.
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "localrun.bench.worker", spec.to_json()],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
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
            if data.get("kind") == "NoSpace":  # no room for the reference: no candidate could be compared
                raise NoSpace(data["message"], hint=data.get("hint"))
            result.status, result.error = "failed", data.get("message")
            return None
        log.seek(0)  # the log is read again for the reason of the failure
        result.signal = selftest.signal_name(proc.returncode)
        result.status = "crashed" if result.signal else "failed"
        what = f"llama.cpp crashed ({result.signal})" if result.signal else f"exit {proc.returncode}"
        reason = last_error(log.read().splitlines(), or_last_line=True)
        result.error = what + (f": {reason}" if reason else "")
        return None


def _fill(r: CandidateResult, d: dict) -> None:
    r.quant = r.quant or d.get("quant")
    r.load_s = d["load_s"]
    r.pp, r.tg = Stat.of(d["pp"]), Stat.of(d["tg"])
    r.ttft_ms = Stat.of(d["ttft"], 1000.0)
    r.peak_rss, r.vram, r.threads, r.gpu_layers = d["peak_rss"], d.get("vram"), d["threads"], d["gpu_layers"]
    r.ppl, r.ppl_error, r.ppl_windows = d.get("ppl"), d.get("ppl_error"), d.get("chunks")
    r.eval_tokens = d["eval_tokens"]
    r.kld, r.kld_p99, r.top1 = d.get("kld"), d.get("kld_p99"), d.get("top1")
    r.note = d.get("kld_note")
    r.others_cpu = d.get("others_cpu")


def run_bench(
    candidates: list[Candidate],
    opts: BenchOptions,
    notify: Callable[[str], None],
    progress: BenchProgress | None = None,
) -> BenchResult:
    """Measure each candidate; the first of each model to be measured (its most precise) is that
    model's reference. Ctrl-C returns what was measured."""
    if opts.reps < 1 or opts.pp < 0 or opts.tg < 0 or opts.ppl_ctx < 16:
        raise UsageError("--reps must be at least 1, --pp/--tg not negative, --ppl-ctx at least 16")
    text = eval_text_path(opts)
    if not text.is_file():
        raise NotFound(f"no such evaluation text: {text}")
    build = build_info()
    cpu = hardware.cpu_info()
    threads = opts.threads or hardware.default_threads()
    gpu_layers = (999 if build.gpu_offload else 0) if opts.gpu_layers is None else opts.gpu_layers
    extra_bufts = selftest.use_extra_bufts(notify)
    settings = {
        "pp": opts.pp,
        "tg": opts.tg,
        "reps": opts.reps,
        "threads": threads,
        "gpu_layers": gpu_layers,
        "ppl_ctx": opts.ppl_ctx,
        "ppl_chunks": opts.ppl_chunks,
        "kld_reference": None,  # how the reference's distributions were kept: float32 or uint16
        "max_kld": opts.max_kld,
        "quality": opts.quality,
        "eval_text": str(text),
        "use_extra_bufts": extra_bufts,
        "workers": [w.endpoint for w in this_machine().workers],  # --rpc: each plan splits the layers
    }
    machine = {"cpu": cpu.model, "physical_cores": cpu.physical_cores, "llama_cpp": build.version}
    bench = BenchResult(
        settings,
        machine,
        [
            CandidateResult(c.files.label, str(c.files.path), c.files.quant, c.files.size, c.files.repo_id, c.model)
            for c in candidates
        ],
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    index_of = {model: i for i, model in enumerate(dict.fromkeys(c.model for c in candidates))}
    started = time.perf_counter()
    with _hangup_as_interrupt(), tempfile.TemporaryDirectory(prefix="localrun-bench-") as tmp:
        try:
            references: set[str] = set()  # the models whose reference was measured
            for index, (cand, result) in enumerate(zip(candidates, bench.results)):
                have_ref = cand.model in references
                # speed only: no reference to write or read; else one folder per model
                ref_dir = os.path.join(tmp, str(index_of[cand.model])) if opts.quality else None
                if index and cand.model != candidates[index - 1].model:  # the last model's reference is done with
                    shutil.rmtree(os.path.join(tmp, str(index_of[candidates[index - 1].model])), ignore_errors=True)
                spec = WorkerSpec(
                    path=str(cand.files.path),
                    eval_text=str(text),
                    pp=opts.pp,
                    tg=opts.tg,
                    reps=opts.reps,
                    threads=threads,
                    gpu_layers=gpu_layers,
                    use_extra_bufts=extra_bufts,
                    ppl_ctx=opts.ppl_ctx,
                    ppl_chunks=opts.ppl_chunks,
                    quality=opts.quality,
                    ref_out=None if have_ref else ref_dir,
                    ref_in=ref_dir if have_ref else None,
                    verbose=opts.verbose,
                )
                split = _split_over_workers(cand, max(opts.ppl_ctx, opts.pp + opts.tg), notify)
                if split is not None:
                    spec.gpu_layers, spec.rpc, spec.tensor_split = (
                        split.n_gpu_layers,
                        list(split.rpc),
                        list(split.tensor_split),
                    )
                if ref_dir:
                    os.makedirs(ref_dir, exist_ok=True)
                result.status = "running"
                data = run_worker(spec, result, _forward(progress, bench.results, index))
                if data is not None:
                    touch(cand.files.path)  # "last used" in `localrun list`: it was loaded and run
                if data is not None and not have_ref and opts.quality:
                    references.add(cand.model)
                    result.reference, result.kld, result.top1, result.kld_p99 = True, 0.0, 1.0, 0.0
                    settings["kld_reference"] = settings["kld_reference"] or data["kld_reference"]
                if progress:
                    progress(bench.results, index, {"event": "done"})
        except KeyboardInterrupt:
            bench.interrupted = True
            for result in bench.results:
                if result.status == "running":
                    result.status = "interrupted"
    bench.elapsed_s = time.perf_counter() - started
    summarize(bench)
    bench.warnings = noise_warnings(bench)
    return bench


@contextmanager
def _hangup_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (a closed terminal) end the bench as Ctrl-C does, so the temporary folder
    is removed: the reference's distributions in it can take a gigabyte."""
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {name: signal.signal(getattr(signal, name), interrupt) for name in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def _forward(progress: BenchProgress | None, results: list[CandidateResult], index: int) -> Callable[[dict], None]:
    """A worker's phase events, passed on with which candidate they are about."""

    def forward(event: dict) -> None:
        if progress:
            progress(results, index, event)

    return forward


def eta_seconds(bench_results: list[CandidateResult], current: int, current_elapsed: float) -> float | None:
    """Seconds left: the time per byte of finished candidates, times the bytes still to measure."""
    done = [r for r in bench_results if r.status in ("ok", "failed", "crashed") and r.seconds]
    if not done:
        return None
    rate = sum(r.seconds or 0.0 for r in done) / max(sum(r.file_size for r in done), 1)
    left = sum(r.file_size for r in bench_results[current:]) * rate - current_elapsed
    return max(left, 0.0)
