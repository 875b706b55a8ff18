"""Where localrun keeps its own small files (history, probe verdicts). Models stay in the HF cache."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """$LOCALRUN_HOME, else $XDG_CONFIG_HOME/localrun, else ~/.config/localrun; created on first use."""
    explicit = os.environ.get("LOCALRUN_HOME")
    if explicit:
        path = Path(explicit)
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        path = Path(base) / "localrun"
    path.mkdir(parents=True, exist_ok=True)
    return path
