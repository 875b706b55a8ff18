"""huggingface_hub's exceptions as one clear line each."""

from __future__ import annotations

from localrun.errors import AccessDenied, LocalrunError, NetworkError, NotFound
from localrun.hub.settings import endpoint


def translate_hub_error(exc: BaseException) -> LocalrunError | None:
    """One clear line for huggingface_hub's exceptions, None for others. Order matters: some
    subclass others (a gated repo is a repository-not-found, a missing cache entry while offline
    is an entry-not-found)."""
    from huggingface_hub import errors as hf

    # huggingface_hub parses the repo from the request URL, query string included (`?blobs=true`).
    repo = (getattr(exc, "repo_id", None) or "the repo").split("?")[0]
    if isinstance(exc, hf.GatedRepoError):
        return AccessDenied(
            f"{repo} is gated: you must accept its licence and be authenticated",
            hint="accept the licence on the model page, then set HF_TOKEN (or run `hf auth login`)",
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return NotFound(
            f"repository {repo} not found (or private)", hint="check the name; for a private repo set HF_TOKEN"
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return NotFound(f"revision not found in {repo}", hint="check --revision")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return NetworkError(
            "offline (HF_HUB_OFFLINE=1) and the model is not in the cache",
            hint="unset HF_HUB_OFFLINE, or pull the model while online",
        )
    if isinstance(exc, hf.LocalEntryNotFoundError):  # before EntryNotFoundError: it is one
        return NetworkError(
            f"cannot reach the Hub at {endpoint()} and the file is not in the cache",
            hint="check your connection or HF_ENDPOINT; pulled models work offline",
        )
    if isinstance(exc, hf.EntryNotFoundError):
        return NotFound("file not found in the repo", hint="run `localrun pull REPO --dry-run` to list its files")
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return NetworkError(
            f"the Hub answered HTTP {status}" if status else f"Hub error: {str(exc).splitlines()[0]}",
            hint="try again; an interrupted download resumes where it stopped",
        )
    return None
