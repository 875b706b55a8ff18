"""When each model was last used. The cache cannot tell (blob atimes are not reliable: relatime
and noatime mounts, and reading a header for `list`/`show` would bump them), so localrun records
it in $LOCALRUN_HOME/usage.json when it loads a model. Bookkeeping: it never stops a model from
running, whatever state the disk is in."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from localrun import paths

_USAGE_FILE = "usage.json"


def _usage_path() -> Path:
    return paths.home() / _USAGE_FILE


def read_usage() -> dict[str, float]:
    data = paths.read_json(_usage_path())
    if not isinstance(data, dict):
        return {}
    usage = {}
    for key, value in data.items():
        try:
            usage[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return usage


def touch(path: str | Path, when: float | None = None) -> None:
    """Record that the model at `path` (a cached snapshot file or a local file) was just used.

    Keyed by the real path: for a cached model that is its blob, so every revision linking the
    same blob shows the same last use. Two processes touching at once may lose one update (the
    file is rewritten whole); that costs a slightly stale "last used", never a broken file.
    """
    try:
        usage = read_usage()
        usage[os.path.realpath(path)] = time.time() if when is None else when
        paths.write_json_quietly(_usage_path(), usage, indent=1)
    except OSError:  # $LOCALRUN_HOME itself cannot be made: run the model all the same
        pass


def last_used(path: str | Path) -> float | None:
    """When the model at `path` was last used, as recorded by touch(); None when never."""
    return read_usage().get(os.path.realpath(path))


def forget(blobs: Iterable[Path]) -> None:
    usage = read_usage()
    gone = [str(b) for b in blobs if str(b) in usage]
    for key in gone:
        del usage[key]
    if gone:
        paths.write_json_quietly(_usage_path(), usage, indent=1)
