"""Talking to the Hugging Face Hub through huggingface_hub: errors, listing, headers, downloads."""

from __future__ import annotations

import os
from pathlib import Path

from localrun.errors import AccessDenied, LocalrunError, NetworkError, NotFound

# huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, at import.
# localrun reads them at call time and passes them explicitly, so that every call (and every
# test, which points them at a temporary folder) sees the environment as it is now.


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_dir() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def token() -> str | None:
    """HF_TOKEN when set; None lets huggingface_hub fall back to the saved login."""
    return os.environ.get("HF_TOKEN") or None


def api():
    """An HfApi bound to the current endpoint and token."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token())


def translate_hub_error(exc: BaseException) -> LocalrunError | None:
    """One clear line for huggingface_hub's exceptions. Gated before not-found: one subclasses the other."""
    from huggingface_hub import errors as hf

    repo = getattr(exc, "repo_id", None) or "the repo"
    if isinstance(exc, hf.GatedRepoError):
        return AccessDenied(f"{repo} is gated: you must accept its licence and be authenticated",
                            hint="accept the licence on the model page, then set HF_TOKEN (or run `hf auth login`)")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return NotFound(f"repository {repo} not found (or private)",
                        hint="check the name; for a private repo set HF_TOKEN")
    if isinstance(exc, hf.RevisionNotFoundError):
        return NotFound(f"revision not found in {repo}", hint="check --revision")
    if isinstance(exc, hf.EntryNotFoundError):
        return NotFound("file not found in the repo", hint="run `localrun pull REPO --dry-run` to list its files")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return NetworkError("offline (HF_HUB_OFFLINE=1) and the model is not in the cache",
                            hint="unset HF_HUB_OFFLINE, or pull the model while online")
    if isinstance(exc, hf.LocalEntryNotFoundError):
        return NetworkError("cannot reach the Hub and the file is not in the cache",
                            hint="check your connection or HF_ENDPOINT; pulled models work offline")
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return NetworkError(f"the Hub answered HTTP {status}" if status else f"Hub error: {str(exc).splitlines()[0]}",
                            hint="try again; an interrupted download resumes where it stopped")
    return None
