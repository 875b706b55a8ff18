"""Model references: the one parser every command uses.

Accepted: a local `.gguf` path; `org/repo`; `org/repo:Q4_K_M` (a quant tag); `org/repo:path/in/repo.gguf`
(one file); `hf.co/org/repo[:tag]`; `https://huggingface.co/org/repo[/blob/REV/file.gguf]`; and an
alias of your own (`coder`, `qwen3:8b`: model/aliases.py) for any of these.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from localrun.errors import UsageError
from localrun.model import aliases

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PREFIXES = (
    "https://huggingface.co/",
    "http://huggingface.co/",
    "https://hf.co/",
    "http://hf.co/",
    "huggingface.co/",
    "hf.co/",
)


def without_hub_prefix(name: str) -> str:
    """A Hub reference without its site (`hf.co/org/repo` -> `org/repo`, as Ollama names Hub models)."""
    for prefix in _PREFIXES:
        if name.lower().startswith(prefix):
            return name[len(prefix) :]
    return name


@dataclass(frozen=True)
class ModelRef:
    raw: str
    path: Path | None = None  # a local file
    repo_id: str | None = None
    tag: str | None = None  # a quant tag, as written (matching is case-insensitive)
    filename: str | None = None  # one file in the repo
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def with_tag(self, tag: str | None) -> ModelRef:
        """The same repo and revision, naming another quant (or, with None, the repo)."""
        return ModelRef(self.raw, repo_id=self.repo_id, tag=tag, revision=self.revision)

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        suffix = f":{self.tag}" if self.tag else f":{self.filename}" if self.filename else ""
        return f"{self.repo_id}{suffix}"


def _looks_local(text: str) -> bool:
    return text.lower().endswith(".gguf") and (
        os.path.exists(text) or text.startswith(("/", "./", "../", "~")) or (os.sep in text and ":" not in text)
    )


def parse_ref(text: str, revision: str | None = None, *, expand: bool = True) -> ModelRef:
    """Parse a model reference (an alias stands for its reference, and keeps its name as `raw`: the
    name `serve` answers to); raise UsageError with the accepted forms when it is none of them."""
    raw = text.strip()
    if not raw:
        raise UsageError("empty model reference")
    target = aliases.lookup(raw) if expand else None
    if target is not None:
        return replace(parse_ref(target, revision, expand=False), raw=raw)
    if _looks_local(raw):
        return ModelRef(raw, path=Path(raw).expanduser())
    rest = without_hub_prefix(raw).rstrip("/")
    filename = tag = None
    # URL forms: org/repo/blob/REV/path, org/repo/resolve/REV/path, org/repo/tree/REV
    m = re.match(r"^([^/]+/[^/:]+)/(blob|resolve|tree)/([^/]+)(?:/(.+))?$", rest)
    if m:
        rest, revision = m.group(1), revision or m.group(3)
        filename = m.group(4) if m.group(2) != "tree" else None
    elif ":" in rest:
        rest, _, suffix = rest.partition(":")
        if suffix.lower().endswith(".gguf"):
            filename = suffix
        elif suffix:
            tag = suffix
    if not _REPO_RE.match(rest):
        raise UsageError(
            f"not a model reference: {raw!r}",
            hint="use org/repo, org/repo:Q4_K_M, org/repo:file.gguf, hf.co/org/repo, a path to a .gguf file "
            "or an alias (`localrun alias --list`)",
        )
    return ModelRef(raw, repo_id=rest, tag=tag, filename=filename, revision=revision)
