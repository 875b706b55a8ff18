"""A model on disk: one GGUF file, or every shard of a split, and how commands name it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from localrun.errors import BadModel, NotFound

# llama.cpp's split naming: `name-00001-of-00003.gguf` (gguf-split, convert_hf_to_gguf --split-*)
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)


def shard_paths(path: str | Path) -> list[Path]:
    """All shards of a split model given any shard (`name-0000i-of-0000N.gguf`), else [path]."""
    path = Path(path)
    m = SHARD_RE.match(path.name)
    if not m:
        return [path]
    rest = path.name[m.end("index") :]  # "-of-0000N.gguf", as the file spells it
    return [path.with_name(f"{m['stem']}-{i:05d}{rest}") for i in range(1, int(m["total"]) + 1)]


@dataclass(frozen=True)
class ModelFiles:
    """A loadable model on disk. Every command that finds one (pull, the cache, a local path,
    bench) hands this on; `label` is how it is named on screen and in JSON."""

    files: tuple[Path, ...]  # shard order; llama.cpp loads the first and finds the rest
    label: str  # org/repo:QUANT for a pulled model, the path as given for a local file
    quant: str | None = None
    repo_id: str | None = None

    @property
    def path(self) -> Path:
        return self.files[0]

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def local_files(path: Path, quant: str | None = None) -> ModelFiles:
    """A local .gguf (any shard of a split): every shard must be there."""
    if not path.is_file():
        raise NotFound(f"no such model file: {path}")
    files = shard_paths(path)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BadModel(
            f"{path.name} is one shard of {len(files)}; missing: {', '.join(missing)}",
            hint="keep every shard `-0000i-of-0000N.gguf` in the same folder",
        )
    return ModelFiles(tuple(files), str(path), quant)
