"""The package, the CLI skeleton, `localrun hw`, the self-test, and the fixtures themselves."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localrun import __version__
from localrun.cli import app
from localrun.hub.settings import cache_dir
from localrun.inference.llama.runtime import LoadOptions, load
from localrun.inference.safety import selftest
from localrun.inference.safety.probe import greedy

runner = CliRunner()


def generate(path: Path, prompt: str, n: int = 12) -> tuple[str, int]:
    loaded = load(path, LoadOptions(n_ctx=256))
    try:
        return greedy(loaded, prompt, n)
    finally:
        loaded.close()


# -- CLI skeleton -------------------------------------------------------------------------------
def test_help_lists_commands_and_version_prints():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "hw" in result.stdout
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"localrun {__version__}"


def test_cli_import_and_help_do_not_import_llama_cpp():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from localrun.cli import app\n"
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
        "print(sorted(m for m in ('llama_cpp', 'huggingface_hub', 'numpy', 'gguf') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_runs():
    exe = Path(sys.executable).with_name("localrun")
    result = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"localrun {__version__}"


# -- hw and the self-test -----------------------------------------------------------------------
def test_hw_reports_machine_build_and_passing_selftest():
    result = runner.invoke(app, ["hw"])
    assert result.exit_code == 0, result.output
    for label in ("CPU", "CPU features", "RAM", "llama-cpp-python", "System info", "Self-test"):
        assert label in result.stdout
    assert "passed" in result.stdout


def test_hw_json_is_machine_readable():
    result = runner.invoke(app, ["hw", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["machine"]["ram_total"] > 0
    assert data["machine"]["cpu"]["logical_cores"] >= 1
    assert "CPU" in data["llama_cpp"]["system_info"]
    assert data["selftest"]["ok"] is True
    assert data["selftest"]["fast_path"]["ok"] is True


def test_selftest_reports_a_child_killed_by_a_signal(tiny):
    # A duplicated vocabulary token makes llama.cpp abort (GGML_ASSERT) while loading.
    result = selftest.run_probe(tiny.corrupt_vocab)
    assert not result.ok
    assert result.crashed and result.signal == "SIGABRT"
    verdict = selftest.check(tiny.corrupt_vocab, key="corrupt")
    assert verdict.use_extra_bufts is None and not verdict.ok
    assert "rebuild llama-cpp-python" in verdict.advice()


def test_selftest_falls_back_to_safe_path_when_fast_path_segfaults(tiny):
    # The AMX crash cannot happen on a CPU without AMX, so the child stands in for such a build:
    # it dies of SIGSEGV on the fast path, and runs the real probe on the safe path.
    crashing_fast_path = [
        sys.executable,
        "-c",
        (
            "import os, signal, sys\n"
            "if '--no-extra-bufts' not in sys.argv: os.kill(os.getpid(), signal.SIGSEGV)\n"
            "from localrun.inference.safety.probe import main\n"
            "sys.exit(main(sys.argv[1:]))\n"
        ),
    ]
    verdict = selftest.check(tiny.quants["Q4_K_M"], command=crashing_fast_path, key="amx-like")
    assert verdict.fast.signal == "SIGSEGV"
    assert verdict.safe is not None and verdict.safe.ok
    assert verdict.use_extra_bufts is False
    assert "use_extra_bufts=False" in verdict.advice()
    remembered = selftest.cached_verdict("amx-like")
    assert remembered is not None and remembered.use_extra_bufts is False


def test_extra_bufts_override_from_environment(monkeypatch):
    monkeypatch.setenv("LOCALRUN_EXTRA_BUFTS", "0")
    assert selftest.use_extra_bufts() is False
    monkeypatch.setenv("LOCALRUN_EXTRA_BUFTS", "1")
    assert selftest.use_extra_bufts() is True


# -- tiny models and the real model -------------------------------------------------------------
@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"])
def test_every_tiny_quant_generates(tiny, quant):
    text, count = generate(tiny.quants[quant], "The capital of France is", n=8)
    assert count == 8
    assert text.strip()


def test_tiny_variants_are_distinct_quantizations(tiny):
    import gguf

    types = {}
    for quant, path in tiny.quants.items():
        reader = gguf.GGUFReader(path)
        types[quant] = {t.name: t.tensor_type.name for t in reader.tensors}["blk.0.ffn_down.weight"]
    assert types["F16"] == "F16" and types["Q8_0"] == "Q8_0" and types["Q2_K"] in ("Q2_K", "Q3_K", "Q4_K")
    sizes = [tiny.quants[q].stat().st_size for q in ("F16", "Q8_0", "Q4_K_M", "Q2_K")]
    assert sizes == sorted(sizes, reverse=True)


def test_split_and_templateless_models_load(tiny):
    assert [p.name[-20:] for p in tiny.split][0].endswith("00001-of-00003.gguf")
    text, count = generate(tiny.split[0], "hello", n=4)
    assert count == 4
    loaded = load(tiny.no_template, LoadOptions(n_ctx=128))
    try:
        assert loaded.model.chat_template() is None
    finally:
        loaded.close()
    with_template = load(tiny.quants["Q8_0"], LoadOptions(n_ctx=128))
    try:
        assert "<|im_start|>" in with_template.model.chat_template()
    finally:
        with_template.close()


@pytest.mark.slow
def test_gemma_continues_with_real_english(gemma):
    text, count = generate(gemma, "The capital of France is", n=12)
    words = [w.strip(".,;:!?") for w in text.split()]
    assert count >= 8
    assert sum(w.isalpha() and w.isascii() for w in words) >= 6, text
    assert "France" in text or "Paris" in text, text


# -- the Hub emulator through the real huggingface_hub ------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_emulator_serves_model_info_and_tree(hub, tiny):
    from huggingface_hub import HfApi

    hub.add_repo(
        "acme/tiny-GGUF",
        {
            "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"],
            "sub/tiny-Q8_0.gguf": tiny.quants["Q8_0"],
        },
    )
    api = HfApi(endpoint=hub.url)
    info = api.model_info("acme/tiny-GGUF", files_metadata=True)
    by_name = {s.rfilename: s for s in info.siblings}
    assert set(by_name) == {"tiny-Q4_K_M.gguf", "sub/tiny-Q8_0.gguf"}
    assert by_name["tiny-Q4_K_M.gguf"].size == tiny.quants["Q4_K_M"].stat().st_size
    assert by_name["tiny-Q4_K_M.gguf"].lfs.sha256 == _sha256(tiny.quants["Q4_K_M"])
    tree = list(api.list_repo_tree("acme/tiny-GGUF", recursive=True))
    assert {e.path for e in tree} == {"tiny-Q4_K_M.gguf", "sub", "sub/tiny-Q8_0.gguf"}


def test_emulator_download_and_errors(hub, tiny, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    hub.add_repo("acme/tiny-GGUF", {"tiny-Q2_K.gguf": tiny.quants["Q2_K"]})
    hub.add_repo("acme/gated-GGUF", {"tiny-Q2_K.gguf": tiny.quants["Q2_K"]}, gated=True)
    cache = tmp_path / "cache"
    path = hf_hub_download("acme/tiny-GGUF", "tiny-Q2_K.gguf", cache_dir=cache, endpoint=hub.url)
    assert _sha256(path) == _sha256(tiny.quants["Q2_K"])
    with pytest.raises(GatedRepoError):
        hf_hub_download("acme/gated-GGUF", "tiny-Q2_K.gguf", cache_dir=cache, endpoint=hub.url, token=False)
    gated = hf_hub_download(
        "acme/gated-GGUF", "tiny-Q2_K.gguf", cache_dir=cache, endpoint=hub.url, token="hf_testtoken"
    )
    assert _sha256(gated) == _sha256(tiny.quants["Q2_K"])
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/missing", "x.gguf", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("acme/tiny-GGUF", "missing.gguf", cache_dir=cache, endpoint=hub.url)


def test_emulator_download_resumes_with_range_after_reset(hub, tmp_path):
    import httpx
    from huggingface_hub import hf_hub_download

    # huggingface_hub writes in 10 MiB chunks: a file of a few chunks shows a real resume.
    source = tmp_path / "big.gguf"
    source.write_bytes(b"GGUF" + random.Random(0).randbytes(24 * 2**20))
    hub.add_repo("acme/big-GGUF", {"big.gguf": source})
    hub.inject("reset", "big.gguf", after_bytes=15 * 2**20)
    cache = tmp_path / "c"
    with pytest.raises(httpx.ReadError):
        hf_hub_download("acme/big-GGUF", "big.gguf", cache_dir=cache, endpoint=hub.url)
    partial = list(cache.rglob("*.incomplete"))
    assert len(partial) == 1
    kept = partial[0].stat().st_size
    assert kept == 10 * 2**20
    path = hf_hub_download("acme/big-GGUF", "big.gguf", cache_dir=cache, endpoint=hub.url)
    assert _sha256(path) == _sha256(source)
    gets = hub.downloads("big.gguf")
    assert len(gets) == 2
    assert gets[0].range is None
    assert gets[1].range == f"bytes={kept}-" and gets[1].status == 206


def test_emulator_injects_server_errors_and_serves_ranges(hub, tiny, tmp_path):
    import httpx
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    hub.add_repo("acme/tiny-GGUF", {"tiny-Q2_K.gguf": tiny.quants["Q2_K"]})
    hub.inject("500", "tiny-Q2_K.gguf")
    with pytest.raises(HfHubHTTPError):
        hf_hub_download("acme/tiny-GGUF", "tiny-Q2_K.gguf", cache_dir=tmp_path / "c", endpoint=hub.url)
    assert not list((tmp_path / "c").rglob("*.gguf"))
    response = httpx.get(f"{hub.url}/acme/tiny-GGUF/resolve/main/tiny-Q2_K.gguf", headers={"Range": "bytes=0-3"})
    assert response.status_code == 206 and response.content == b"GGUF"
    assert response.headers["Content-Range"].startswith("bytes 0-3/")


# -- the error boundary -------------------------------------------------------------------------
def _app_raising(exc: BaseException):
    import typer

    from localrun.boundary import boundary

    demo = typer.Typer()

    @demo.command()
    @boundary
    def fail() -> None:
        raise exc

    return demo


def test_boundary_known_error_is_one_line_with_hint_and_exit_code():
    from localrun.errors import ExitCode, NotFound

    result = runner.invoke(_app_raising(NotFound("model x not found", hint="run localrun list")), [])
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["error: model x not found", "hint: run localrun list"]


def test_boundary_ctrl_c_exits_130():
    result = runner.invoke(_app_raising(KeyboardInterrupt()), [])
    assert result.exit_code == 130
    assert result.stderr.strip() == "error: interrupted"


def test_boundary_unexpected_error_hides_traceback_unless_debug(monkeypatch):
    result = runner.invoke(_app_raising(RuntimeError("boom")), [])
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unexpected RuntimeError: boom")
    assert "LOCALRUN_DEBUG=1" in result.stderr
    monkeypatch.setenv("LOCALRUN_DEBUG", "1")
    result = runner.invoke(_app_raising(RuntimeError("boom")), [])
    assert "Traceback" in result.stderr


def test_boundary_translates_huggingface_hub_errors(hub):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError

    hub.add_repo("acme/gated-GGUF", {"x.gguf": Path(__file__)}, gated=True)
    try:
        hf_hub_download("acme/gated-GGUF", "x.gguf", endpoint=hub.url, token=False, cache_dir=hub_cache())
    except GatedRepoError as exc:
        gated = exc
    result = runner.invoke(_app_raising(gated), [])
    assert result.exit_code == 4
    assert "gated" in result.stderr.splitlines()[0] and "HF_TOKEN" in result.stderr


def hub_cache() -> Path:
    return cache_dir()


def test_boundary_translates_network_failures_naming_the_endpoint(monkeypatch):
    import httpx

    from support.hub import refusing_endpoint

    with refusing_endpoint() as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(httpx.ConnectError) as refused:
            httpx.get(url)
        result = runner.invoke(_app_raising(refused.value), [])
    assert result.exit_code == 5
    assert result.stderr.splitlines() == [
        f"error: cannot reach the Hub at {url}: connection refused",
        "hint: check your connection and HF_ENDPOINT; models already pulled run offline",
    ]


def test_boundary_a_missing_cache_entry_is_a_network_error_not_a_missing_file(hub):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    hub.add_repo("acme/tiny-GGUF", {"x.gguf": Path(__file__)})
    with pytest.raises(LocalEntryNotFoundError) as missing:  # not in the cache, the Hub not asked
        hf_hub_download("acme/tiny-GGUF", "x.gguf", endpoint=hub.url, cache_dir=hub_cache(), local_files_only=True)
    assert isinstance(missing.value, EntryNotFoundError)  # why the order of the checks matters
    result = runner.invoke(_app_raising(missing.value), [])
    assert result.exit_code == 5 and "not found in the repo" not in result.stderr


def test_boundary_a_full_disk_without_a_path_is_one_clean_line():
    import errno

    result = runner.invoke(_app_raising(OSError(errno.ENOSPC, "No space left on device")), [])
    assert result.exit_code == 6
    assert result.stderr.splitlines()[0] == "error: no space left on device"
