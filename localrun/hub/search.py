"""The Hub's model search, for GGUF repos: what `HfApi.list_models` reports of each, typed."""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass
from typing import Any

from localrun.errors import NetworkError, UsageError
from localrun.hub.errors import NETWORK_HINT, translate_hub_error
from localrun.hub.settings import api, endpoint, metadata_timeout, offline
from localrun.text import safe

# `--sort` as people say it -> as list_models takes it (the Hub sorts from the highest)
SORTS = {"downloads": "downloads", "likes": "likes", "trending": "trending_score", "recent": "last_modified"}
EXPAND = ["sha", "downloads", "likes", "trendingScore", "lastModified", "gated", "private", "gguf", "tags"]


@dataclass
class HubModel:
    """One repo as the search reports it; the `gguf` figures are the Hub's summary of its first
    GGUF file, absent where the Hub has none."""

    repo_id: str
    commit: str | None
    downloads: int = 0
    likes: int = 0
    trending: float = 0.0
    last_modified: str | None = None  # ISO 8601
    gated: bool = False
    private: bool = False
    architecture: str | None = None
    n_params: int | None = None
    context_length: int | None = None
    chat_template: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _number(value: object) -> int | None:
    """A count the Hub reports; None for anything that is not a finite number (a hostile answer)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        return None
    return int(value)


def _model(info: Any) -> HubModel:
    """What the search says of one repo, each figure checked: the answer comes from the network."""
    gguf = info.gguf if isinstance(info.gguf, dict) else {}
    arch = gguf.get("architecture")
    return HubModel(
        str(info.id),
        info.sha if isinstance(info.sha, str) else None,
        _number(info.downloads) or 0,
        _number(info.likes) or 0,
        float(_number(info.trending_score) or 0),
        info.last_modified.isoformat() if info.last_modified else None,
        bool(info.gated),
        bool(info.private),
        arch if isinstance(arch, str) else None,
        _number(gguf.get("total")),
        _number(gguf.get("context_length")),
        bool(gguf.get("chat_template")),
    )


def params_range(text: str) -> str:
    """`--params` as people write it (1B-8B, 3B-, -8B, 500M-1.5B) -> the Hub's "min:1B,max:8B"."""
    low, dash, high = text.strip().upper().partition("-")
    bounds = [(side, value.strip()) for side, value in (("min", low), ("max", high)) if value.strip()]
    if not dash or not bounds or not all(re.fullmatch(r"\d+(\.\d+)?[KMBT]?", value) for _, value in bounds):
        raise UsageError(
            f"not a parameter range: {safe(text)!r}", hint="write MIN-MAX with K, M, B or T: 1B-8B, 3B-, -8B"
        )
    return ",".join(f"{side}:{value}" for side, value in bounds)


def search_models(
    query: str | None,
    *,
    sort: str = "downloads",
    limit: int = 20,
    author: str | None = None,
    params: str | None = None,
) -> list[HubModel]:
    """GGUF repos whose name contains `query`, in the Hub's order for `sort`, with a parameter count
    in `params` (the Hub's "min:1B,max:8B"). list_models takes no timeout, so the request runs in a
    daemon thread, waited for as long as a metadata request."""
    if offline():
        raise NetworkError("offline (HF_HUB_OFFLINE=1): cannot search the Hub", hint="unset HF_HUB_OFFLINE to search")
    found: list[HubModel] = []
    failure: list[BaseException] = []

    def ask() -> None:
        try:
            listed = api().list_models(
                search=query or None,
                author=author,
                filter="gguf",
                num_parameters=params,
                sort=SORTS[sort],
                limit=limit,
                expand=EXPAND,
            )
            found.extend(_model(info) for info in listed)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=ask, name="hub-search", daemon=True)
    worker.start()
    worker.join(metadata_timeout() * 2)  # connecting, then the answer
    if worker.is_alive():
        raise NetworkError(f"cannot reach the Hub at {endpoint()}: no answer (timed out)", hint=NETWORK_HINT)
    if failure:
        known = translate_hub_error(failure[0])
        if known is not None:
            raise known from failure[0]
        raise failure[0]
    return found


def similar(repo_id: str, n: int = 3) -> list[str]:
    """The GGUF repos whose names are closest to a repo that does not exist: searched by its
    author and by each word of its name, then ranked by likeness. [] when the Hub cannot say."""
    import difflib

    author, _, name = repo_id.partition("/")
    searches: list[dict[str, Any]] = [{"query": None, "author": author}]
    searches += [{"query": word} for word in re.split(r"[-_.\s]+", name) if len(word) >= 3][:3]
    seen: set[str] = set()
    for search in searches:
        try:
            seen.update(m.repo_id for m in search_models(search["query"], author=search.get("author"), limit=100))
        except Exception:  # a courtesy: its failure must not hide the error, nor wait on a failing Hub
            break
    by_case = {s.lower(): s for s in seen - {repo_id}}
    return [by_case[m] for m in difflib.get_close_matches(repo_id.lower(), list(by_case), n=n, cutoff=0.6)]
