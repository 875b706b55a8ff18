"""huggingface_hub's exceptions, and the network's under it (httpx), as one clear line each."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from localrun.errors import AccessDenied, LocalrunError, NetworkError, NotFound
from localrun.hub.settings import endpoint

NETWORK_HINT = "check your connection and HF_ENDPOINT; models already pulled run offline"


def network_reason(exc: BaseException) -> str | None:
    """What went wrong on the way to the Hub, in a few words; None when it is no network failure."""
    import httpx

    if not isinstance(exc, httpx.TransportError):  # HTTP errors are answers: huggingface_hub's kind
        return None
    if isinstance(exc, httpx.TimeoutException):
        return "no answer (timed out)"
    if isinstance(exc, httpx.ConnectError):
        # httpx keeps the operating system's error as the cause (through httpcore's)
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ConnectionRefusedError) or "Connection refused" in str(cause):
                return "connection refused"
            if isinstance(cause, socket.gaierror) or "Name or service not known" in str(cause):
                return f"cannot resolve {urlparse(endpoint()).hostname or 'its name'}"
            if isinstance(cause, TimeoutError):
                return "no answer (timed out)"
            cause = cause.__cause__ or cause.__context__
        return "cannot connect"
    return f"connection lost ({type(exc).__name__})"


def translate_hub_error(exc: BaseException) -> LocalrunError | None:
    """One clear line for huggingface_hub's and httpx's exceptions, None for others. Order matters:
    some subclass others (a gated repo is a repository-not-found, a missing cache entry while
    offline is an entry-not-found)."""
    reason = network_reason(exc)
    if reason is not None:
        return NetworkError(f"cannot reach the Hub at {endpoint()}: {reason}", hint=NETWORK_HINT)
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
        # raised from the failed request when there was one: say what failed (HTTP 500, a timeout)
        cause = translate_hub_error(exc.__cause__) if exc.__cause__ is not None else None
        return cause or NetworkError(
            f"cannot reach the Hub at {endpoint()} and the file is not in the cache", hint=NETWORK_HINT
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
