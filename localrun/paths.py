"""Where localrun keeps its own small files, and the one way it writes them.

Models stay in the HF cache. localrun's own files (history, verdicts, last use, header cache, KV
cache) live in $LOCALRUN_HOME, else $XDG_CONFIG_HOME/localrun, else ~/.config/localrun. They hold
the user's documents (the prompt cache keeps them as tokens) and questions (the chat history), so
that folder and everything localrun makes in it is the owner's alone (0700 folders, 0600 files),
as ssh and gpg keep theirs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def home() -> Path:
    """$LOCALRUN_HOME, else $XDG_CONFIG_HOME/localrun, else ~/.config/localrun; created on first use
    (when it can be: what is kept there is bookkeeping, and a model must run without it)."""
    explicit = os.environ.get("LOCALRUN_HOME")
    if explicit:
        path = Path(explicit)
    else:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        path = Path(base) / "localrun"
    try:
        private_dir(path)
    except OSError:  # a full, read-only or odd home: bookkeeping fails quietly, models still run
        pass
    return path


def private_dir(path: Path) -> Path:
    """Create the folder for its owner alone (0700); one of the owner's that others could read
    is closed to them. Raises OSError."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return _closed_to_others(path, 0o700)


def private_file(path: Path) -> Path:
    """Create the file (empty) for its owner alone (0600), or close an existing one of the
    owner's to others; for files that a library then writes. Raises OSError."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    return _closed_to_others(path, 0o600)


def _closed_to_others(path: Path, mode: int) -> Path:
    """`mode` for a path of the owner's that others could reach (one made before, or by a umask)."""
    status = path.stat()
    if status.st_mode & 0o077 and status.st_uid == os.getuid():
        path.chmod(mode)
    return path


def read_json(path: Path) -> Any:
    """The JSON document at `path`; None when it is missing or unreadable (bookkeeping only)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any, *, indent: int | None = None) -> None:
    """Write JSON atomically: a unique temporary file in the same folder, fsync, then rename, so
    that a reader (or a second process writing at once) never sees half a file. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # made 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, sort_keys=indent is not None, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_quietly(path: Path, data: Any, **kwargs: Any) -> bool:
    """write_json for bookkeeping that must never stop a command (a full or read-only disk)."""
    try:
        write_json(path, data, **kwargs)
    except OSError:
        return False
    return True
