"""Removing pulled models from the HF cache, one quant at a time, without breaking the repo."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from localrun.errors import NotFound, UsageError
from localrun.model.refs import ModelRef
from localrun.store.resolve import find
from localrun.store.scan import CacheEntry, scan
from localrun.store.usage import forget


@dataclass
class RemovalPlan:
    entries: list[CacheEntry]
    links: list[Path]  # snapshot files to unlink
    blobs: list[Path]  # blobs no remaining snapshot links to
    freed: int

    @property
    def shared(self) -> int:
        """Blobs of the removed entries that stay, because another revision links them too."""
        return len({f.blob for e in self.entries for f in e.files}) - len(self.blobs)

    def to_dict(self) -> dict:
        return {
            "removed": [e.label for e in self.entries],
            "files": [str(p) for p in self.links],
            "blobs_deleted": len(self.blobs),
            "freed": self.freed,
        }


def plan_removal(ref: ModelRef) -> RemovalPlan:
    """What `rm` would delete: the snapshot files of the named quant(s), and the blobs they leave unused.

    Why not huggingface_hub's DeleteCacheStrategy: it deletes whole revisions, and one revision
    holds every quant of the repo that was pulled. So: unlink that quant's snapshot files in each
    named revision, and delete a blob only when no other snapshot file of the repo (another quant,
    another revision) still links to it - a blob shared by two revisions stays.
    """
    if ref.is_local:
        raise UsageError(
            f"{ref.raw} is a local file: `localrun rm` removes pulled models from the HF cache",
            hint="delete a local file with your file manager or `rm`",
        )
    listing = scan()
    targets = find(ref, listing)
    if not targets:
        pulled = sorted({e.label for e in listing.entries if e.repo_id.lower() == (ref.repo_id or "").lower()})
        hint = f"pulled from that repo: {', '.join(pulled)}" if pulled else "run `localrun list` to see what is pulled"
        raise NotFound(f"{ref.raw} is not pulled" + (f" at revision {ref.revision}" if ref.revision else ""), hint=hint)
    # When the last model of a revision goes, its projector goes with it: nothing can use it alone.
    chosen = {id(e) for e in targets}
    for e in listing.entries:
        if e.kind != "mmproj" or id(e) in chosen:
            continue
        same_revision = [o for o in listing.entries if o.repo_path == e.repo_path and o.commit == e.commit]
        if any(id(o) in chosen for o in same_revision) and not any(
            o.kind == "model" and id(o) not in chosen for o in same_revision
        ):
            targets.append(e)
    links = [f.link for e in targets for f in e.files]
    kept_blobs = _linked_blobs({e.repo_path for e in targets}, exclude=set(links))
    blobs = sorted({f.blob for e in targets for f in e.files} - kept_blobs)
    sizes = {f.blob: f.size for e in targets for f in e.files}
    return RemovalPlan(targets, links, blobs, sum(sizes[b] for b in blobs))


def _linked_blobs(repo_dirs: set[Path], exclude: set[Path]) -> set[Path]:
    """Blobs still linked from any snapshot file of these repos (every file, GGUF or not)."""
    kept = set()
    for repo_dir in repo_dirs:
        for f in (repo_dir / "snapshots").glob("*/**/*"):
            if f not in exclude and not f.is_dir() and f.exists():
                kept.add(f.resolve())
    return kept


def remove(plan: RemovalPlan) -> None:
    """Carry out a RemovalPlan. Links go before blobs: an interrupted rm leaves an orphan blob
    (wasted space), never a snapshot link to a missing blob (scan_cache_dir skips such a repo)."""
    for link in plan.links:
        link.unlink(missing_ok=True)
    for repo_dir in {e.repo_path for e in plan.entries}:
        _prune_snapshots(repo_dir)
    for blob in plan.blobs:
        blob.unlink(missing_ok=True)
    forget(plan.blobs)
    for repo_dir in {e.repo_path for e in plan.entries}:
        snapshots = repo_dir / "snapshots"
        if not snapshots.exists() or not any(snapshots.iterdir()):
            shutil.rmtree(repo_dir, ignore_errors=True)  # nothing left: refs, .no_exist, partial blobs


def _prune_snapshots(repo_dir: Path) -> None:
    """Remove folders emptied by the unlinking, and refs that point at a removed revision
    (scan_cache_dir treats a ref to a missing snapshot as a corrupted repo)."""
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return
    for snapshot in list(snapshots.iterdir()):
        for folder in sorted((p for p in snapshot.glob("**/*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(folder.iterdir()):
                folder.rmdir()
        if snapshot.is_dir() and not any(snapshot.iterdir()):
            snapshot.rmdir()
    remaining = {p.name for p in snapshots.iterdir()}
    refs = repo_dir / "refs"
    if refs.is_dir():
        for ref in refs.glob("**/*"):
            if ref.is_file() and ref.read_text().strip() not in remaining:
                ref.unlink()
