"""No llama.cpp abort is reachable from the CLI: small and odd contexts, prompts at every
boundary, hyperparameters llama.cpp asserts on, and files that abort on their first load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localrun.cli import app
from localrun.errors import EngineCrash
from localrun.inference.safety.filecheck import check_file
from localrun.model.header import cached_facts
from localrun.model.tiny import TinySpec, write_tiny_model

runner = CliRunner()
DRIVER = Path(__file__).parent / "support" / "drive_limits.py"


def test_small_and_odd_contexts_never_kill_the_process(tiny):
    """Every context from 16 to 700 tokens, prompts one token either side of the batch size and of
    the context, and a chat that trims turn after turn: answered or refused, never an abort."""
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(tiny.quants["Q8_0"])],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "GGML_NO_BACKTRACE": "1"},
    )
    cases = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0, f"died ({proc.returncode}) after {cases[-1:]}: {proc.stderr[-2000:]}"
    assert cases[-1] == {"case": "done"}
    runs = [c for c in cases if c["case"] == "run"]
    assert len(runs) >= 50 and {c["code"] for c in runs} <= {0, 6}
    for c in runs:
        if c["code"] == 0:  # the prompt and the reply fitted in what the context really has
            assert c["prompt_tokens"] < max(256, -(-c["ctx"] // 256) * 256)
    assert any(c["code"] == 0 and c["prompt_tokens"] > 256 for c in runs)  # more than one batch of a small ctx
    assert all(c["messages"] >= 2 for c in cases if c["case"] == "chat")


def test_a_context_llama_cpp_rounds_up_is_said(tiny):
    result = runner.invoke(app, ["run", str(tiny.quants["Q8_0"]), "--raw", "--ctx", "160", "-n", "2", "hi"])
    assert result.exit_code == 0, result.stderr
    assert "context 160 became 256" in result.stderr
    too_long = runner.invoke(
        app, ["run", str(tiny.quants["Q8_0"]), "--raw", "--ctx", "160", "-n", "2", " ".join(["a"] * 300)]
    )
    assert too_long.exit_code == 6 and "of 256 tokens" in too_long.stderr


@pytest.fixture
def negative_eps(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny-negeps-F32.gguf", TinySpec(rms_eps=-1.0, name="tiny-negeps"))


def test_a_hyperparameter_llama_cpp_asserts_on_is_refused_in_python(negative_eps):
    shown = runner.invoke(app, ["show", str(negative_eps), "--json"])
    assert shown.exit_code == 0 and "layer_norm_rms_epsilon is -1.0" in json.loads(shown.stdout)["problem"]
    ran = runner.invoke(app, ["run", str(negative_eps), "hi"])
    assert ran.exit_code == 7 and "will not load" in ran.stderr and "Traceback" not in ran.stderr


def test_llama_cpp_itself_aborts_on_it_in_a_child(negative_eps):
    """Past Python's checks, the same file kills llama.cpp: the first-load probe is what keeps the
    parent alive (the child dies of SIGABRT at its first decode)."""
    from localrun.inference.safety.selftest import run_probe

    result = run_probe(negative_eps, tokens=1)
    assert result.signal == "SIGABRT" and "eps" in result.detail


def test_a_file_that_aborts_on_first_load_becomes_an_error_once_and_for_all(tiny, tmp_path):
    model = tmp_path / "model-Q8_0.gguf"
    model.write_bytes(tiny.quants["Q8_0"].read_bytes())
    ran = tmp_path / "probes"
    # A stand-in for llama.cpp aborting on this file (as a corrupt tensor would); it notes each run.
    aborting = [
        sys.executable,
        "-c",
        (
            "import os, signal, sys\n"
            f"open({str(ran)!r}, 'a').write('x')\n"
            "sys.stderr.write('ggml.c:123: GGML_ASSERT(ggml_can_mul_mat(a, b)) failed\\n')\n"
            "os.kill(os.getpid(), signal.SIGABRT)\n"
        ),
    ]
    with pytest.raises(EngineCrash, match=r"crashed loading model-Q8_0.gguf \(SIGABRT\): .*GGML_ASSERT"):
        check_file(model, True, command=aborting)
    assert cached_facts(model)["loads"]["signal"] == "SIGABRT"
    with pytest.raises(EngineCrash):
        check_file(model, True, command=aborting)
    assert ran.read_text() == "x"  # remembered: probed once
    result = runner.invoke(app, ["run", str(model), "hi"])
    assert result.exit_code == 8, result.output
    assert result.stderr.startswith("error: llama.cpp crashed loading model-Q8_0.gguf (SIGABRT)")
    assert len(result.stderr.strip().splitlines()) == 2  # the error and its hint
    # Changed on disk (size or mtime), the file is a new file: checked again.
    model.write_bytes(tiny.quants["Q8_0"].read_bytes() + b"\0" * 32)
    check_file(model, True)
    assert cached_facts(model)["loads"] is True


def test_a_model_loaded_for_the_first_time_is_checked_then_remembered(tiny, tmp_path):
    model = tmp_path / "fresh-Q4_K_M.gguf"
    model.write_bytes(tiny.quants["Q4_K_M"].read_bytes())
    first = runner.invoke(app, ["run", str(model), "hi", "-n", "2"])
    assert first.exit_code == 0, first.stderr
    assert "first load of fresh-Q4_K_M.gguf: checking it in a child process" in first.stderr
    second = runner.invoke(app, ["run", str(model), "hi", "-n", "2"])
    assert "checking it in a child process" not in second.stderr


def test_show_reports_what_a_first_load_ran_into(tiny, tmp_path):
    model = tmp_path / "model-Q8_0.gguf"
    model.write_bytes(tiny.quants["Q8_0"].read_bytes())
    aborting = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGABRT)"]
    with pytest.raises(EngineCrash):
        check_file(model, True, command=aborting)
    shown = runner.invoke(app, ["show", str(model)])
    assert shown.exit_code == 0 and "will not load: llama.cpp crashed loading model-Q8_0.gguf" in shown.stderr
