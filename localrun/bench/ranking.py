"""Ranking a bench: Pareto marks and the recommendation."""

from __future__ import annotations

from localrun.bench.results import BenchResult, CandidateResult, Recommendation


def measured_ok(results: list[CandidateResult]) -> list[CandidateResult]:
    return [r for r in results if r.status == "ok" and r.tg is not None]


def quality_metric(results: list[CandidateResult]) -> str:
    """KLD when every measured candidate has one (same vocabulary as the reference), else perplexity."""
    measured = measured_ok(results)
    return "kld" if measured and all(r.kld is not None for r in measured) else "ppl"


def _loss(r: CandidateResult, metric: str) -> float:
    value = r.kld if metric == "kld" else r.ppl
    return float("inf") if value is None else value


def mark_pareto(results: list[CandidateResult]) -> None:
    """Mark the rows no other candidate beats on both generation speed (tg) and quality."""
    metric = quality_metric(results)
    measured = measured_ok(results)
    ids = {id(m) for m in measured}
    for r in results:
        r.pareto = id(r) in ids and not any(
            o is not r
            and o.tg.mean >= r.tg.mean
            and _loss(o, metric) <= _loss(r, metric)  # type: ignore[union-attr]
            and (o.tg.mean > r.tg.mean or _loss(o, metric) < _loss(r, metric))  # type: ignore[union-attr]
            for o in measured
        )


def recommend(bench: BenchResult) -> Recommendation | None:
    """The fastest candidate whose KLD stays within settings['max_kld'] of the reference."""
    measured = measured_ok(bench.results)
    ref = next((r for r in measured if r.reference), None)
    if ref is None or len(measured) < 2:
        return None
    bar = bench.settings.get("max_kld", 0.05)
    within = [r for r in measured if r.kld is not None and r.kld <= bar]
    best = max(within, key=lambda r: r.tg.mean)  # type: ignore[union-attr]
    if best is ref:
        others = [r for r in measured if r is not ref and r.kld is not None]
        if not others:
            return Recommendation(ref.label, f"{ref.label}: the other candidates could not be compared with it")
        closest = min(others, key=lambda r: r.kld)  # type: ignore[arg-type,return-value]
        return Recommendation(
            ref.label,
            f"{ref.label}: no other candidate stays within KLD {bar:g} of it "
            f"(closest: {closest.label}, KLD {closest.kld:.3f})",
        )
    ratio = best.tg.mean / ref.tg.mean  # type: ignore[union-attr]
    return Recommendation(best.label, f"{best.label}: KLD {best.kld:.3f} against {ref.label} at {ratio:.1f}x its speed")


def sorted_rows(results: list[CandidateResult]) -> list[CandidateResult]:
    """Best quality first; candidates that were not measured last, in the order they were tried."""
    metric = quality_metric(results)
    measured = sorted(measured_ok(results), key=lambda r: (_loss(r, metric), r.ppl or 0.0))
    ids = {id(m) for m in measured}
    return measured + [r for r in results if id(r) not in ids]
