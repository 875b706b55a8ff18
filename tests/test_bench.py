"""`localrun bench`: real llama.cpp in real child processes, through the real CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localrun.cli import app

QUICK = ["--reps", "2", "--pp", "32", "--tg", "8", "--ppl-ctx", "128", "--ppl-chunks", "2"]

TOP_KEYS = {
    "schema",
    "date",
    "settings",
    "machine",
    "reference",
    "recommendation",
    "models",
    "warnings",
    "interrupted",
    "elapsed_s",
    "candidates",
}
SETTINGS_KEYS = {
    "pp",
    "tg",
    "reps",
    "threads",
    "gpu_layers",
    "ppl_ctx",
    "ppl_chunks",
    "kld_reference",
    "max_kld",
    "quality",
    "eval_text",
    "use_extra_bufts",
    "workers",
}
CANDIDATE_KEYS = {
    "label",
    "path",
    "quant",
    "repo",
    "model",
    "file_size",
    "status",
    "error",
    "signal",
    "reference",
    "load_s",
    "pp",
    "tg",
    "ttft_ms",
    "peak_rss",
    "vram",
    "threads",
    "gpu_layers",
    "ppl",
    "ppl_error",
    "kld",
    "kld_p99",
    "top1",
    "eval_tokens",
    "ppl_windows",
    "note",
    "others_cpu",
    "pareto",
    "seconds",
}
STAT_KEYS = {"mean", "sd", "n"}


def bench(*args: object):
    result = CliRunner().invoke(app, ["bench", *map(str, args)])
    return result


def by_label(data: dict) -> dict[str, dict]:
    return {c["label"]: c for c in data["candidates"]}


def test_two_tiny_quants_give_complete_sane_figures(tiny):
    result = bench(tiny.quants["Q4_K_M"], tiny.quants["Q8_0"], *QUICK, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema"] == "localrun.bench/3"
    assert data["reference"] == "Q8_0"  # the higher precision, whatever the argument order
    assert [c["label"] for c in data["candidates"]] == ["Q8_0", "Q4_K_M"]  # in the order measured: best first
    tokens = set()
    for c in data["candidates"]:
        assert c["status"] == "ok" and c["error"] is None and c["signal"] is None
        for stat in ("pp", "tg", "ttft_ms"):
            assert c[stat]["n"] == 2 and c[stat]["mean"] > 0 and c[stat]["sd"] >= 0
        assert c["load_s"] > 0 and c["seconds"] > c["load_s"]
        assert c["peak_rss"] > c["file_size"] > 100_000
        assert c["threads"] == data["settings"]["threads"] >= 1 and c["gpu_layers"] == 0
        assert 1 < c["ppl"] < 872**2 and math.isfinite(c["ppl"]) and c["ppl_error"] >= 0
        assert c["ppl_windows"] == 2 and c["eval_tokens"] > 2 * 128
        assert (0 <= c["top1"] <= 1 and c["kld_p99"] >= c["kld"] >= 0) or c["reference"]
        tokens.add(c["eval_tokens"])
    ref, q4 = by_label(data)["Q8_0"], by_label(data)["Q4_K_M"]
    assert ref["reference"] and ref["kld"] == 0.0 and ref["top1"] == 1.0
    assert q4["kld"] > 0 and q4["top1"] < 1 and q4["note"] is None
    assert len(tokens) == 1  # the same tokens for both
    assert data["settings"]["kld_reference"] == "float32"  # the tiny vocabulary: kept exactly
    assert data["recommendation"]["label"] in ("Q8_0", "Q4_K_M")
    assert any(c["pareto"] for c in data["candidates"])
    assert not data["interrupted"]
    # stderr: one progress line per candidate (no live display when not a TTY); stdout is only JSON
    assert "[1/2] Q8_0: tg " in result.stderr and "[2/2] Q4_K_M: tg " in result.stderr


def test_json_schema_is_stable(tiny):
    result = bench(tiny.quants["Q6_K"], tiny.quants["Q2_K"], *QUICK, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == TOP_KEYS
    assert set(data["settings"]) == SETTINGS_KEYS
    assert set(data["machine"]) == {"cpu", "physical_cores", "llama_cpp"}
    assert set(data["recommendation"]) == {"label", "text"}
    for c in data["candidates"]:
        assert set(c) == CANDIDATE_KEYS
        for stat in ("pp", "tg", "ttft_ms"):
            assert set(c[stat]) == STAT_KEYS


def test_crashing_candidate_is_reported_and_the_rest_measured(tiny):
    # The corrupt-vocabulary file is a model of its own (its header names it tiny-dupvocab).
    result = bench(tiny.corrupt_vocab, tiny.quants["Q5_K_M"], tiny.quants["Q3_K_M"], *QUICK, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    corrupt = data["candidates"][0]  # tried first: named first
    assert corrupt["status"] == "crashed" and corrupt["signal"] == "SIGABRT"
    assert "GGML_ASSERT" in corrupt["error"] and corrupt["tg"] is None and not corrupt["pareto"]
    assert [(m["model"], m["reference"]) for m in data["models"]] == [
        ("tiny-dupvocab", None),
        ("tiny-llama", "tiny-llama-Q5_K_M.gguf"),
    ]
    q3 = by_label(data)["tiny-llama-Q3_K_M.gguf"]
    assert q3["status"] == "ok" and q3["kld"] > 0
    assert "crashed (SIGABRT)" in result.stderr


def test_every_candidate_crashing_exits_8(tiny):
    result = bench(tiny.corrupt_vocab, *QUICK)
    assert result.exit_code == 8
    assert "crashed" in result.stdout  # the table still says what happened
    assert "error: no candidate could be measured" in result.stderr


def test_table_csv_and_markdown(tiny):
    files = (tiny.quants["Q8_0"], tiny.quants["Q2_K"])
    table = bench(*files, *QUICK)
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "SIZE", "pp"]
    assert any(line.startswith("*  Q8_0") for line in lines)  # the reference is always Pareto-optimal
    assert "recommended: " in table.stdout and "generation speed (tg, tok/s)" in table.stdout
    assert "KL divergence against Q8_0" in table.stdout and "█" in table.stdout
    assert "\x1b[" not in table.stdout  # piped: no ANSI

    csv_out = bench(*files, *QUICK, "--csv")
    assert csv_out.exit_code == 0, csv_out.stderr
    header, *rows = csv_out.stdout.strip().splitlines()
    assert header.startswith("label,quant,path,file_size,status,reference,pareto,pp_mean,pp_sd,tg_mean")
    assert [r.split(",")[0] for r in rows] == ["Q8_0", "Q2_K"]

    md = bench(*files, *QUICK, "--markdown")
    assert md.exit_code == 0, md.stderr
    assert "| Pareto | model | size | pp t/s |" in md.stdout
    assert "**Recommended:**" in md.stdout


def test_markdown_says_what_ran_where_and_when(tiny):
    """Shared as Markdown, a result names the models, the CPU, threads, llama.cpp and the date."""
    from datetime import datetime, timezone

    from localrun.hardware import cpu_info
    from localrun.inference.llama.build import build_info

    md = bench(tiny.quants["Q8_0"], tiny.quants["Q2_K"], *QUICK, "--markdown", "--threads", "1")
    assert md.exit_code == 0, md.stderr
    head = md.stdout.split("| Pareto |")[0]
    assert "tiny-llama-Q8_0.gguf" in head and "tiny-llama-Q2_K.gguf" in head
    assert cpu_info().model in head and "1 thread" in head
    assert f"llama.cpp {build_info().version}" in head
    assert datetime.now(timezone.utc).strftime("%Y-%m-%d") in head
    rows = [line for line in md.stdout.splitlines() if line.startswith("| ") and "Q2_K" in line]
    assert len(rows) == 1
    ppl = rows[0].split(" | ")[8]  # Pareto, model, size, pp, tg, TTFT, load, RSS, PPL
    value, error = ppl.split(" ± ")
    assert float(value) > 1 and float(error) > 0


def test_bad_arguments(tiny, tmp_path):
    missing = bench(tmp_path / "nope.gguf")
    assert missing.exit_code == 3 and "no such model file" in missing.stderr and missing.stdout == ""
    local_quants = bench(tiny.quants["Q8_0"], "--quants", "Q4_K_M")
    assert local_quants.exit_code == 2 and "--quants needs a repo" in local_quants.stderr


def test_ctrl_c_prints_what_was_measured(tiny):
    """SIGINT to the whole process group (as a terminal does) during the second candidate."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "localrun",
            "bench",
            str(tiny.quants["Q8_0"]),
            str(tiny.quants["F16"]),
            "--reps",
            "3",
            "--pp",
            "32",
            "--tg",
            "8",
            "--ppl-ctx",
            "128",
            "--ppl-chunks",
            "2",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # the first candidate (F16, the reference) is done: interrupt the second
        if line.startswith("[1/2]"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    data = json.loads(stdout)
    assert data["interrupted"] is True
    statuses = {c["label"]: c["status"] for c in data["candidates"]}
    assert statuses["F16"] == "ok" and statuses["Q8_0"] in ("interrupted", "pending")
    assert "interrupted" in stderr


def gemma_requant(gemma: Path, quant: str) -> Path:
    """Gemma 3 270M requantized to `quant` (lower precision), made once into the test cache."""
    from localrun.inference.llama.build import quantize

    target = gemma.parent / f"gemma-3-270m-requant-{quant}.gguf"
    if not target.exists():
        quantize(gemma, target, quant, requantize=True)
    return target


@pytest.mark.slow
def test_gemma_lower_precision_has_higher_kld(gemma):
    """Gemma 3 270M Q4_K_M against lower-precision requantizations of itself: KLD grows as bits shrink."""
    variants = {quant: gemma_requant(gemma, quant) for quant in ("Q3_K_M", "Q2_K")}
    result = bench(
        variants["Q2_K"],
        gemma,
        variants["Q3_K_M"],
        "--reps",
        "1",
        "--pp",
        "64",
        "--tg",
        "8",
        "--ppl-ctx",
        "256",
        "--ppl-chunks",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    c = by_label(data)
    assert data["reference"] == "Q4_K_M" and c["Q4_K_M"]["kld"] == 0.0
    assert data["settings"]["kld_reference"] == "uint16"  # 262k vocabulary: as llama-perplexity keeps it
    assert c["Q2_K"]["kld"] > c["Q3_K_M"]["kld"] > 0.005
    assert c["Q2_K"]["top1"] < c["Q3_K_M"]["top1"] < 1.0
    assert c["Q2_K"]["ppl"] > c["Q4_K_M"]["ppl"]
    assert c["Q4_K_M"]["eval_tokens"] == c["Q2_K"]["eval_tokens"] > 4000  # the shipped text, one tokenization
    assert [x["label"] for x in data["candidates"]] == ["Q4_K_M", "Q3_K_M", "Q2_K"]


def test_repo_quants_are_pulled_then_benched_offline(hub, tiny, monkeypatch):
    repo = "acme/tiny-GGUF"
    hub.add_repo(repo, {f"tiny-llama-{q}.gguf": tiny.quants[q] for q in ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K")})
    nothing = bench(repo, *QUICK)
    assert nothing.exit_code == 3 and "nothing pulled from acme/tiny-GGUF" in nothing.stderr

    pulled = bench(repo, "--quants", "Q6_K,Q2_K", *QUICK, "--json")
    assert pulled.exit_code == 0, pulled.stderr
    data = json.loads(pulled.stdout)
    assert [c["label"] for c in data["candidates"]] == ["Q6_K", "Q2_K"] and data["reference"] == "Q6_K"
    from localrun.model.refs import parse_ref
    from localrun.store.resolve import find

    assert sorted(e.quant for e in find(parse_ref(repo))) == ["Q2_K", "Q6_K"]  # only those were pulled

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what is pulled is benched without the Hub
    again = bench(repo, *QUICK, "--json")
    assert again.exit_code == 0, again.stderr
    assert {c["status"] for c in json.loads(again.stdout)["candidates"]} == {"ok"}
    assert len(json.loads(again.stdout)["candidates"]) == 2


def test_quants_fit_pulls_every_quant_that_fits(hub, tiny):
    hub.add_repo("acme/pair-GGUF", {f"tiny-llama-{q}.gguf": tiny.quants[q] for q in ("Q5_K_M", "Q3_K_M")})
    result = bench("acme/pair-GGUF", "--quants", "fit", *QUICK, "--json")
    assert result.exit_code == 0, result.stderr
    assert "quants that fit: Q5_K_M, Q3_K_M" in result.stderr
    data = json.loads(result.stdout)
    assert [c["label"] for c in data["candidates"]] == ["Q5_K_M", "Q3_K_M"]
    assert all(c["status"] == "ok" for c in data["candidates"])


@pytest.mark.slow
def test_different_models_get_no_kld_against_each_other(gemma, tiny):
    """Gemma and the tiny llama: two models, each its own reference; nothing recommended across them."""
    result = bench(
        gemma,
        tiny.quants["Q8_0"],
        "--reps",
        "1",
        "--pp",
        "32",
        "--tg",
        "4",
        "--ppl-ctx",
        "128",
        "--ppl-chunks",
        "1",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    gemma_row, tiny_row = data["candidates"]  # in the order named
    assert gemma_row["label"] == gemma.name and tiny_row["label"] == tiny.quants["Q8_0"].name
    assert gemma_row["reference"] and tiny_row["reference"] and gemma_row["ppl"] > 1 and tiny_row["ppl"] > 1
    assert data["reference"] is None and data["recommendation"] is None
    assert [m["recommendation"] for m in data["models"]] == [None, None]


def exact_kld(reference: Path, candidate: Path, text: str, n_ctx: int, windows: int) -> float:
    """Mean KL(reference || candidate) over every token of the vocabulary, in float64, at the
    positions llama-perplexity scores (second half of each window, BOS first): straight from the
    logits of both models loaded here, without bench's storage or its floor."""
    import numpy as np

    from localrun.inference.llama.runtime import LlamaContext, LlamaModel, LoadOptions

    def log_softmax(rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.float64)
        rows -= rows.max(axis=1, keepdims=True)
        return rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))

    first = n_ctx // 2
    with LlamaModel(reference, LoadOptions()) as ref_model, LlamaModel(candidate, LoadOptions()) as cand_model:
        tokens = ref_model.tokenize(text, add_special=True, parse_special=False)
        opts = LoadOptions(n_ctx=n_ctx, n_batch=n_ctx, logits_all=True)
        with LlamaContext(ref_model, opts) as ref_ctx, LlamaContext(cand_model, opts) as cand_ctx:
            kls = []
            for w in range(windows):
                window = tokens[w * n_ctx : (w + 1) * n_ctx]
                window[0] = tokens[0]  # BOS
                rows = []
                for ctx in (ref_ctx, cand_ctx):
                    ctx.reset()
                    ctx.decode(window)
                    rows.append(log_softmax(np.stack([ctx.logits(i) for i in range(first, n_ctx - 1)])))
                p = np.exp(rows[0])
                kls.append((p * (rows[0] - rows[1])).sum(axis=1))
    return float(np.concatenate(kls).mean())


@pytest.mark.slow
def test_gemma_kld_is_over_the_whole_vocabulary(gemma):
    """A 262k vocabulary is too big to keep in memory: the reference goes to disk in 16 bits, and
    KLD still agrees with the exact KL over every token (top-256 only was ~7% low on Q2_K)."""
    q2 = gemma_requant(gemma, "Q2_K")
    result = bench(
        q2, gemma, "--reps", "1", "--pp", "16", "--tg", "4", "--ppl-ctx", "256", "--ppl-chunks", "2", "--json"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["settings"]["kld_reference"] == "uint16"
    ours = by_label(data)["Q2_K"]["kld"]
    text = Path(data["settings"]["eval_text"]).read_text(encoding="utf-8")
    exact = exact_kld(gemma, q2, text, 256, 2)
    assert abs(ours - exact) / exact < 0.01, (ours, exact)


def test_reference_16_bit_encoding_keeps_kl(tmp_path):
    """llama-perplexity's 16-bit encoding of log-probabilities, round trip and KL, on a 5k vocabulary."""
    import numpy as np

    from localrun.bench.reference import ReferenceReader, ReferenceWriter, decode_uint16, encode_uint16

    rng = np.random.default_rng(7)
    logits = rng.normal(0, 4, size=(40, 5000)).astype(np.float32)
    noisy = logits + rng.normal(0, 0.5, size=logits.shape).astype(np.float32)

    def log_softmax(x):
        x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    ref, cand = log_softmax(logits), log_softmax(noisy)
    codes, scale, offset = encode_uint16(ref.astype(np.float32))
    back = decode_uint16(codes, scale, offset)
    above = ref > ref.max(axis=1, keepdims=True) - 16
    assert (np.abs(back - ref) <= scale[:, None] * 0.51 + 1e-6)[above].all()  # half a step of rounding
    exact = (np.exp(ref) * (ref - cand)).sum(axis=1)

    writer = ReferenceWriter(tmp_path, [1, 2, 3], "vocab", rows=40, n_vocab=5000, encoding="uint16")
    writer.add(ref[:25].astype(np.float32))
    writer.add(ref[25:].astype(np.float32))
    writer.close()
    reader = ReferenceReader(tmp_path)
    assert reader.tokens == [1, 2, 3] and reader.encoding == "uint16"
    first, rest = reader.compare(cand[:30].astype(np.float32)), reader.compare(cand[30:].astype(np.float32))
    assert np.allclose(np.concatenate([first.kld, rest.kld]), exact, rtol=0.01, atol=1e-4)
    same_top = np.concatenate([first.same_top, rest.same_top])
    assert (same_top == (ref.argmax(axis=1) == cand.argmax(axis=1))).all()


def test_no_room_for_the_reference_is_a_clear_error(tmp_path):
    from localrun.bench.reference import ensure_room
    from localrun.errors import ExitCode, NoSpace

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(NoSpace) as caught:
        ensure_room(tmp_path, rows=free // (2 * 262144) + 1000, n_vocab=262144)
    assert caught.value.exit_code == ExitCode.NO_SPACE
    assert str(tmp_path) in caught.value.message and "free" in caught.value.message
    assert "TMPDIR" in caught.value.hint
    ensure_room(tmp_path, rows=100, n_vocab=872)  # a tiny one fits


def test_live_progress_line_ticks_during_a_long_phase():
    """No event arrives for seconds during a long phase: the elapsed time must still move."""
    import io
    import re
    import time

    from rich.console import Console

    from localrun.bench.results import CandidateResult
    from localrun.commands.bench import ProgressDisplay
    from localrun.output import Output

    stream = io.StringIO()
    out = Output(stderr_tty=True, _err=Console(file=stream, force_terminal=True, width=100, no_color=True))
    results = [CandidateResult("Q8_0", "q8.gguf", "Q8_0", 1000), CandidateResult("Q2_K", "q2.gguf", "Q2_K", 400)]
    with ProgressDisplay(out) as progress:
        progress(results, 0, {"event": "phase", "phase": "quality", "rep": 1, "reps": 8})
        time.sleep(2.5)  # no event meanwhile, as during one window of a big model
    shown = set(re.findall(r"(\d+)s elapsed", stream.getvalue()))
    assert "[1/2] Q8_0: quality 1/8" in stream.getvalue()
    assert len(shown) >= 2, shown


def ranked(*rows: tuple, reps: int = 5, max_kld: float = 0.05):
    """A BenchResult as run_bench leaves it, from (label, tg mean, tg sd, KLD[, others' CPU share])
    rows, the first the reference; ranked by the real rules."""
    from localrun.bench.ranking import mark_pareto, noise_warnings, recommend
    from localrun.bench.results import BenchResult, CandidateResult, Stat

    results = []
    for label, tg, sd, kld, *busy in rows:
        r = CandidateResult(label, f"{label}.gguf", label, 1000, status="ok", reference=not results)
        r.tg, r.pp = Stat(tg, sd, reps), Stat(10 * tg, sd, reps)
        r.kld, r.ppl, r.top1 = kld, 10.0 + 100 * kld, 1.0 - kld
        r.others_cpu = busy[0] if busy else 0.01
        results.append(r)
    bench = BenchResult({"reps": reps, "max_kld": max_kld}, {}, results, reference=results[0].label)
    mark_pareto(bench.results)
    bench.recommendation = recommend(bench)
    bench.warnings = noise_warnings(bench)
    return bench


def test_recommendation_never_rests_on_a_speed_difference_within_noise():
    # Q3_K_M is the fastest by its mean, but within the spread of Q4_K_M, which is closer.
    bench = ranked(("Q8_0", 50.0, 1.0, 0.0), ("Q4_K_M", 80.0, 2.0, 0.01), ("Q3_K_M", 83.0, 2.0, 0.03))
    assert bench.recommendation.label == "Q4_K_M"
    assert "Q3_K_M is not clearly faster (tg within noise)" in bench.recommendation.text
    assert bench.warnings == []  # a quiet run with a small spread

    clear = ranked(("Q8_0", 50.0, 1.0, 0.0), ("Q4_K_M", 80.0, 1.0, 0.01), ("Q3_K_M", 90.0, 1.0, 0.03))
    assert clear.recommendation.label == "Q3_K_M" and "within noise" not in clear.recommendation.text

    # Faster than the reference only within noise: the reference.
    near = ranked(("Q8_0", 50.0, 2.0, 0.0), ("Q6_K", 53.0, 2.0, 0.002))
    assert near.recommendation.label == "Q8_0"
    assert "Q6_K stays within KLD 0.05 but is not clearly faster" in near.recommendation.text


def test_one_rep_busy_machine_and_spread_are_noise():
    # One repetition: no sd, so 10% of the mean is the noise: 80 vs 86 tok/s cannot be told apart.
    once = ranked(("Q8_0", 50.0, 0.0, 0.0), ("Q4_K_M", 80.0, 0.0, 0.01), ("Q3_K_M", 86.0, 0.0, 0.03), reps=1)
    assert once.recommendation.label == "Q4_K_M"
    assert any(w.startswith("one repetition") for w in once.warnings)

    busy = ranked(("Q8_0", 50.0, 1.0, 0.0), ("Q4_K_M", 80.0, 1.0, 0.01), ("Q3_K_M", 86.0, 1.0, 0.03, 0.45))
    assert busy.recommendation.label == "Q4_K_M"
    assert any("busy while Q3_K_M ran" in w and "45%" in w for w in busy.warnings)

    spread = ranked(("Q8_0", 50.0, 1.0, 0.0), ("Q4_K_M", 80.0, 1.0, 0.01), ("Q3_K_M", 90.0, 12.0, 0.03))
    assert spread.recommendation.label == "Q4_K_M"
    assert any("more than 10% between repetitions (Q3_K_M 90.0 ± 12.0" in w for w in spread.warnings)


def test_one_rep_warns_through_the_cli(tiny):
    result = bench(tiny.quants["Q8_0"], tiny.quants["Q4_K_M"], *QUICK[2:], "--reps", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert "warning: one repetition" in result.stderr
    assert any(w.startswith("one repetition") for w in json.loads(result.stdout)["warnings"])


def test_a_busy_machine_is_noticed(tiny):
    """Other processes burning CPU while the candidates run: psutil sees it, bench says so."""
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(1, (os.cpu_count() or 2) // 2))
    ]
    try:
        # Long enough generation runs for the kernel's CPU accounting (10 ms ticks) to tell.
        speed = ["--pp", "512", "--tg", "1536", "--reps", "3", "--ppl-ctx", "128", "--ppl-chunks", "1"]
        result = bench(tiny.quants["Q8_0"], tiny.quants["Q4_K_M"], *speed, "--json")
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert all(c["others_cpu"] > 0.1 for c in data["candidates"]), [c["others_cpu"] for c in data["candidates"]]
    assert "warning: the machine was busy while Q8_0, Q4_K_M ran" in result.stderr


def test_kld_chart_draws_magnitude_not_just_rank():
    """A KLD of 2e-08 is no difference at all: it must not get the full bar the largest value gets."""
    from localrun.commands.bench import bar_chart

    tiny_gap = ranked(("F32", 50.0, 1.0, 0.0), ("F16", 60.0, 1.0, 2e-08))
    chart = bar_chart(tiny_gap).split("KL divergence")[1]
    title, *lines = chart.splitlines()
    assert "full width = KLD 0.05" in title
    f16 = next(line for line in lines if "F16" in line)
    assert "█" not in f16 and "2.0e-08" in f16

    # Above the --max-kld bar, the largest value sets the scale; smaller ones stay in proportion.
    wide = ranked(("Q8_0", 50.0, 1.0, 0.0), ("Q4_K_M", 70.0, 1.0, 0.04), ("Q2_K", 90.0, 1.0, 0.2))
    lines = bar_chart(wide).split("KL divergence")[1].splitlines()
    assert "full width = KLD 0.2" in lines[0]
    bars = {line.split()[0]: line.count("█") for line in lines[1:]}
    assert bars["Q2_K"] == 40 and bars["Q4_K_M"] == 8 and bars["Q8_0"] == 0


def rendered(out_width: int, result) -> str:
    import io

    from rich.console import Console

    from localrun.commands.bench import show
    from localrun.output import Output

    stream = io.StringIO()
    # soft_wrap as Output's own consoles have it: long lines are left to the terminal
    show(Output(stdout_tty=True, _out=Console(file=stream, width=out_width, no_color=True, soft_wrap=True)), result)
    return stream.getvalue()


def test_narrow_terminal_drops_columns_and_never_crops_a_cell(tiny):
    """At 80 and 110 columns every cell shown is whole, the Pareto mark and the note stay, and the
    table says which columns it left out."""
    import io
    import re

    from rich.console import Console

    from localrun.bench.results import BenchOptions
    from localrun.commands.bench import bench as run_command
    from localrun.commands.bench import table_rows
    from localrun.output import Output

    opts = BenchOptions(pp=32, tg=8, reps=2, ppl_ctx=128, ppl_chunks=2)
    out = Output(stdout_tty=True, _out=Console(file=io.StringIO(), width=80, no_color=True))
    files = [str(tiny.corrupt_vocab), str(tiny.quants["Q8_0"]), str(tiny.quants["Q2_K"])]
    result = run_command(files, opts, out)
    assert [r.status for r in result.results] == ["crashed", "ok", "ok"]
    dropped = {}
    for width in (80, 110):
        text = rendered(width, result)
        table = text.split("\nnot shown at")[0]  # a blank line parts two models' rows
        assert max(len(line) for line in text.splitlines()) <= width, text  # paragraphs wrap at words too
        header = table.splitlines()[0].split()
        assert header[0] == "MODEL" and "tg t/s" in " ".join(header) and header[-1] == "NOTE"
        assert "KLD" in header and ("PPL" in header or width == 80)  # PPL goes last, only beside KLD
        said = re.search(
            rf"not shown at {width} columns: (.+?) \(--json or --csv has every column\)", " ".join(text.split())
        )
        assert said, text
        dropped[width] = said.group(1).split(", ")
        flat = "".join(text.split())
        for cells in filter(None, table_rows(result)):
            for name, value in cells.items():
                if name in ("note", "") or name in dropped[width] or name.upper() in dropped[width]:
                    continue
                assert value in table, (width, name, value)
            assert "".join(cells["note"].split()) in flat  # wrapped over lines, never cut
        assert any(line.startswith("*") for line in table.splitlines())  # the Pareto mark
    assert len(dropped[110]) < len(dropped[80])


def test_no_quality_measures_speed_only(tiny):
    files = (tiny.quants["Q8_0"], tiny.quants["Q4_K_M"])
    result = bench(*files, *QUICK, "--no-quality", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["settings"]["quality"] is False and data["reference"] is None
    for c in data["candidates"]:
        assert c["status"] == "ok" and c["tg"]["n"] == 2 and c["pp"]["mean"] > 0
        assert c["ppl"] is None and c["kld"] is None and c["top1"] is None and c["ppl_windows"] is None
    assert data["recommendation"] is None
    assert by_label(data)["Q8_0"]["pareto"]  # the most precise is never beaten on precision

    table = bench(*files, *QUICK, "--no-quality")
    assert table.exit_code == 0, table.stderr
    assert "PPL" not in table.stdout and "KL divergence" not in table.stdout
    assert "speed only (--no-quality)" in table.stdout
    assert "generation speed (tg, tok/s)" in table.stdout


def test_sigterm_removes_the_reference_files(tiny, tmp_path):
    """The reference's distributions can take a gigabyte of the temp folder: a bench ended by
    SIGTERM (or SIGHUP, a closed terminal) removes them as Ctrl-C does."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(folder)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "localrun", "bench", str(tiny.quants["F16"]), str(tiny.quants["Q8_0"]), *QUICK],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # the reference is measured: its files are in the temp folder
        if line.startswith("[1/2]"):
            assert list(folder.glob("localrun-bench-*/*/reference*"))  # one folder per model
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert list(folder.glob("localrun-bench-*")) == []
