"""Ranking a bench: Pareto marks and the recommendation, each within one model's quants (quality
is only comparable between quants of the same model; speed is shown side by side)."""

from __future__ import annotations

from localrun.bench.results import BenchResult, CandidateResult, ModelSummary, Recommendation


def by_model(results: list[CandidateResult]) -> dict[str, list[CandidateResult]]:
    """The candidates of each model, models in the order they were measured."""
    groups: dict[str, list[CandidateResult]] = {}
    for r in results:
        groups.setdefault(r.model, []).append(r)
    return groups


def measured_ok(results: list[CandidateResult]) -> list[CandidateResult]:
    return [r for r in results if r.status == "ok" and r.tg is not None]


def quality_metric(results: list[CandidateResult]) -> str:
    """KLD when every measured candidate has one (same vocabulary as the reference), else perplexity;
    with neither (--no-quality), the precision of the quant type, the order the candidates ran in."""
    measured = measured_ok(results)
    if measured and all(r.kld is not None for r in measured):
        return "kld"
    return "ppl" if any(r.ppl is not None for r in measured) else "precision"


def _losses(results: list[CandidateResult]) -> dict[int, float]:
    """How far each candidate is from the original, by quality_metric (lower is closer), by id()."""
    metric = quality_metric(results)
    if metric == "precision":
        return {id(r): float(i) for i, r in enumerate(results)}  # results come most precise first
    values = {id(r): r.kld if metric == "kld" else r.ppl for r in results}
    return {key: float("inf") if value is None else value for key, value in values.items()}


def mark_pareto(results: list[CandidateResult]) -> None:
    """Mark the rows no other candidate of the same model beats on both generation speed (tg) and quality."""
    for group in by_model(results).values():
        _mark_pareto_within(group)


def _mark_pareto_within(results: list[CandidateResult]) -> None:
    loss = _losses(results)
    measured = measured_ok(results)
    ids = {id(m) for m in measured}
    for r in results:
        r.pareto = id(r) in ids and not any(
            o is not r
            and o.tg.mean >= r.tg.mean  # type: ignore[union-attr]
            and loss[id(o)] <= loss[id(r)]
            and (o.tg.mean > r.tg.mean or loss[id(o)] < loss[id(r)])  # type: ignore[union-attr]
            for o in measured
        )


# Speed figures are noise until shown otherwise: a candidate's tg counts as noisy when its sd is
# above NOISY_SD of its mean, when it was measured once, or when other processes took more than
# BUSY_SHARE of the machine's CPU meanwhile; a noisy figure is only trusted to NOISY_SD.
NOISY_SD = 0.10
BUSY_SHARE = 0.10


def _busy(r: CandidateResult) -> bool:
    return (r.others_cpu or 0.0) > BUSY_SHARE


def speed_noise(r: CandidateResult, reps: int) -> float:
    """How far r's tg mean may be from what a quiet run would give, in tok/s: its sd, and at least
    NOISY_SD of the mean after one repetition or on a busy machine. The sd between repetitions,
    not the standard error: on a shared machine the drift between candidates is the larger part."""
    assert r.tg is not None
    floor = NOISY_SD * r.tg.mean if reps == 1 or _busy(r) else 0.0
    return max(r.tg.sd, floor)


def same_speed(a: CandidateResult, b: CandidateResult, reps: int) -> bool:
    """True when a and b's generation speeds differ by no more than their noise."""
    return abs(a.tg.mean - b.tg.mean) <= speed_noise(a, reps) + speed_noise(b, reps)  # type: ignore[union-attr]


def noise_warnings(bench: BenchResult) -> list[str]:
    """Why the speed figures of this run may be noise, one sentence each (none on a quiet run)."""
    measured = measured_ok(bench.results)
    if not measured:
        return []
    warnings = []
    rule = f"differences within {NOISY_SD:.0%} count as noise"
    if bench.settings.get("reps") == 1:
        warnings.append(f"one repetition: the speeds have no spread to judge them by; {rule} (use --reps 3 or more)")
    busy = [r for r in measured if _busy(r)]
    if busy:
        worst = max(r.others_cpu or 0.0 for r in busy)
        warnings.append(
            f"the machine was busy while {', '.join(r.label for r in busy)} ran (other processes took up to "
            f"{worst:.0%} of the CPU): speeds are not comparable with a quiet run; {rule}"
        )
    spread = [r for r in measured if r.tg.sd > NOISY_SD * r.tg.mean]  # type: ignore[union-attr]
    if spread:
        figures = ", ".join(f"{r.label} {r.tg.mean:.1f} ± {r.tg.sd:.1f}" for r in spread)  # type: ignore[union-attr]
        warnings.append(
            f"generation speed varies by more than {NOISY_SD:.0%} between repetitions ({figures} tok/s): "
            "differences within the spread count as noise"
        )
    return warnings


