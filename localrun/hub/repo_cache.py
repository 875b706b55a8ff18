"""What a repo holds at one commit: its GGUF listing, or why it has nothing to plan, kept in
$LOCALRUN_HOME/repos/. A commit never changes, so a second search lists nothing of it again; a
new commit is a new entry. The headers are kept by their files' content (model.header's
known_header), which pull reads from too."""

from __future__ import annotations

import hashlib
from pathlib import Path

from localrun import paths
from localrun.errors import BadModel, LocalrunError, NotFound
from localrun.hub.listing import RepoListing, RepoQuant
from localrun.model.header import CACHE_VERSION

FOLDER = "repos"


def _file(repo_id: str, commit: str) -> Path:
    key = hashlib.sha256(f"{CACHE_VERSION}:{repo_id}@{commit}".encode()).hexdigest()[:32]
    return paths.home() / FOLDER / f"{key}.json"


def remember(listing: RepoListing) -> None:
    """Keep the listing; a read-only or full home only costs speed."""
    data = {
        "repo_id": listing.repo_id,
        "commit": listing.commit,
        "quants": [{**q.to_dict(), "sha256": q.sha256, "sizes": q.sizes} for q in listing.quants],
        "mmproj": listing.mmproj,
        "skipped": listing.skipped,
    }
    paths.write_json_quietly(_file(listing.repo_id, listing.commit), data)


def remember_problem(repo_id: str, commit: str, problem: LocalrunError) -> None:
    """Keep why the repo has nothing to plan at this commit (no GGUF model file, a hostile listing)."""
    data = {"repo_id": repo_id, "commit": commit, "problem": problem.message, "hint": problem.hint}
    data["kind"] = type(problem).__name__
    paths.write_json_quietly(_file(repo_id, commit), data)


def recall(repo_id: str, commit: str) -> RepoListing | LocalrunError | None:
    """The listing kept for this commit, or the problem kept for it; None when nothing was kept
    (or it no longer reads as this version's)."""
    data = paths.read_json(_file(repo_id, commit))
    if not isinstance(data, dict) or data.get("repo_id") != repo_id or data.get("commit") != commit:
        return None
    if isinstance(data.get("problem"), str):
        kind = {"NotFound": NotFound, "BadModel": BadModel}.get(str(data.get("kind")), LocalrunError)
        return kind(data["problem"], hint=data.get("hint"))
    try:
        quants = [RepoQuant(q["quant"], q["files"], q["size"], q["sha256"], q["sizes"]) for q in data["quants"]]
        return RepoListing(repo_id, commit, quants, list(data["mmproj"]), list(data["skipped"]), commit)
    except (KeyError, TypeError):
        return None
