"""The first load of a model file happens in a child process.

llama.cpp aborts the whole process on some bad input instead of returning an error (a
hyperparameter it asserts on, a tensor it cannot multiply): Python validation catches what it
can, and a file that has never loaded here is loaded and decoded once in a child first. The
verdict is remembered per file identity (real path, size, mtime), so this costs one extra load,
once; an abort becomes an error with llama.cpp's reason, and this process - a chat, a server -
survives it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from localrun.errors import BadModel, EngineCrash
from localrun.inference.safety.selftest import run_probe
from localrun.model.files import shard_paths
from localrun.model.header import cached_facts, remember_facts
from localrun.text import safe

# seconds: a child that loads the weights (mmap) and decodes two tokens; big models take longer
BASE_TIMEOUT, SECONDS_PER_GIB = 120.0, 30.0


def verdict_error(name: str, verdict: dict) -> BadModel | EngineCrash:
    """The error a remembered failed load stands for."""
    if verdict.get("signal"):
        return EngineCrash(
            f"llama.cpp crashed loading {name} ({verdict['signal']}): {verdict.get('detail') or 'no reason given'}",
            hint="the file is corrupt or uses something this llama.cpp build cannot run; try another quant or "
            "conversion of the model (localrun caught this in a child process)",
        )
    detail = verdict.get("detail") or "no reason given"  # the child's own message names the file
    return BadModel(
        detail if detail.startswith("llama.cpp could not load") else f"llama.cpp could not load {name}: {detail}",
        hint="check the file with `localrun show`; run with --verbose for llama.cpp's log",
    )


def remembered_problem(path: str | os.PathLike[str]) -> str | None:
    """What a first load of this file ran into, if it was tried and failed (`show` says it)."""
    verdict = cached_facts(path).get("loads")
    return verdict_error(safe(Path(path).name), verdict).message if isinstance(verdict, dict) else None


def check_file(
    path: str | os.PathLike[str],
    extra_bufts: bool,
    *,
    notify: Callable[[str], None] | None = None,
    command: Sequence[str] | None = None,
) -> None:
    """Raise when llama.cpp cannot load and decode this file; probe it in a child the first time."""
    name = safe(Path(path).name)
    verdict = cached_facts(path).get("loads")
    if verdict is True:
        return
    if isinstance(verdict, dict):
        raise verdict_error(name, verdict)
    if notify:
        notify(f"first load of {name}: checking it in a child process (once per file)...")
    size_gib = sum(p.stat().st_size for p in shard_paths(path)) / 2**30
    result = run_probe(
        path, extra_bufts=extra_bufts, tokens=2, command=command, timeout=BASE_TIMEOUT + SECONDS_PER_GIB * size_gib
    )
    if result.ok:
        remember_facts(path, loads=True)
        return
    if result.returncode == -1 and result.signal is None:  # timed out: no verdict, load it here as before
        return
    verdict = {
        "signal": result.signal,
        "returncode": result.returncode,
        "detail": result.detail.removeprefix("error: "),
    }
    remember_facts(path, loads=verdict)
    raise verdict_error(name, verdict)
