"""When a download attempt that failed is worth another, and how long to wait before it.

Every retry is localrun's own, said in one line: huggingface_hub's retries are kept out of the
way (its log quieted, its HEAD retries avoided by `check_reachable`), so that a Hub that stalls
or fails costs a bounded time and a few lines, not minutes of raw warnings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from localrun.errors import NetworkError
from localrun.hub.errors import network_reason
from localrun.hub.settings import endpoint, metadata_timeout, token

RETRY_AFTER_LIMIT = 30.0  # seconds: a 429 asking for longer ends the pull, saying when to try again


@dataclass
class Retry:
    reason: str  # what failed, in a few words
    wait: float | None = None  # seconds the Hub asked for (Retry-After); None: our own short delay


def check_reachable(repo_id: str, filename: str, revision: str) -> None:
    """Ask the Hub for a file's metadata once, bounded by metadata_timeout(), without retrying.

    hf_hub_download sends the same HEAD first, but when it fails (a timeout, HTTP 429 or 5xx) and
    the file is not cached, it retries it itself: six more times, up to 60 s each (a constant of
    its own), with a warning each time. Failing here instead lets our loop retry, one line each;
    once the Hub has answered, hf_hub_download's own HEAD goes through at once.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint())
    get_hf_file_metadata(url, token=token(), timeout=metadata_timeout(), endpoint=endpoint())


def retry_for(exc: BaseException) -> Retry | None:
    """Why a download attempt failed, when trying again may help; None when it will not."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__  # huggingface_hub's own HEAD failed: what failed is the cause
    reason = network_reason(exc)
    if reason is not None:
        return Retry(reason)
    if isinstance(exc, HfHubHTTPError):
        response = exc.response
        status = getattr(response, "status_code", None)
        if status == 429:
            return Retry("the Hub is rate-limiting (HTTP 429)", retry_after(response.headers.get("Retry-After")))
        if status is not None and status >= 500:
            return Retry(f"the Hub answered HTTP {status}")
    return None


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds, or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def too_long(retry: Retry) -> NetworkError:
    """The Hub asks for a longer wait than a pull should sit through."""
    wait = duration(retry.wait or 0)
    return NetworkError(
        f"the Hub at {endpoint()} is rate-limiting downloads (HTTP 429) and asks to wait {wait}",
        hint=f"try again in {wait}: an interrupted download resumes where it stopped",
    )


def duration(seconds: float) -> str:
    """45 s, 3 min, 2 h: how long to wait, roughly."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if round(seconds / 60) < 60:
        return f"{round(seconds / 60)} min"
    return f"{round(seconds / 3600)} h"
