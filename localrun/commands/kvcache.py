"""`localrun cache`: the prompt cache's entries (saved KV states of prompts' reusable prefixes)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from localrun.inference.generation import prompt_cache
from localrun.output import Output
from localrun.store.scan import iso
from localrun.text import ago, human_bytes, plural, safe

BEGINS_WIDTH = 32  # characters of an entry's opening shown in a row


@dataclass
class CacheReport:
    folder: Path
    entries: list[prompt_cache.Entry]

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    def to_dict(self) -> dict:
        return {
            "folder": str(self.folder),
            "size": self.size,
            "entries": [
                {
                    "key": e.key,
                    "model": e.model,
                    "begins": e.begins or None,
                    "tokens": e.tokens,
                    "size": e.size,
                    "used": iso(e.used),
                }
                for e in self.entries
            ],
        }


def report() -> CacheReport:
    return CacheReport(prompt_cache.folder(), prompt_cache.entries())


def show(out: Output, found: CacheReport) -> None:
    if out.json:
        out.data(found.to_dict())
        return
    if not found.entries:
        out.line(f"the prompt cache is empty ({found.folder})")
        return
    now = time.time()
    rows = [
        [safe(e.model, None), _begins(e.begins), f"{e.tokens:,}", human_bytes(e.size), ago(e.used, now)]
        for e in found.entries
    ]
    out.columns(["MODEL", "BEGINS", "TOKENS", "SIZE", "LAST USED"], rows, right=("TOKENS", "SIZE"))
    out.line(f"{plural(len(found.entries), 'entry', 'entries')}, {human_bytes(found.size)} in {found.folder}")


def _begins(text: str) -> str:
    """What an entry's prompt begins with, short enough to sit in a row: one line, escaped."""
    return safe(text, BEGINS_WIDTH) if text else "-"


def clear(out: Output) -> int:
    """Delete every entry; the bytes freed."""
    removed = prompt_cache.clear()
    freed = sum(entry.size for entry in removed)
    if out.json:
        out.data({"removed": len(removed), "freed": freed})
    else:
        out.info(f"removed {plural(len(removed), 'entry', 'entries')}, {human_bytes(freed)} freed")
    return freed
