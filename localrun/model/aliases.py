"""Names of your own for models: `coder` or `qwen3:8b` for `org/repo:Q4_K_M` (or a path), kept in
$LOCALRUN_HOME/aliases.json. `refs.parse_ref` expands them, so every command takes them, and
`serve` answers to them. A name has no `/` and does not end in `.gguf`: it can never hide a repo
or a file."""

from __future__ import annotations

import json
import re
from pathlib import Path

from localrun import paths
from localrun.errors import NotFound, UsageError
from localrun.text import safe

FILE = "aliases.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(?::[\w.-]+)?$")
MAX_NAME = 64


def _file() -> Path:
    return paths.home() / FILE


def load(*, strict: bool = False) -> dict[str, str]:
    """Every alias -> the reference it stands for. A file that cannot be read as aliases counts
    as none for a look-up, but `strict` (before writing it) refuses it: rewriting it would
    lose every alias in it."""
    path = _file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if strict:
            raise UsageError(
                f"{path} cannot be read as aliases: {safe(str(exc))[:120]}",
                hint="fix it, or delete it to start again",
            ) from None
        return {}
    if not isinstance(data, dict):
        if strict:
            raise UsageError(f"{path} does not hold aliases (a JSON object)", hint="fix it, or delete it")
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def lookup(name: str) -> str | None:
    """The reference `name` stands for; None when it is no alias (a repo or a path never is)."""
    if "/" in name or "\\" in name or name.lower().endswith(".gguf"):
        return None
    return load().get(name)


def check_name(name: str) -> str:
    if len(name) > MAX_NAME or not _NAME_RE.match(name) or name.lower().endswith(".gguf"):
        raise UsageError(
            f"not a name for an alias: {safe(name)!r}",
            hint="use letters, digits, '.', '-', '_' and at most one ':' (coder, qwen3:8b); no '/'",
        )
    return name


def add(name: str, target: str) -> str | None:
    """Name `target` (a reference already checked) `name`; return what the name stood for before."""
    aliases = load(strict=True)
    before = aliases.get(check_name(name))
    aliases[name] = target
    paths.write_json(_file(), dict(sorted(aliases.items())), indent=2)
    return before


def remove(name: str) -> str:
    """Forget `name`; return what it stood for."""
    aliases = load(strict=True)
    if name not in aliases:
        known = ", ".join(sorted(aliases)) or "none yet"
        raise NotFound(f"no alias named {safe(name)!r}", hint=f"aliases: {known}")
    target = aliases.pop(name)
    paths.write_json(_file(), aliases, indent=2)
    return target