def summarize(bench: BenchResult) -> None:
    """Rank `bench` as run_bench leaves it: Pareto marks and a recommendation per model; with one
    model, its reference and recommendation are the run's."""
    mark_pareto(bench.results)
    bench.models = []
    for model, group in by_model(bench.results).items():
        ref = next((r.label for r in group if r.reference), None)
        bench.models.append(ModelSummary(model, ref, recommend_within(group, bench.settings)))
    one = bench.models[0] if len(bench.models) == 1 else ModelSummary("")
    bench.reference, bench.recommendation = one.reference, one.recommendation


def recommend(bench: BenchResult) -> Recommendation | None:
    """The recommendation of a bench of one model."""
    return recommend_within(bench.results, bench.settings)


def recommend_within(results: list[CandidateResult], settings: dict) -> Recommendation | None:
    """The candidate closest to the reference among the fastest within settings['max_kld'] of it,
    where "the fastest" are those whose tg is within noise of the top one: a recommendation never
    rests on a speed difference within the noise. `results` are quants of one model."""
    measured = measured_ok(results)
    ref = next((r for r in measured if r.reference), None)
    if ref is None or len(measured) < 2:
        return None
    bar = settings.get("max_kld", 0.05)
    reps = settings.get("reps", 0)
    within = [r for r in measured if r.kld is not None and r.kld <= bar]
    fastest = max(within, key=lambda r: r.tg.mean)  # type: ignore[union-attr]
    ties = [r for r in within if same_speed(r, fastest, reps)]
    best = min(ties, key=lambda r: (r.kld, -r.tg.mean))  # type: ignore[union-attr]
    if best is not ref and same_speed(best, ref, reps):
        # Faster than the reference only within noise: not worth any loss of quality.
        return Recommendation(
            ref.label,
            f"{ref.label}: {best.label} is not clearly faster than it on this run (tg within noise), "
            f"so the reference itself",
        )
    if best is ref:
        others = [r for r in measured if r is not ref and r.kld is not None]
        if not others:
            return Recommendation(ref.label, f"{ref.label}: the other candidates could not be compared with it")
        close = [r for r in within if r is not ref]
        if close:
            return Recommendation(
                ref.label,
                f"{ref.label}: {_joined(close)} {'stays' if len(close) == 1 else 'stay'} within KLD {bar:g} but "
                f"{'is not' if len(close) == 1 else 'none is'} clearly faster on this run (tg within noise)",
            )
        closest = min(others, key=lambda r: r.kld)  # type: ignore[arg-type,return-value]
        return Recommendation(
            ref.label,
            f"{ref.label}: no other candidate stays within KLD {bar:g} of it "
            f"(closest: {closest.label}, KLD {closest.kld:.3f})",
        )
    ratio = best.tg.mean / ref.tg.mean  # type: ignore[union-attr]
    text = f"{best.label}: KLD {best.kld:.3f} against {ref.label} at {ratio:.1f}x its speed"
    passed_over = [r for r in ties if r is not best]
    if passed_over:
        verb = "is" if len(passed_over) == 1 else "are"
        text += f"; {_joined(passed_over)} {verb} not clearly faster (tg within noise), so the closer one"
    return Recommendation(best.label, text)


def _joined(results: list[CandidateResult]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    labels = [r.label for r in results]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + f" and {labels[-1]}"


def sorted_rows(results: list[CandidateResult]) -> list[CandidateResult]:
    """Model by model, in the order they were measured: best quality first; candidates that were
    not measured last, in the order they were tried."""
    return [r for group in by_model(results).values() for r in _sorted_within(group)]


def _sorted_within(results: list[CandidateResult]) -> list[CandidateResult]:
    loss = _losses(results)
    measured = sorted(measured_ok(results), key=lambda r: (loss[id(r)], r.ppl or 0.0))
    ids = {id(m) for m in measured}
    return measured + [r for r in results if id(r) not in ids]
