"""The code's shape: layers import one way, inside `inference` too (import-linter), lint and format (ruff)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)


def test_layers_import_one_way():
    result = run(str(BIN / "lint-imports"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint_and_format():
    lint = run(str(BIN / "ruff"), "check", "localrun", "tests", "scripts")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run(str(BIN / "ruff"), "format", "--check", "localrun", "tests", "scripts")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_the_wheel_holds_only_the_product():
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "localrun").rglob("__init__.py")}
    assert not any("testing" in p for p in packages)
    assert (ROOT / "tests" / "support" / "hub.py").is_file()
