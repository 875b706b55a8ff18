"""A persistent prompt cache: the KV state of a prompt's reusable prefix, kept on disk.

What a run reads before the question (the template's preamble, the system prompt, the piped
material) is the same from one run to the next when the same document is asked several questions.
Its KV state is saved with llama.cpp's llama_state_seq_save_file, keyed by the model file, the
context parameters that shape the KV cache, the llama.cpp build, and the prefix's tokens; a later
run with the same prefix loads it and decodes only the rest.

Each entry is `<key>.kv` (llama.cpp's file: the tokens and the state) and `<key>.json` (its size,
a CRC-32, the token count, when it was last used). A truncated, corrupt or mismatched entry is
ignored (and deleted) with a note: before any state is loaded, the size and checksum must match;
after, the tokens llama.cpp read back must be exactly the prefix, else the sequence is cleared.
The folder is bounded: the least recently used entries go first.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localrun import paths
from localrun.inference.llama.build import build_key, llama
from localrun.inference.llama.runtime import LlamaContext, LoadOptions

MIN_TOKENS = 64  # shorter prefixes are read faster than a file is checked
DEFAULT_LIMIT = 4 << 30
FORMAT = 1


def folder() -> Path:
    return paths.home() / "kv"


@dataclass
class Entry:
    key: str
    size: int
    tokens: int
    model: str
    used: float
    begins: str = ""  # the prefix's first words, to tell entries apart (older entries: unknown)


def entries(where: Path | None = None) -> list[Entry]:
    """What the cache holds, most recently used first."""
    found = []
    for meta_path in (where or folder()).glob("*.json"):
        meta = paths.read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            continue
        try:
            size, tokens, used = int(meta["size"]), int(meta["tokens"]), float(meta["used"])
        except (KeyError, TypeError, ValueError):  # damaged: load() finds it so and removes it
            continue
        begins = meta.get("begins")
        found.append(
            Entry(
                meta_path.stem,
                size,
                tokens,
                str(meta.get("model", "?")),
                used,
                begins if isinstance(begins, str) else "",
            )
        )
    return sorted(found, key=lambda e: -e.used)


def clear(where: Path | None = None) -> list[Entry]:
    """Delete every entry; the entries deleted."""
    removed = entries(where)
    for entry in removed:
        _delete(where or folder(), entry.key)
    for stray in (where or folder()).glob("*.tmp*"):
        stray.unlink(missing_ok=True)
    return removed


def _delete(where: Path, key: str) -> None:
    (where / f"{key}.kv").unlink(missing_ok=True)
    (where / f"{key}.json").unlink(missing_ok=True)


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            crc = zlib.crc32(block, crc)
    return crc


class PromptCache:
    """The cache for one loaded model and context (`identity` names both)."""

    def __init__(
        self,
        identity: str,
        label: str,
        limit: int = DEFAULT_LIMIT,
        where: Path | None = None,
    ):
        self.identity, self.label, self.limit = identity, label, limit
        self.where = where or folder()

    def key(self, tokens: list[int]) -> str:
        digest = hashlib.sha256(self.identity.encode())
        digest.update(len(tokens).to_bytes(8, "little"))
        digest.update((ctypes.c_int32 * len(tokens))(*tokens))
        return digest.hexdigest()[:32]

    def holds(self, tokens: list[int]) -> bool:
        """Whether an entry for exactly `tokens` is on disk (load() still checks it)."""
        return (self.where / f"{self.key(tokens)}.kv").is_file()

    def load(
        self, ctx: LlamaContext, tokens: list[int], notify: Callable[[str], None] = lambda m: None, seq: int = 0
    ) -> bool:
        """Put the saved state of exactly `tokens` into sequence `seq`; False when there is none to
        trust (then the sequence may have been cleared). What was wrong with an entry is notified."""
        key = self.key(tokens)
        kv, meta_path = self.where / f"{key}.kv", self.where / f"{key}.json"
        meta = paths.read_json(meta_path)
        if not isinstance(meta, dict) or not kv.is_file():
            return False
        try:  # another run may evict it meanwhile: then it is a miss
            intact = meta.get("format") == FORMAT and kv.stat().st_size == meta.get("size")
            intact = intact and _crc32(kv) == meta.get("crc32")
        except OSError:
            return False
        if not intact:
            notify("a prompt cache entry was damaged (truncated or changed on disk); it was ignored and removed")
            _delete(self.where, key)
            return False
        lc = llama()
        out = (lc.llama_token * (len(tokens) + 1))()
        count = ctypes.c_size_t(0)
        ctx.drop(seq, 0, -1)
        read = lc.llama_state_seq_load_file(ctx.ptr, str(kv).encode(), seq, out, len(tokens) + 1, ctypes.byref(count))
        if not read or count.value != len(tokens) or list(out[: count.value]) != tokens:
            ctx.drop(seq, 0, -1)  # nothing half-loaded stays in the sequence
            notify("a prompt cache entry did not match its prompt; it was ignored and removed")
            _delete(self.where, key)
            return False
        meta["used"] = time.time()
        paths.write_json_quietly(meta_path, meta)
        return True

    def save(self, ctx: LlamaContext, tokens: list[int], seq: int = 0) -> None:
        """Save sequence `seq`, which must hold exactly `tokens`. A full disk costs the entry, nothing else."""
        key = self.key(tokens)
        kv = self.where / f"{key}.kv"
        if kv.exists():
            return
        lc = llama()
        tmp = self.where / f".{key}.{os.getpid()}.tmp"
        try:
            paths.private_file(paths.private_dir(self.where) / tmp.name)  # llama.cpp then writes into it
            arr = (lc.llama_token * len(tokens))(*tokens)
            if not lc.llama_state_seq_save_file(ctx.ptr, str(tmp).encode(), seq, arr, len(tokens)):
                raise OSError("llama.cpp could not write the state")
            size = tmp.stat().st_size
            meta = {
                "format": FORMAT,
                "size": size,
                "crc32": _crc32(tmp),
                "tokens": len(tokens),
                "model": self.label,
                "used": time.time(),
                "begins": opening(ctx, tokens),
            }
            paths.write_json(self.where / f"{key}.json", meta)
            os.replace(tmp, kv)
        except OSError:
            tmp.unlink(missing_ok=True)
            _delete(self.where, key)
            return
        self._evict()

    def _evict(self) -> None:
        held = entries(self.where)
        total = sum(e.size for e in held)
        for entry in reversed(held):  # least recently used first
            if total <= self.limit:
                break
            _delete(self.where, entry.key)
            total -= entry.size


BEGINS_TOKENS = 48  # of the prefix, kept as text in an entry's metadata for `localrun cache ls`


def opening(ctx: LlamaContext, tokens: list[int]) -> str:
    """The first words of the prefix as one line of plain text: the template's markers (special
    tokens) left out, whitespace runs as one space."""
    text = b"".join(ctx.model.piece(t) for t in tokens[:BEGINS_TOKENS]).decode("utf-8", "replace")
    return " ".join(text.split())


def kv_identity(files: tuple[Path, ...], opts: LoadOptions) -> str:
    """What a saved KV state depends on: the model file, the context's KV layout, the build."""
    model = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    layout = [opts.n_ctx, opts.type_k, opts.type_v, opts.flash_attn, opts.n_seq_max, opts.kv_unified]
    return json.dumps([model, layout, build_key()])
