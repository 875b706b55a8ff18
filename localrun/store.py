"""What is pulled: GGUF models in the shared Hugging Face cache, found, listed and removed.

localrun keeps no second copy and no index of its own: the HF cache (read with huggingface_hub's
`scan_cache_dir`) is the truth, so models fetched by `hf download` or llama.cpp's `-hf` show up too.
The one thing the cache cannot tell is when a model was last *used* (blob atimes are not reliable:
relatime/noatime mounts, and reading a header for `list`/`show` would bump them), so localrun
records it in `$LOCALRUN_HOME/usage.json` through `touch()`, called when a model is loaded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from localrun import hub, paths
from localrun.errors import NotFound, UsageError
from localrun.gguf_info import SHARD_RE
from localrun.output import human_bytes
from localrun.quants import matches_tag, quant_from_filename, sort_key

if TYPE_CHECKING:
    from huggingface_hub import HFCacheInfo

    from localrun.output import Output
    from localrun.refs import ModelRef

_USAGE_FILE = "usage.json"


@dataclass(frozen=True)
class CachedFile:
    name: str  # path inside the repo, e.g. "Q4_K_M/model-00001-of-00002.gguf"
    link: Path  # the file in snapshots/<commit>/ (a symlink to the blob, or the file itself)
    blob: Path
    size: int
    linked_at: float  # when the snapshot entry appeared: when it was pulled into this revision
    missing: bool = False  # a dangling link: its blob was deleted behind huggingface_hub's back


@dataclass
class ModelEntry:
    """One loadable GGUF in one cached revision of a repo: a single file or all shards of a split."""

    repo_id: str
    repo_path: Path  # the repo's folder in the cache (models--org--name)
    commit: str
    refs: list[str]  # branch/tag names pointing at this revision ("main"), empty when detached
    quant: str | None
    kind: str  # "model"; "mmproj" (a vision projector, loaded next to a model); "incomplete" (a shard
    # of a split whose other shards are missing); "other" (a GGUF that is no model: imatrix, draft)
    files: list[CachedFile]
    last_used: float | None = None
    label: str = ""  # set by scan(): repo:QUANT, or repo:file.gguf when the quant is ambiguous

    @property
    def path(self) -> Path:
        """The file to load: the first shard of a split."""
        return self.files[0].link

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
    def pulled(self) -> float:
        return max(f.linked_at for f in self.files)

    @property
    def revision(self) -> str:
        """How to name this revision: its branch or tag when it has one, else the short commit."""
        return "main" if "main" in self.refs else (sorted(self.refs)[0] if self.refs else self.commit[:10])

    def to_dict(self) -> dict:
        return {
            "model": self.label, "repo_id": self.repo_id, "quant": self.quant, "kind": self.kind,
            "revision": self.revision, "commit": self.commit, "refs": sorted(self.refs),
            "size": self.size, "n_shards": self.n_shards, "damaged": self.damaged,
            "files": [{"name": f.name, "path": str(f.link), "size": f.size} for f in self.files],
            "pulled": iso(self.pulled), "last_used": iso(self.last_used),
        }


@dataclass
class Listing:
    entries: list[ModelEntry]
    cache_dir: Path
    warnings: list[str] = field(default_factory=list)  # repos huggingface_hub found corrupted

    def to_dict(self) -> dict:
        return {"cache_dir": str(self.cache_dir), "models": [e.to_dict() for e in self.entries],
                "warnings": self.warnings}


# -- last use ------------------------------------------------------------------------------------
def _usage_path() -> Path:
    return paths.home() / _USAGE_FILE


def _read_usage() -> dict[str, float]:
    try:
        data = json.loads(_usage_path().read_text())
        return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_usage(usage: dict[str, float]) -> None:
    target = _usage_path()
    partial = target.with_name(f".{_USAGE_FILE}.{os.getpid()}")
    partial.write_text(json.dumps(usage, indent=1, sort_keys=True))
    os.replace(partial, target)  # atomic: a reader never sees half a file


def touch(path: str | Path, when: float | None = None) -> None:
    """Record that the model at `path` (a cached snapshot file or a local file) was just used.

    Keyed by the real path: for a cached model that is its blob, so every revision linking the
    same blob shows the same last use. Two processes touching at once may lose one update (the
    file is rewritten whole); that costs a slightly stale "last used", never a broken file.
    """
    usage = _read_usage()
    usage[os.path.realpath(path)] = time.time() if when is None else when
    _write_usage(usage)


def last_used(path: str | Path) -> float | None:
    """When the model at `path` was last used, as recorded by touch(); None when never."""
    return _read_usage().get(os.path.realpath(path))


def _forget(blobs: Iterable[Path]) -> None:
    usage = _read_usage()
    gone = [str(b) for b in blobs if str(b) in usage]
    for key in gone:
        del usage[key]
    if gone:
        _write_usage(usage)


# -- scanning ------------------------------------------------------------------------------------
def _scan_cache() -> "HFCacheInfo | None":
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        return scan_cache_dir(hub.cache_dir())
    except CacheNotFound:
        return None


def _group(repo_id: str, repo_path: Path, commit: str, refs: list[str], files: list[CachedFile]) -> list[ModelEntry]:
    """GGUF files of one revision -> entries, grouped the way a Hub listing is (hub.group_candidates):
    one per single file or complete split; projectors apart; anything else (a split with shards
    missing, an imatrix) one entry per file, so that `rm` can still reach it."""
    by_name = {f.name: f for f in files}
    candidates, mmproj, _ = hub.group_candidates({f.name: (f.size, None) for f in files})

    def entry(names: list[str], quant: str | None, kind: str) -> ModelEntry:
        return ModelEntry(repo_id, repo_path, commit, refs, quant, kind, [by_name[n] for n in names])

    entries = [entry(c.files, c.quant, "model") for c in candidates]
    entries += [entry([n], quant_from_filename(n), "mmproj") for n in mmproj]
    grouped = {n for e in entries for n in (f.name for f in e.files)}
    entries += [entry([n], quant_from_filename(n), "incomplete" if SHARD_RE.match(n) else "other")
                for n in sorted(by_name) if n not in grouped]
    return entries


def _label(entries: list[ModelEntry]) -> None:
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
    """Every GGUF model in the HF cache, whichever tool pulled it, best quant first within a repo."""
    info = _scan_cache()
    if info is None:
        return Listing([], hub.cache_dir())
    usage = _read_usage()
    entries: list[ModelEntry] = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            ggufs = []
            for f in rev.files:
                name = f.file_path.relative_to(rev.snapshot_path).as_posix()
                if name.lower().endswith(".gguf"):
                    ggufs.append(CachedFile(name, f.file_path, f.blob_path, f.size_on_disk,
                                            f.file_path.lstat().st_mtime))
            entries += _group(repo.repo_id, repo.repo_path, rev.commit_hash, sorted(rev.refs), ggufs)
    scanned = {repo.repo_path for repo in info.repos}
    skipped = [p for p in sorted(hub.cache_dir().glob("models--*")) if p.is_dir() and p not in scanned]
    for repo_path in skipped:
        repo_id = repo_path.name.split("--", 1)[1].replace("--", "/")
        for commit, refs, ggufs in _walk_damaged(repo_path):
            entries += _group(repo_id, repo_path, commit, refs, ggufs)
    for entry in entries:
        entry.last_used = usage.get(str(entry.files[0].blob))
    entries.sort(key=lambda e: (e.repo_id.lower(), e.revision != "main", e.revision, e.kind != "model",
                                sort_key(e.quant, e.size), e.files[0].name))
    _label(entries)
    # What huggingface_hub skipped, we walked: its complaint is replaced by the entries (and a
    # warning for each damaged one). Any other warning (a stray file in the cache) is passed on.
    warnings = [str(w).splitlines()[0] for w in info.warnings]
    return Listing(entries, hub.cache_dir(), [w for w in warnings if not any(str(p) in w for p in skipped)])


def _walk_damaged(repo_path: Path) -> list[tuple[str, list[str], list[CachedFile]]]:
    """(commit, refs, GGUF files) of a repo scan_cache_dir skipped as corrupted: a snapshot link that
    lost its blob (deleted by hand), or a ref to a snapshot that never got a file (a first download
    interrupted). It skips the whole repo; we walk it so that its intact quants still show, and
    `rm` can remove a broken one."""
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
            files.append(CachedFile(link.relative_to(snapshot).as_posix(), link, blob,
                                    0 if missing else blob.stat().st_size, link.lstat().st_mtime, missing))
        revisions.append((snapshot.name, sorted(refs.get(snapshot.name, [])), files))
    return revisions


def _matches(entry: ModelEntry, ref: "ModelRef") -> bool:
    if entry.repo_id.lower() != (ref.repo_id or "").lower():
        return False
    if ref.revision and not (ref.revision in entry.refs or entry.commit.startswith(ref.revision)):
        return False
    if ref.filename:
        wanted = ref.filename.strip("/")
        return any(f.name == wanted for f in entry.files)
    if ref.tag:
        # A projector is never a quant of the model, even when its name says F16.
        return entry.kind == "model" and ((entry.quant or "").upper() == ref.tag.upper()
                                          or matches_tag(entry.files[0].name, ref.tag))
    return True


def find(ref: "ModelRef", listing: Listing | None = None) -> list[ModelEntry]:
    """The cached entries a repo reference names (all of the repo's when it has no tag or file)."""
    if ref.is_local:
        raise UsageError(f"{ref.raw} is a local file, not a pulled model")
    listing = listing if listing is not None else scan()
    return [e for e in listing.entries if _matches(e, ref)]


# -- removing ------------------------------------------------------------------------------------
@dataclass
class RemovalPlan:
    entries: list[ModelEntry]
    links: list[Path]  # snapshot files to unlink
    blobs: list[Path]  # blobs no remaining snapshot links to
    freed: int

    def to_dict(self) -> dict:
        return {"removed": [e.label for e in self.entries], "files": [str(p) for p in self.links],
                "blobs_deleted": len(self.blobs), "freed": self.freed}


def plan_removal(ref: "ModelRef") -> RemovalPlan:
    """What `rm` would delete: the snapshot files of the named quant(s), and the blobs they leave unused.

    Why not huggingface_hub's DeleteCacheStrategy: it deletes whole revisions, and one revision
    holds every quant of the repo that was pulled. So: unlink that quant's snapshot files in each
    named revision, and delete a blob only when no other snapshot file of the repo (another quant,
    another revision) still links to it - a blob shared by two revisions stays.
    """
    if ref.is_local:
        raise UsageError(f"{ref.raw} is a local file: `localrun rm` removes pulled models from the HF cache",
                         hint="delete a local file with your file manager or `rm`")
    listing = scan()
    targets = find(ref, listing)
    if not targets:
        pulled = sorted({e.label for e in listing.entries if e.repo_id.lower() == (ref.repo_id or "").lower()})
        hint = (f"pulled from that repo: {', '.join(pulled)}" if pulled else "run `localrun list` to see what is pulled")
        raise NotFound(f"{ref.raw} is not pulled" + (f" at revision {ref.revision}" if ref.revision else ""), hint=hint)
    # When the last model of a revision goes, its projector goes with it: nothing can use it alone.
    chosen = {id(e) for e in targets}
    for e in listing.entries:
        if e.kind != "mmproj" or id(e) in chosen:
            continue
        same_revision = [o for o in listing.entries if o.repo_path == e.repo_path and o.commit == e.commit]
        if (any(id(o) in chosen for o in same_revision)
                and not any(o.kind == "model" and id(o) not in chosen for o in same_revision)):
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
    import shutil

    for link in plan.links:
        link.unlink(missing_ok=True)
    for repo_dir in {e.repo_path for e in plan.entries}:
        _prune_snapshots(repo_dir)
    for blob in plan.blobs:
        blob.unlink(missing_ok=True)
    _forget(plan.blobs)
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


# -- formatting ----------------------------------------------------------------------------------
def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    seconds = max(0.0, (now or time.time()) - ts)
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"


# -- the commands --------------------------------------------------------------------------------
def show_listing(out: "Output", listing: Listing) -> None:
    """`localrun list`: a table on stdout (or JSON); scan warnings on stderr."""
    for warning in listing.warnings:
        out.warn(f"skipped a damaged cache entry: {warning}")
    for e in listing.entries:
        if e.damaged:
            out.warn(f"{e.label}: a file is missing from the cache (its blob was deleted); "
                     f"pull it again to repair it, or `localrun rm {e.label}`")
    if out.json:
        out.data(listing.to_dict())
        return
    if not listing.entries:
        out.info(f"no models pulled yet (cache: {listing.cache_dir})")
        out.info("pull one with `localrun pull ORG/REPO`")
        return
    from rich.text import Text

    with_revision = any(e.revision != "main" for e in listing.entries)
    header = ["MODEL", "SIZE", "FILES", *(("REVISION",) if with_revision else ()), "PULLED", "LAST USED"]
    now = time.time()
    rows = [[e.label, human_bytes(e.size), _files_cell(e),
             *((e.revision,) if with_revision else ()), ago(e.pulled, now), ago(e.last_used, now)]
            for e in listing.entries]
    # Plain aligned columns, never cut or wrapped: a model name is what you type next, and a
    # rich Table shrinks it to "…" on a narrow terminal or a pipe (80 columns).
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        cells = [cell.rjust(w) if header[j] == "SIZE" else cell.ljust(w) for j, (cell, w) in enumerate(zip(row, widths))]
        out.show(Text("  ".join(cells).rstrip(), style="bold" if i == 0 else ""))


def _files_cell(e: ModelEntry) -> str:
    if e.damaged:
        return "damaged: file missing"
    if e.kind == "incomplete":
        return "split, shards missing"
    return f"{e.n_shards} shards" if e.n_shards > 1 else "1 file"


def rm(ref: "ModelRef", out: "Output", *, yes: bool = False) -> RemovalPlan | None:
    """`localrun rm`: say what goes and what it frees, ask unless --yes, delete. None when declined."""
    plan = plan_removal(ref)
    out.info("will remove:")
    for e in plan.entries:
        where = "" if e.revision == "main" else f" @ {e.revision}"
        out.info(f"  {e.label}{where}: {e.n_shards} file{'s' if e.n_shards > 1 else ''}, {human_bytes(e.size)}")
    shared = len({f.blob for e in plan.entries for f in e.files}) - len(plan.blobs)
    kept = f" (keeping {shared} file{'s' if shared > 1 else ''} that another revision also uses)" if shared else ""
    what = "it" if len(plan.entries) == 1 else f"these {len(plan.entries)}"
    question = f"Remove {what} and free {human_bytes(plan.freed)}{kept}?"
    if not yes and not out.confirm(question, refuse_hint="add --yes to remove without asking"):
        out.info("nothing removed")
        return None
    remove(plan)
    if out.json:
        out.data(plan.to_dict())
    else:
        from rich.text import Text

        for e in plan.entries:
            out.show(Text(f"removed {e.label}" + ("" if e.revision == "main" else f" @ {e.revision}")))
    out.info(f"freed {human_bytes(plan.freed)}{kept}")
    return plan
