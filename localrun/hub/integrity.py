"""Which downloaded files are not proven whole yet: a blob is marked before its download starts,
and the mark is cleared only once its sha256 matched the Hub's.

huggingface_hub renames `<blob>.incomplete` to the blob before localrun can hash it, so a pull
killed during the check would leave a corrupt file under its final name, looking pulled. The mark
closes that gap: the next pull checks a marked blob again, and so does the resolver before
anything loads it. Marks are empty files in $LOCALRUN_HOME/unverified/, one per blob, named by
the blob's sha256 (its name in the cache) and a digest of its folder (two repos, or two caches,
can hold the same file). Bookkeeping: when the folder cannot be written, downloads go on
without.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from localrun import paths

_FOLDER = "unverified"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _mark_name(blob: Path) -> str | None:
    """The mark's file name for a blob named by its sha256; None for any other file."""
    real = os.path.realpath(blob)
    name = os.path.basename(real)
    if not _SHA256_RE.fullmatch(name):
        return None
    return f"{name}.{hashlib.sha256(os.path.dirname(real).encode()).hexdigest()[:16]}"


def mark(blob: Path) -> None:
    """Record that `blob` is about to be downloaded and is not checked yet. Raises OSError when
    it cannot be recorded: the caller goes on without (and may say so)."""
    name = _mark_name(blob)
    if name is not None:  # a file not named by its sha256 has nothing to be checked against
        target = paths.home() / _FOLDER / name
        paths.private_file(paths.private_dir(target.parent) / target.name)


def clear(blob: Path) -> None:
    """The blob matched its sha256, or is gone: forget the mark."""
    name = _mark_name(blob)
    if name is not None:
        try:
            (paths.home() / _FOLDER / name).unlink(missing_ok=True)
        except OSError:  # stays marked: checked once more before its next load, nothing worse
            pass


def unverified(blobs: Iterable[Path]) -> set[Path]:
    """Those of `blobs` that are marked: their download or its check did not finish."""
    try:
        marks = set(os.listdir(paths.home() / _FOLDER))
    except OSError:  # no marks (or no readable home): nothing is known to be unverified
        return set()
    return {b for b in blobs if _mark_name(b) in marks}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def recheck(blob: Path, links: Iterable[Path] = ()) -> bool:
    """Hash a marked blob: True when it matches its name (the mark is cleared); False when it is
    corrupt (the blob, the snapshot `links` to it and the mark are deleted)."""
    real = Path(os.path.realpath(blob))
    if sha256_of(real) == real.name:
        clear(real)
        return True
    discard(real, links)
    return False


def discard(blob: Path, links: Iterable[Path] = ()) -> None:
    """Delete a corrupt blob, the snapshot links to it, and its mark."""
    for victim in (*links, blob):
        victim.unlink(missing_ok=True)
    clear(blob)
