"""Hostile model files: a few hundred seeded mutants of a tiny model through `show` and `run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).parent / "support" / "drive_fuzz.py"
MUTANTS = 200
MiB = 2**20


def test_mutated_models_never_crash_leak_or_flood(tiny, tmp_path):
    """No death by signal, no traceback, one error line (and a hint) of bounded length, bounded
    memory; and `show` agrees with `run`: a file show calls fine, llama.cpp loads."""
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(tiny.quants["Q8_0"]), str(tmp_path / "mutants"), str(MUTANTS), "20261122"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "GGML_NO_BACKTRACE": "1"},
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0, f"died ({proc.returncode}) at mutant {len(rows)}: {proc.stderr[-2000:]}"
    assert len(rows) == MUTANTS
    for row in rows:
        assert row["show"] in (0, 7) and row["run"] in (0, 6, 7, 8), row
        for stream in (row["show_err"], row["run_err"]):
            assert "Traceback" not in stream and "unexpected" not in stream, row
            errors = [line for line in stream.splitlines() if line.startswith("error: ")]
            assert len(errors) <= 1 and all(len(line) < 1100 for line in stream.splitlines()), row
            assert "\x1b" not in stream, row
    assert max(row["rss"] for row in rows) < 600 * MiB
    shown_fine = [row for row in rows if row["show"] == 0 and row["problem"] is None]
    refused = [row for row in shown_fine if row["run"] in (7, 8)]
    assert len(shown_fine) > MUTANTS // 4 and len(refused) <= len(shown_fine) // 20, [r["run_err"] for r in refused]
