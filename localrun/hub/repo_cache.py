"""What was read of a repo at one commit: its GGUF listing and each quantization's header (or
what made it unreadable), kept in $LOCALRUN_HOME/repos/. A commit never changes, so a second
search reads nothing of it again; a new commit is a new entry."""

from __future__ import annotations

import hashlib
from pathlib import Path

from localrun import paths
from localrun.errors import BadModel, LocalrunError, NotFound
from localrun.hub.listing import RepoListing, RepoQuant
from localrun.model.header import CACHE_VERSION, HeaderInfo

FOLDER = "repos"


def _file(repo_id: str, commit: str) -> Path:
    key = hashlib.sha256(f"{CACHE_VERSION}:{repo_id}@{commit}".encode()).hexdigest()[:32]
    return paths.home() / FOLDER / f"{key}.json"


def remember(listing: RepoListing, headers: list[HeaderInfo | BadModel]) -> None:
    """Keep the listing and its headers; a read-only or full home only costs speed."""
    read = [
        {"header": h.to_dict()} if isinstance(h, HeaderInfo) else {"problem": h.message, "hint": h.hint}
        for h in headers
    ]
    data = {
        "repo_id": listing.repo_id,
        "commit": listing.commit,
        "quants": [{**q.to_dict(), "sha256": q.sha256, "sizes": q.sizes} for q in listing.quants],
        "mmproj": listing.mmproj,
        "skipped": listing.skipped,
        "read": read,
    }
    paths.write_json_quietly(_file(listing.repo_id, listing.commit), data)


def remember_problem(repo_id: str, commit: str, problem: LocalrunError) -> None:
    """Keep why the repo has nothing to plan at this commit (no GGUF model file, a hostile listing)."""
    data = {"repo_id": repo_id, "commit": commit, "problem": problem.message, "hint": problem.hint}
    data["kind"] = type(problem).__name__
    paths.write_json_quietly(_file(repo_id, commit), data)


def recall(repo_id: str, commit: str) -> tuple[RepoListing, list[HeaderInfo | BadModel]] | LocalrunError | None:
    """The listing and headers kept for this commit, or the problem kept for it; None when nothing
    was kept (or it no longer reads as this version's)."""
    data = paths.read_json(_file(repo_id, commit))
    if not isinstance(data, dict) or data.get("repo_id") != repo_id or data.get("commit") != commit:
        return None
    if isinstance(data.get("problem"), str):
        kind = {"NotFound": NotFound, "BadModel": BadModel}.get(str(data.get("kind")), LocalrunError)
        return kind(data["problem"], hint=data.get("hint"))
    try:
        quants = [RepoQuant(q["quant"], q["files"], q["size"], q["sha256"], q["sizes"]) for q in data["quants"]]
        headers: list[HeaderInfo | BadModel] = [
            HeaderInfo(**r["header"]) if "header" in r else BadModel(r["problem"], hint=r.get("hint"))
            for r in data["read"]
        ]
        listing = RepoListing(repo_id, commit, quants, list(data["mmproj"]), list(data["skipped"]), commit)
    except (KeyError, TypeError):
        return None
    return (listing, headers) if len(headers) == len(quants) else None
