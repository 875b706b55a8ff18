"""What a bench measured: per-candidate figures and the run's settings, as JSON-ready dataclasses."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from localrun.model.files import ModelFiles
from localrun.model.quants import info as quant_info

# 2: settings.kld_top_k became kld_reference (distributions kept whole)
# 3: several models in one run: candidates[].model, and models[] with each one's reference and
#    recommendation (the top-level reference and recommendation are those of a run of one model)
#    (added since, which a reader of 3 may ignore: settings.workers, the --rpc endpoints)
SCHEMA = "localrun.bench/3"


@dataclass
class BenchOptions:
    pp: int = 512
    tg: int = 128
    reps: int = 5
    threads: int | None = None
    gpu_layers: int | None = None  # None: all layers when the build can offload, else 0
    ppl_ctx: int = 512
    ppl_chunks: int | None = None
    quants: str | None = None  # "Q4_K_M,Q8_0" pulls those; "fit" pulls every quant that fits
    max_kld: float = 0.05  # the recommendation's bar: the fastest candidate within this KLD
    quality: bool = True  # False: speed only, no perplexity / KLD pass
    eval_text: Path | None = None
    verbose: bool = False


@dataclass(frozen=True)
class Candidate:
    """A file to measure, and the model it is a quantization of: its repo, or for a local file the
    name in its header. Pareto marks, KLD and the recommendation compare quants of one model only."""

    files: ModelFiles
    model: str


def precision(model: ModelFiles) -> tuple[float, int]:
    """How close to the original a candidate is, by its quant name (then its size)."""
    known = quant_info(model.quant) if model.quant else None
    return (known.quality if known else -1.0, model.size)


@dataclass
class Stat:
    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: list[float], scale: float = 1.0) -> Stat | None:
        if not values:
            return None
        scaled = [v * scale for v in values]
        return cls(statistics.fmean(scaled), statistics.stdev(scaled) if len(scaled) > 1 else 0.0, len(scaled))


# ok; crashed (killed by a signal); failed; interrupted (while measured); pending (not reached); running
Status = Literal["ok", "crashed", "failed", "interrupted", "pending", "running"]


@dataclass
class CandidateResult:
    label: str
    path: str
    quant: str | None
    file_size: int
    repo: str | None = None  # org/repo of a pulled model; None for a local file
    model: str = ""  # which model it is a quantization of (Candidate.model)
    status: Status = "pending"
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
    others_cpu: float | None = None  # share of the machine's CPU other processes used during the speed runs
    pareto: bool = False
    seconds: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Recommendation:
    label: str
    text: str


@dataclass
class ModelSummary:
    """One model's part of a bench: the candidate the others' KLD is against, and the pick."""

    model: str
    reference: str | None = None
    recommendation: Recommendation | None = None


@dataclass
class BenchResult:
    settings: dict
    machine: dict
    results: list[CandidateResult]
    date: str = ""  # when the run started, UTC: YYYY-MM-DD HH:MM UTC
    reference: str | None = None  # a run of one model; with several, each one's is in `models`
    recommendation: Recommendation | None = None
    models: list[ModelSummary] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # why the speed figures may be noise
    interrupted: bool = False
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "date": self.date,
            "settings": self.settings,
            "machine": self.machine,
            "reference": self.reference,
            "recommendation": asdict(self.recommendation) if self.recommendation else None,
            "models": [asdict(m) for m in self.models],
            "warnings": self.warnings,
            "interrupted": self.interrupted,
            "elapsed_s": round(self.elapsed_s, 2),
            "candidates": [r.to_dict() for r in self.results],
        }
