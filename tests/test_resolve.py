"""One resolver: every command agrees on which model a reference names, and a repo reference
without a tag loads what the planner chooses among the pulled quants, with the plan it was chosen by."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download
from typer.testing import CliRunner

from localrun import fit, hardware
from localrun.cli import app
from localrun.errors import BadModel
from localrun.hardware import Machine
from localrun.hub import settings
from localrun.inference.machine import this_machine
from localrun.inference.safety import selftest
from localrun.model.header import read_header
from localrun.model.refs import parse_ref
from localrun.store.resolve import resolve

runner = CliRunner()
REPO = "org/tiny-GGUF"
GiB = 2**30
QUICK_BENCH = ["--reps", "1", "--pp", "16", "--tg", "4", "--ppl-ctx", "128", "--ppl-chunks", "1", "--json"]


def fetch(filename: str, revision: str = "main") -> Path:
    return Path(
        hf_hub_download(REPO, filename, revision=revision, endpoint=settings.endpoint(), cache_dir=settings.cache_dir())
    )


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def run_json(ref: str, *options: object) -> dict:
    result = cli("run", ref, "hi", "-n", "2", "--temp", "0", "--json", *options)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_a_dangling_quant_is_never_chosen_and_every_command_agrees(hub, tiny, monkeypatch):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]})
    fetch("tiny-Q8_0.gguf").resolve().unlink()  # the better quant lost its blob
    fetch("tiny-Q4_K_M.gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # all of it from the cache
    assert run_json(REPO)["model"] == f"{REPO}:Q4_K_M"
    show = cli("show", REPO, "--json")
    assert show.exit_code == 0, show.stderr
    assert json.loads(show.stdout)["model"] == f"{REPO}:Q4_K_M"
    bench = cli("bench", REPO, *QUICK_BENCH)
    assert bench.exit_code == 0, bench.stderr
    assert [c["label"] for c in json.loads(bench.stdout)["candidates"]] == ["Q4_K_M"]
    # Named, the damaged quant is an error everywhere, with the repair to make.
    for command in ("show", "run"):
        result = cli(command, f"{REPO}:Q8_0", *(["hi"] if command == "run" else []))
        assert result.exit_code == 7 and "a file is missing from the cache" in result.stderr, result.stderr


def test_without_a_main_ref_the_most_recently_pulled_revision_wins_everywhere(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"]}, revision="v1")
    hub.add_repo(REPO, {"tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]}, revision="v2")
    old, new = fetch("tiny-Q8_0.gguf", "v1"), fetch("tiny-Q4_K_M.gguf", "v2")
    os.utime(old, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    os.utime(new, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    assert not (settings.repo_folder(REPO) / "refs" / "main").exists()
    assert run_json(REPO)["model"] == f"{REPO}:Q4_K_M"
    assert json.loads(cli("show", REPO, "--json").stdout)["model"] == f"{REPO}:Q4_K_M"
    bench = cli("bench", REPO, *QUICK_BENCH)
    assert [c["label"] for c in json.loads(bench.stdout)["candidates"]] == ["Q4_K_M"]
    # A revision named explicitly is that one.
    assert json.loads(cli("show", REPO, "--revision", "v1", "--json").stdout)["model"] == f"{REPO}:Q8_0"


def described(monkeypatch: pytest.MonkeyPatch, ram_available: int) -> Machine:
    """The machine the planner is told about: RAM cannot be taken away from this one, so the
    detection is the boundary replaced; everything above it (resolver, planner, load) runs."""
    machine = Machine(4 * GiB, ram_available, [], hardware.cpu_info())
    monkeypatch.setattr(hardware, "detect", lambda: machine)
    return machine


def test_a_repo_reference_loads_the_quant_the_planner_chooses_not_the_best_present(hub, tiny, monkeypatch):
    hub.add_repo(REPO, {f"tiny-{q}.gguf": tiny.quants[q] for q in ("F16", "Q8_0", "Q4_K_M")})
    for q in ("F16", "Q8_0", "Q4_K_M"):
        fetch(f"tiny-{q}.gguf")
    extra = selftest.use_extra_bufts()
    probe = Machine(4 * GiB, 4 * GiB, [], hardware.cpu_info(), extra_bufts=extra)
    # At the smallest context the planner would reduce to, so that no larger quant fits by shrinking it.
    ctx = fit.MIN_CTX
    need = {q: fit.plan(read_header(tiny.quants[q]), probe, ctx).estimate.ram for q in ("F16", "Q8_0", "Q4_K_M")}
    assert need["F16"] > need["Q8_0"] > need["Q4_K_M"]
    # Room for Q4_K_M only (the headroom kept for the system, plus its estimate).
    described(monkeypatch, fit.ram_headroom(probe) + need["Q4_K_M"])
    found = resolve(parse_ref(REPO), this_machine(), ctx)
    assert found.model.label == f"{REPO}:Q4_K_M" and found.plan.fits and found.plan.n_ctx == ctx
    data = run_json(REPO, "--ctx", ctx)
    assert (data["model"], data["quant"], data["name"]) == (f"{REPO}:Q4_K_M", "Q4_K_M", "tiny-llama")
    piped = cli("run", REPO, "hi", "-n", "2", "--temp", "0", "--ctx", ctx)
    assert f"{REPO}:Q4_K_M · prompt" in piped.stderr  # the stats line names what was loaded
    assert json.loads(cli("show", REPO, "--ctx", ctx, "--json").stdout)["model"] == f"{REPO}:Q4_K_M"
    # With room for everything, the best quality present.
    described(monkeypatch, 64 * GiB)
    assert run_json(REPO, "--ctx", ctx)["model"] == f"{REPO}:F16"


def test_the_plan_knows_the_self_test_verdict_before_it_estimates(tiny, monkeypatch):
    ref = parse_ref(str(tiny.quants["Q4_K_M"]))
    cpu = hardware.cpu_info()
    if not fit.repack_types(cpu.features):
        pytest.skip("this CPU repacks no weight type: the verdict cannot change the estimate")
    machine = Machine(16 * GiB, 8 * GiB, [], cpu)
    monkeypatch.setattr(hardware, "detect", lambda: machine)
    monkeypatch.setenv("LOCALRUN_EXTRA_BUFTS", "1")
    fast = resolve(ref, this_machine())
    monkeypatch.setenv("LOCALRUN_EXTRA_BUFTS", "0")
    safe = resolve(ref, this_machine())
    assert fast.plan.extra_bufts is True and safe.plan.extra_bufts is False
    assert safe.plan.estimate.weights_ram < fast.plan.estimate.weights_ram  # no repacked copy counted
    # ...and the load uses what the plan assumed (a run works on the safe path).
    result = cli("run", ref.raw, "hi", "-n", "2", "--temp", "0", "--json", "--verbose")
    assert result.exit_code == 0, result.stderr
    assert "CPU_REPACK" not in result.stderr


def test_a_named_damaged_quant_raises_in_the_resolver(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"]})
    fetch("tiny-Q8_0.gguf").resolve().unlink()
    with pytest.raises(BadModel, match="a file is missing from the cache") as damaged:
        resolve(parse_ref(REPO), Machine(4 * GiB, 4 * GiB))
    assert "pull it again to repair it" in damaged.value.hint
