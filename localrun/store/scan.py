"""The GGUF models in the shared Hugging Face cache, whichever tool pulled them.

localrun keeps no second copy and no index of its own: the HF cache, read with huggingface_hub's
`scan_cache_dir`, is the truth, so models fetched by `hf download` or llama.cpp's `-hf` show up
too. scan_cache_dir skips a whole repo when one snapshot link lost its blob, or a ref points at a
snapshot that never got a file; `_walk_skipped` is the one walker for those, so that their intact
quants still show and `rm` can repair them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from localrun.hub import integrity
from localrun.hub.listing import group_files
from localrun.hub.settings import cache_dir
from localrun.model.files import ModelFiles
from localrun.model.quants import quant_from_filename, sort_key
from localrun.store.usage import read_usage

# a model to run; a vision projector (loaded next to a model); a shard of a split whose other
# shards are missing; a GGUF that is no model (imatrix, draft)
EntryKind = Literal["model", "mmproj", "incomplete", "other"]


@dataclass(frozen=True)
class CachedFile:
    name: str  # path inside the repo, e.g. "Q4_K_M/model-00001-of-00002.gguf"
    link: Path  # the file in snapshots/<commit>/ (a symlink to the blob, or the file itself)
    blob: Path
    size: int
    linked_at: float  # when the snapshot entry appeared: when it was pulled into this revision
    missing: bool = False  # a dangling link: its blob was deleted behind huggingface_hub's back


@dataclass
class CacheEntry:
    """One GGUF (a single file or all shards of a split) in one cached revision of a repo."""

    repo_id: str
    repo_path: Path  # the repo's folder in the cache (models--org--name)
    commit: str
    refs: list[str]  # branch/tag names pointing at this revision ("main"), empty when detached
    quant: str | None
    kind: EntryKind
    files: list[CachedFile]
    last_used: float | None = None
    label: str = ""  # repo:QUANT, or repo:file.gguf when the quant is ambiguous (set by scan)
    unverified: bool = False  # a pull stopped before a file's sha256 was checked: checked before it loads

    @property
    def path(self) -> Path:
        """The file to load: the first shard of a split."""
        return self.files[0].link

    @property
    def model(self) -> ModelFiles:
        return ModelFiles(tuple(f.link for f in self.files), self.label, self.quant, self.repo_id)

    @property
    def size(self) -> int:
        return sum({f.blob: f.size for f in self.files}.values())

    @property
    def n_shards(self) -> int:
        return len(self.files)

    @property
    def damaged(self) -> bool:
        return any(f.missing for f in self.files)

    @property
    def loadable(self) -> bool:
        return self.kind == "model" and not self.damaged

    @property
    def pulled(self) -> float:
        return max(f.linked_at for f in self.files)

    @property
    def revision(self) -> str:
        """How to name this revision: its branch or tag when it has one, else the short commit."""
        return "main" if "main" in self.refs else (sorted(self.refs)[0] if self.refs else self.commit[:10])

    def to_dict(self) -> dict:
        return {
            "model": self.label,
            "repo_id": self.repo_id,
            "quant": self.quant,
            "kind": self.kind,
            "revision": self.revision,
            "commit": self.commit,
            "refs": sorted(self.refs),
            "size": self.size,
            "n_shards": self.n_shards,
            "damaged": self.damaged,
            "unverified": self.unverified,
            "files": [{"name": f.name, "path": str(f.link), "size": f.size} for f in self.files],
            "pulled": iso(self.pulled),
            "last_used": iso(self.last_used),
        }


@dataclass
class Listing:
    entries: list[CacheEntry]
    cache_dir: Path
    warnings: list[str] = field(default_factory=list)  # repos huggingface_hub found corrupted

    def to_dict(self) -> dict:
        return {
            "cache_dir": str(self.cache_dir),
            "models": [e.to_dict() for e in self.entries],
            "warnings": self.warnings,
        }


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _group(repo_id: str, repo_path: Path, commit: str, refs: list[str], files: list[CachedFile]) -> list[CacheEntry]:
    """GGUF files of one revision -> entries, grouped the way a Hub listing is (hub's group_files):
    one per single file or complete split; projectors apart; anything else one entry per file, so
    that `rm` can still reach it."""
    by_name = {f.name: f for f in files}
    grouped = group_files({f.name: (f.size, None) for f in files})

    def entry(names: list[str], quant: str | None, kind: EntryKind) -> CacheEntry:
        return CacheEntry(repo_id, repo_path, commit, refs, quant, kind, [by_name[n] for n in names])

    entries = [entry(q.files, q.quant, "model") for q in grouped.quants]
    entries += [entry([n], quant_from_filename(n), "mmproj") for n in grouped.mmproj]
    entries += [entry([n], quant_from_filename(n), "incomplete") for n in grouped.incomplete]
    entries += [entry([n], quant_from_filename(n), "other") for n in grouped.other]
    return entries


def _label(entries: list[CacheEntry]) -> None:
    """repo:QUANT when that names one entry of its revision, else repo:path/in/repo.gguf."""
    seen: dict[tuple[str, str, str], int] = {}
    for e in entries:
        if e.kind == "model" and e.quant:
            key = (e.repo_id.lower(), e.commit, e.quant)
            seen[key] = seen.get(key, 0) + 1
    for e in entries:
        unique = e.kind == "model" and e.quant and seen[(e.repo_id.lower(), e.commit, e.quant)] == 1
        e.label = f"{e.repo_id}:{e.quant if unique else e.files[0].name}"


def scan() -> Listing:
    """Every GGUF in the HF cache. Within a repo: the main revision first, then the most recently
    pulled; models before other files, best quant first."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    root = cache_dir()
    try:
        info = scan_cache_dir(root)
    except CacheNotFound:
        return Listing([], root)
    usage = read_usage()
    entries: list[CacheEntry] = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            ggufs = [
                CachedFile(
                    f.file_path.relative_to(rev.snapshot_path).as_posix(),
                    f.file_path,
                    f.blob_path,
                    f.size_on_disk,
                    f.file_path.lstat().st_mtime,
                )
                for f in rev.files
                if f.file_name.lower().endswith(".gguf")
            ]
            entries += _group(repo.repo_id, repo.repo_path, rev.commit_hash, sorted(rev.refs), ggufs)
    scanned = {repo.repo_path for repo in info.repos}
    skipped = [p for p in sorted(root.glob("models--*")) if p.is_dir() and p not in scanned]
    for repo_path in skipped:
        repo_id = repo_path.name.split("--", 1)[1].replace("--", "/")
        for commit, refs, ggufs in _walk_skipped(repo_path):
            entries += _group(repo_id, repo_path, commit, refs, ggufs)
    unverified = integrity.unverified({f.blob for e in entries for f in e.files if not f.missing})
    for entry in entries:
        entry.last_used = usage.get(str(entry.files[0].blob))
        entry.unverified = any(f.blob in unverified for f in entry.files)
    pulled_at = {}
    for e in entries:
        key = (e.repo_path, e.commit)
        pulled_at[key] = max(pulled_at.get(key, 0.0), e.pulled)
    entries.sort(
        key=lambda e: (
            e.repo_id.lower(),
            "main" not in e.refs,
            -pulled_at[(e.repo_path, e.commit)],
            e.commit,
            e.kind != "model",
            sort_key(e.quant, e.size),
            e.files[0].name,
        )
    )
    _label(entries)
    # What huggingface_hub skipped, we walked: its complaint is replaced by the entries (and a
    # warning for each damaged one). Any other warning (a stray file in the cache) is passed on.
    warnings = [str(w).splitlines()[0] for w in info.warnings]
    return Listing(entries, root, [w for w in warnings if not any(str(p) in w for p in skipped)])


def _walk_skipped(repo_path: Path) -> list[tuple[str, list[str], list[CachedFile]]]:
    """(commit, refs, GGUF files) of a repo scan_cache_dir skipped as corrupted."""
    refs: dict[str, list[str]] = {}
    for ref in (repo_path / "refs").glob("**/*"):
        if ref.is_file():
            refs.setdefault(ref.read_text().strip(), []).append(ref.relative_to(repo_path / "refs").as_posix())
    revisions = []
    snapshots = repo_path / "snapshots"
    for snapshot in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
        files = []
        for link in sorted(snapshot.glob("**/*.gguf")):
            blob = link.resolve()
            missing = not blob.is_file()
            files.append(
                CachedFile(
                    link.relative_to(snapshot).as_posix(),
                    link,
                    blob,
                    0 if missing else blob.stat().st_size,
                    link.lstat().st_mtime,
                    missing,
                )
            )
        revisions.append((snapshot.name, sorted(refs.get(snapshot.name, [])), files))
    return revisions
