"""The Hub settings as the environment has them now.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and its timeouts once, at
import. localrun reads them at call time and passes them explicitly, so that every call (and every
test, which points them at a temporary folder) sees the environment as it is now.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def cache_dir() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


DEFAULT_TIMEOUT = 10.0  # seconds; huggingface_hub's default for both of its timeouts


def _seconds(variable: str) -> float:
    try:
        value = float(os.environ.get(variable, ""))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def metadata_timeout() -> float:
    """How long to wait for the Hub to answer a metadata request (a listing, a file's HEAD):
    HF_HUB_ETAG_TIMEOUT, as huggingface_hub reads it, else 10 s."""
    return _seconds("HF_HUB_ETAG_TIMEOUT")


def download_timeout() -> float:
    """How long a read may wait for the next bytes of a file: HF_HUB_DOWNLOAD_TIMEOUT, else 10 s
    (huggingface_hub reads the same variable, at import, for its downloads)."""
    return _seconds("HF_HUB_DOWNLOAD_TIMEOUT")


def quiet_hub_logs() -> None:
    """Keep huggingface_hub's log to errors: it warns for each retry of its own, in raw lines,
    where localrun says one line per retry of its own. HF_HUB_VERBOSITY or LOCALRUN_DEBUG=1 keep it."""
    if os.environ.get("HF_HUB_VERBOSITY") or os.environ.get("LOCALRUN_DEBUG") == "1":
        return
    from huggingface_hub.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def token() -> str | None:
    """HF_TOKEN when set; None lets huggingface_hub fall back to the saved login."""
    return os.environ.get("HF_TOKEN") or None


def any_token() -> bool:
    from huggingface_hub import get_token

    return bool(token() or get_token())


def api():
    """An HfApi bound to the current endpoint and token."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token())


def repo_folder(repo_id: str) -> Path:
    """The repo's folder in the standard cache layout."""
    return cache_dir() / ("models--" + repo_id.replace("/", "--"))


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    for existing in (path, *path.parents):
        if existing.exists():
            return shutil.disk_usage(existing).free
    return shutil.disk_usage(Path.cwd()).free
