"""Speculative decoding is exact: at temperature 0 the tokens are those of plain decoding, and with
sampling the distribution is the same; stop strings, max tokens, EOG in a draft and Ctrl-C hold."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from localrun.inference.generation.events import Piece, Speculation, Stats
from localrun.inference.generation.settings import SamplingOptions
from localrun.inference.generation.speculative import K_MAX, Controller, CostCurve, Evidence, LookupDrafter
from support.engines import open_engine

EVAL = (Path(__file__).resolve().parents[1] / "localrun" / "data" / "eval.txt").read_text()
GREEDY = SamplingOptions(temperature=0, repeat_penalty=1.0)
# Copy-heavy (the reply repeats the prompt) and free (nothing to look up) prompts.
PROMPTS = [
    f"Copy this text exactly.\n\n{EVAL[:900]}\n\nCopy:\n{EVAL[:120]}",
    f"{EVAL[1000:1800]}\n\nRepeat the last sentence:",
    "Once upon a time, in a village by the sea,",
    "the old man said to the boy that the sea was very big and the boy said",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
]
# Batched and one-at-a-time decoding differ in the last bits (other kernels, other summation
# order): where the two best logits are closer than this, either may win, speculation or not.
NEAR_TIE = 1.0


def generate(engine, prompt: str, n: int, *, stop=(), sampling=GREEDY) -> tuple[list[int], str, Stats]:
    tokens = engine.tokenize(prompt)
    pieces, stats = [], None
    for event in engine.generate(tokens, sampling, n, list(stop)):
        if isinstance(event, Piece):
            pieces.append(event.text)
        elif isinstance(event, Stats):
            stats = event
    return engine.cached[len(tokens) :], "".join(pieces), stats


def margin_at(model: Path, prompt: str, reply: list[int]) -> float:
    """The gap between the two best logits, decoding one token at a time, after `reply`."""
    engine = open_engine(model, n_ctx=4096, speculate="off")
    try:
        engine.ctx.decode(engine.tokenize(prompt) + reply)
        top = np.sort(engine.ctx.logits(-1))[-2:]
        return float(top[1] - top[0])
    finally:
        engine.close()


def assert_same_or_near_tie(model: Path, prompt: str, plain: tuple, spec: tuple) -> bool:
    """True when identical; else the first difference must sit at a near-tie of plain decoding."""
    (a_tokens, a_text, _), (b_tokens, b_text, _) = plain, spec
    if a_text == b_text:
        return True
    first = next((i for i, (x, y) in enumerate(zip(a_tokens, b_tokens)) if x != y), min(len(a_tokens), len(b_tokens)))
    gap = margin_at(model, prompt, a_tokens[:first])
    assert gap < NEAR_TIE, f"speculation changed token {first} where plain decoding was sure (gap {gap:.2f})"
    return False


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "split"])
def test_temperature_zero_tokens_are_those_of_plain_decoding(tiny, quant):
    model = tiny.split[0] if quant == "split" else tiny.quants[quant]
    plain, spec = open_engine(model, n_ctx=2048, speculate="off"), open_engine(model, n_ctx=2048, speculate="lookup")
    try:
        identical = 0
        for prompt in PROMPTS:
            a, b = generate(plain, prompt, 48), generate(spec, prompt, 48)
            identical += assert_same_or_near_tie(model, prompt, a, b)
            assert b[2].finish_reason == a[2].finish_reason
        assert identical >= 1  # near-ties are rare enough that most replies match outright
        assert spec.speculator.stats.drafted > 0  # the lookup had something to verify
    finally:
        plain.close()
        spec.close()


@pytest.mark.slow
def test_gemma_temperature_zero_with_lookup_and_auto(gemma):
    plain = open_engine(gemma, n_ctx=4096, speculate="off")
    outputs = {}
    try:
        for prompt in PROMPTS:
            outputs[prompt] = generate(plain, prompt, 64)
    finally:
        plain.close()
    for mode in ("lookup", "auto"):
        spec = open_engine(gemma, n_ctx=4096, speculate=mode)
        try:
            for prompt in PROMPTS:
                reply = generate(spec, prompt, 64)
                assert_same_or_near_tie(gemma, prompt, outputs[prompt], reply)
                if mode == "lookup" and prompt == PROMPTS[0]:  # copying: most drafts are right
                    stats = reply[2]
                    assert stats.drafted > 30 and stats.accepted / stats.drafted > 0.5
        finally:
            spec.close()


def test_stop_strings_max_tokens_and_an_end_inside_a_draft(tiny):
    model = tiny.quants["Q8_0"]
    plain, spec = open_engine(model, n_ctx=2048, speculate="off"), open_engine(model, n_ctx=2048, speculate="lookup")
    try:
        prompt = PROMPTS[4]
        full = generate(plain, prompt, 40, sampling=SamplingOptions(temperature=0, repeat_penalty=1.0, ban_eog=True))
        text = full[1]
        stop = text[10:14]
        for n in (1, 2, 7, 40):  # max tokens cut anywhere, even inside an accepted draft
            a = generate(plain, prompt, n)
            b = generate(spec, prompt, n)
            assert_same_or_near_tie(model, prompt, a, b)
            assert b[2].generated_tokens <= n
        a, b = generate(plain, prompt, 40, stop=[stop]), generate(spec, prompt, 40, stop=[stop])
        assert a[1] == b[1] and b[2].finish_reason == a[2].finish_reason == "stop"
        assert stop not in b[1]
        # A reply that ends: the end-of-text token may arrive inside an accepted draft.
        eog = plain.model.eog_tokens()[0]
        echo = f"{prompt}{plain.model.piece(eog, special=True).decode()}{prompt}"
        a, b = generate(plain, echo, 60), generate(spec, echo, 60)
        assert_same_or_near_tie(model, echo, a, b)
        assert b[2].finish_reason == a[2].finish_reason
    finally:
        plain.close()
        spec.close()


@pytest.mark.slow
def test_sampling_distribution_is_unchanged(gemma):
    """With a seed and temperature 1, plain and speculative decoding draw the same tokens from the
    same chain in the same order, so over many seeds the distributions match (chi-square); the
    same seed need not give the same tokens, for batched logits differ in the last bits. Gemma
    follows a repeating prompt, so prompt lookup has drafts to verify at almost every step."""
    from scipy.stats import chi2_contingency

    model, seeds = gemma, 150
    plain, spec = open_engine(model, n_ctx=1024, speculate="off"), open_engine(model, n_ctx=1024, speculate="lookup")
    prompt = "red, green, blue, red, green, blue, red, green, blue, red, green,"
    counts: dict[str, Counter] = {"plain": Counter(), "spec": Counter()}
    try:
        drafted = 0
        for seed in range(seeds):
            sampling = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=seed)
            for name, engine in (("plain", plain), ("spec", spec)):
                tokens, _, stats = generate(engine, prompt, 4, sampling=sampling)
                counts[name][tuple(tokens[1:3])] += 1
                drafted += stats.drafted
    finally:
        plain.close()
        spec.close()
    assert drafted > seeds  # speculation was at work in most of the replies
    keys = sorted(set(counts["plain"]) | set(counts["spec"]))
    common = [k for k in keys if counts["plain"][k] + counts["spec"][k] >= 10]
    table = [
        [counts[name][k] for k in common] + [sum(counts[name][k] for k in keys if k not in common)]
        for name in ("plain", "spec")
    ]
    assert chi2_contingency(table).pvalue > 0.01


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_verifying_leaves_a_working_engine(gemma):
    """Ctrl-C thrown in right after a verify batch (as drive() does on a terminal): the reply ends
    as cancelled, and the next one is what plain decoding gives."""
    spec = open_engine(gemma, n_ctx=4096, speculate="lookup")
    try:
        prompt = f"Copy this text exactly.\n\n{EVAL[:3000]}\n\nCopy:\n{EVAL[:100]}"
        events = spec.generate(spec.tokenize(prompt), GREEDY, 400, [])
        verified = 0
        for event in events:
            if isinstance(event, Speculation):
                verified += 1
                if verified == 3:
                    stats = events.throw(KeyboardInterrupt)
                    break
        assert isinstance(stats, Stats) and stats.finish_reason == "cancelled" and stats.drafted > 0
        again = generate(spec, PROMPTS[2], 16)
        plain = open_engine(gemma, n_ctx=4096, speculate="off")
        try:
            assert_same_or_near_tie(gemma, PROMPTS[2], generate(plain, PROMPTS[2], 16), again)
        finally:
            plain.close()
    finally:
        spec.close()


def test_a_draft_model_keeps_the_tokens(tiny):
    """A smaller quant of the same model drafts (the same vocabulary); the tokens are those of
    plain decoding, and most drafts are accepted."""
    from localrun.inference.machine import this_machine
    from localrun.model.refs import parse_ref
    from localrun.store.resolve import resolve

    model = tiny.quants["F16"]
    draft = resolve(parse_ref(str(tiny.quants["Q8_0"])), this_machine(), 2048).model
    plain = open_engine(model, n_ctx=2048, speculate="off")
    spec = open_engine(model, n_ctx=2048, speculate="draft", draft=draft)
    try:
        assert [type(d).__name__ for d in spec.speculator.drafters] == ["ModelDrafter"]
        for prompt in PROMPTS:
            assert_same_or_near_tie(model, prompt, generate(plain, prompt, 40), generate(spec, prompt, 40))
        stats = spec.speculator.stats
        assert stats.drafted > 40 and stats.accepted / stats.drafted > 0.5
    finally:
        plain.close()
        spec.close()


def test_a_draft_of_another_vocabulary_or_one_that_does_nothing_is_refused(tiny, gemma):
    from typer.testing import CliRunner

    from localrun.cli import app

    runner = CliRunner()
    other = runner.invoke(app, ["run", str(tiny.quants["Q8_0"]), "hi", "--draft", str(gemma), "-n", "4"])
    assert other.exit_code == 2 and "has another vocabulary than the model" in other.stderr
    idle = runner.invoke(app, ["run", str(tiny.quants["Q8_0"]), "hi", "--draft", str(gemma), "--speculate", "lookup"])
    assert idle.exit_code == 2 and "--draft does nothing with --speculate lookup" in idle.stderr


def measured_curve() -> CostCurve:
    """A cost curve as Gemma 3 270M on 2 cores measures it for batches up to 9 rows (ms): the small
    batches, on matrix-vector kernels, are the dearest per row."""
    curve = CostCurve()
    for size, ms in {1: 19.7, 2: 32.8, 3: 39.7, 4: 46.6, 5: 67.1, 6: 72.7, 7: 80.2, 8: 69.2, 9: 96.7}.items():
        curve.observe(size, ms / 1000)
    return curve


LONG = Evidence("a match of 32+", 33 / 34)  # a copy being followed
SHORT = Evidence("a match of 2+", 3 / 4)  # a common phrase


def test_acceptance_counts_only_the_drafted_tokens_the_model_judged():
    # every batch of 8 accepts 4 and rejects the 5th: the last 3 were never judged
    controller = Controller()
    for _ in range(30):
        controller.choose(8, 1, CostCurve(), SHORT)
        controller.observe(8, 4)
    assert controller.accept(SHORT) == pytest.approx(0.8, abs=0.01)


def test_a_long_copy_is_verified_in_wide_batches_once_its_drafts_hold():
    # a wide batch never measured is priced at most the guessed cost per row beyond the widest
    # seen (their slope, extended, made 33 rows cost 16 plain steps, where they cost 10.5)
    curve = measured_curve()
    assert curve.cost(33) <= curve.cost(9) + 24 * CostCurve.ROW + 1e-9
    controller = Controller()
    for _ in range(8):
        k = controller.choose(K_MAX, 1, curve, LONG)
        controller.observe(k, k)
    assert controller.choose(K_MAX, 1, curve, LONG) > 16


def test_drafts_on_short_matches_are_judged_apart_from_those_on_long_ones():
    controller = Controller()
    curve = measured_curve()
    for _ in range(10):
        controller.choose(K_MAX, 1, curve, LONG)
        controller.observe(16, 16)
        controller.choose(K_MAX, 1, curve, SHORT)
        controller.observe(2, 0)
    assert controller.choose(K_MAX, 1, curve, SHORT) == 0
    assert controller.choose(K_MAX, 1, curve, LONG) > 8


def test_a_lookup_tells_how_far_back_its_match_goes():
    copied = list(range(100, 140))
    lookup = LookupDrafter()
    history = [*copied, 7, *copied[:20]]  # the copy followed for 20 tokens
    assert lookup.draft(history, 4) == copied[20:24]
    assert lookup.evidence().kind == "a match of 16+"
    history = [5, 6, 1, 2, 3, 9, 9, 9, 1, 2]  # only "1 2" was seen before
    assert LookupDrafter().draft(history, 3) == [3, 9, 9]
    drafter = LookupDrafter()
    drafter.draft(history, 3)
    assert drafter.evidence() == SHORT
