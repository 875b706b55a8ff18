"""Talking to the Hugging Face Hub through huggingface_hub: errors, listing, headers, downloads."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from localrun import quants
from localrun.gguf_info import SHARD_RE
from localrun.errors import AccessDenied, BadModel, Interrupted, LocalrunError, NetworkError, NoSpace, NotFound

if TYPE_CHECKING:
    from localrun.output import Output
    from localrun.refs import ModelRef

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

    # huggingface_hub parses the repo from the request URL, query string included (`?blobs=true`).
    repo = (getattr(exc, "repo_id", None) or "the repo").split("?")[0]
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


# -- listing: a repo's GGUF files, one candidate per quant ----------------------------------------
# Files that are GGUF but not a model to run: vision projectors, importance matrices, draft models.
_NOT_A_MODEL_RE = re.compile(r"(?<![a-z0-9])(mmproj|imatrix|draft)(?![a-z])", re.IGNORECASE)


@dataclass
class Candidate:
    """One quantization of the model: a single file, or every shard of a split in shard order."""

    quant: str | None
    files: list[str]
    size: int
    sha256: dict[str, str]  # file -> LFS sha256
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes

    @property
    def label(self) -> str:
        """What names it after `repo:`: the quant, else the file name."""
        return self.quant or self.files[0]

    def to_dict(self) -> dict:
        return {"quant": self.quant, "files": self.files, "size": self.size}


@dataclass
class RepoListing:
    repo_id: str
    commit: str
    candidates: list[Candidate]  # best quality first
    mmproj: list[str]  # vision projectors, for later; never candidates
    skipped: list[str] = field(default_factory=list)  # splits with shards missing
    revision: str = "main"  # the branch or tag asked for; `commit` is what it pointed to

    def select(self, tag: str | None = None, filename: str | None = None) -> int:
        """The index of the candidate a file name or a quant tag names; NotFound lists what there is."""
        return select(self.repo_id, self.candidates, tag=tag, filename=filename)


def select(repo_id: str, candidates: list[Candidate], *, tag: str | None = None,
           filename: str | None = None) -> int:
    if filename:
        wanted = filename.strip("/")
        for i, cand in enumerate(candidates):
            if wanted in cand.files:
                return i
        names = ", ".join(c.files[0] for c in candidates)
        raise NotFound(f"no GGUF model file {filename} in {repo_id}", hint=f"files there: {names}")
    if tag:
        for i, cand in enumerate(candidates):  # best first; the first match wins, as llama.cpp's -hf
            if (cand.quant or "").upper() == tag.upper() or any(
                    quants.matches_tag(part, tag) for part in cand.files[0].split("/")):
                return i
        raise NotFound(f"no {tag} quantization in {repo_id}",
                       hint="available: " + ", ".join(c.label for c in candidates))
    raise ValueError("select() needs a tag or a file name")


def unsafe_name(name: str) -> bool:
    """A repo path that could leave the cache folder if it were joined to a local path."""
    return (not name or "\\" in name or "\0" in name or name.startswith("/") or bool(re.match(r"^[A-Za-z]:", name))
            or any(part in ("", ".", "..") for part in name.split("/")))


def group_candidates(files: dict[str, tuple[int, str | None]]) -> tuple[list[Candidate], list[str], list[str]]:
    """GGUF files (repo path -> (size, sha256)) as candidates, best first, plus the mmproj files and
    what was skipped. Serves both a Hub listing and a scan of a cached snapshot."""
    candidates: list[Candidate] = []
    splits: dict[tuple[str, int], dict[int, str]] = {}
    mmproj: list[str] = []
    skipped: list[str] = []
    for name in sorted(files):
        if not name.lower().endswith(".gguf"):
            continue
        kind = _NOT_A_MODEL_RE.search(name)
        if kind:
            if kind.group(1).lower() == "mmproj":
                mmproj.append(name)
            continue
        if m := SHARD_RE.match(name):
            splits.setdefault((m["stem"], int(m["total"])), {})[int(m["index"])] = name
        else:
            candidates.append(_candidate([name], files))
    for (stem, total), shards in splits.items():
        if sorted(shards) == list(range(1, total + 1)):
            candidates.append(_candidate([shards[i] for i in sorted(shards)], files))
        else:
            skipped.append(f"{stem}-*-of-{total:05d}.gguf ({len(shards)} of {total} shards)")
    candidates.sort(key=lambda c: (quants.sort_key(c.quant, c.size), c.files[0].count("/"), c.files[0]))
    return candidates, mmproj, skipped


def _candidate(names: list[str], files: dict[str, tuple[int, str | None]]) -> Candidate:
    first = names[0]
    # The quant is in the file name; big splits sometimes carry it only in their folder's name.
    quant = quants.quant_from_filename(first) or next(
        (q for part in reversed(first.split("/")[:-1]) if (q := quants.quant_from_filename(part))), None)
    return Candidate(quant, names, sum(files[n][0] for n in names),
                     {n: sha for n in names if (sha := files[n][1])}, {n: files[n][0] for n in names})


def list_candidates(ref: "ModelRef") -> RepoListing:
    """The repo's GGUF files at one commit, grouped per quant. Rejects a listing with unsafe names."""
    assert ref.repo_id is not None
    if offline():
        raise NetworkError(f"offline (HF_HUB_OFFLINE=1): cannot list the files of {ref.repo_id}",
                           hint="unset HF_HUB_OFFLINE, or use a model that is already pulled")
    info = api().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    if info.gated and not _any_token():
        raise AccessDenied(f"{ref.repo_id} is gated: accept its licence on the model page and authenticate",
                           hint="accept the licence at https://huggingface.co/" + ref.repo_id
                           + ", then set HF_TOKEN (or run `hf auth login`)")
    siblings = info.siblings or []
    hostile = [s.rfilename for s in siblings if unsafe_name(s.rfilename)]
    if hostile:
        raise BadModel(f"{ref.repo_id} lists an unsafe file name {hostile[0]!r}; nothing was downloaded",
                       hint="a repo path must not be absolute or contain '..' or backslashes")
    files = {s.rfilename: (int(s.size if s.size is not None else s.lfs.size if s.lfs else 0),
                           s.lfs.sha256 if s.lfs else None) for s in siblings}
    candidates, mmproj, skipped = group_candidates(files)
    if not candidates:
        raise NotFound(f"{ref.repo_id} has no GGUF model files",
                       hint="localrun runs GGUF models: look for a repo named like ...-GGUF")
    return RepoListing(ref.repo_id, info.sha or ref.revision or "main", candidates, mmproj, skipped,
                       ref.revision or "main")


def _any_token() -> bool:
    from huggingface_hub import get_token

    return bool(token() or get_token())


# -- download: through huggingface_hub into the standard cache, verified -------------------------
DOWNLOAD_ATTEMPTS = 3  # within one pull; a later pull resumes from the .incomplete file anyway
RETRY_DELAY = 0.5  # seconds, times the attempt number


def repo_folder(repo_id: str) -> Path:
    """The repo's folder in the standard cache layout."""
    return cache_dir() / ("models--" + repo_id.replace("/", "--"))


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    for existing in (path, *path.parents):
        if existing.exists():
            return shutil.disk_usage(existing).free
    return shutil.disk_usage(Path.cwd()).free


@dataclass
class _FileState:
    name: str
    size: int
    sha256: str | None
    complete: bool  # in the cache already: never downloaded again
    partial: int  # bytes kept in <blob>.incomplete by an interrupted download


def _file_states(listing: RepoListing, cand: Candidate) -> list[_FileState]:
    folder = repo_folder(listing.repo_id)
    states = []
    for name in cand.files:
        sha, size = cand.sha256.get(name), cand.sizes.get(name, 0)
        blob = folder / "blobs" / sha if sha else None  # LFS blobs are named by their sha256
        complete = (folder / "snapshots" / listing.commit / name).exists() or bool(blob and blob.exists())
        partial = 0
        if blob is not None and not complete:
            incomplete = blob.with_name(blob.name + ".incomplete")
            partial = min(incomplete.stat().st_size, size) if incomplete.exists() else 0
        states.append(_FileState(name, size, sha, complete, partial))
    return states


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _transient(exc: BaseException) -> str | None:
    """Why a download attempt failed, when trying again may help; None when it will not."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, httpx.TransportError):
        return f"connection lost ({type(exc).__name__})"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status is not None and (status >= 500 or status == 429):
            return f"the Hub answered HTTP {status}"
    return None


def download(listing: RepoListing, cand: Candidate, out: "Output", *,
             free_space: Callable[[Path], int] = free_disk) -> list[Path]:
    """Every file of `cand` into the HF cache (resuming partial files), sha256-verified; the paths
    to load, in shard order. `free_space(path) -> bytes` is the disk check, a parameter for tests."""
    states = _file_states(listing, cand)
    todo = [s for s in states if not s.complete]
    remaining = sum(s.size - s.partial for s in todo)
    if todo and not offline():
        free = free_space(cache_dir())
        if remaining > free:
            raise NoSpace(f"not enough disk space: {_human(remaining)} to download, {_human(free)} free "
                          f"in {cache_dir()}", hint="free some space, or set HF_HUB_CACHE to a bigger disk")
    if todo:
        done = sum(s.size for s in states if s.complete) + sum(s.partial for s in todo)
        resumed = f", resuming from {_human(done)}" if done else ""
        out.info(f"downloading {cand.label}: {len(todo)} file{'s' * (len(todo) > 1)}, "
                 f"{_human(remaining)}{resumed}")
    paths: list[Path] = []
    with _DownloadProgress(out, cand.label, total=cand.size,
                           done=sum(s.size if s.complete else s.partial for s in states)) as progress:
        for i, state in enumerate(states, 1):
            progress.current(state, f"{i}/{len(states)}" if len(states) > 1 else "")
            try:
                path = _fetch(listing, state, out, progress)
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted: the download of {cand.label} stopped",
                                  hint="run the same command again: it resumes where it stopped") from None
            if not state.complete and state.sha256:
                progress.describe(f"verifying {state.name.rsplit('/', 1)[-1]}")
                _verify(path, state)
            paths.append(path)
    if todo:
        _record_revision(listing, states[0])
    return paths


def _record_revision(listing: RepoListing, state: "_FileState") -> None:
    """Let the cache know which commit `main` (or the tag asked for) is, as `hf download` does.

    Files are fetched pinned to the listed commit, so every shard comes from one commit; such
    downloads record no branch. One more call by name (a HEAD request, nothing downloaded)
    records it through huggingface_hub itself.
    """
    from huggingface_hub import hf_hub_download

    if listing.revision == listing.commit or offline():
        return
    try:
        hf_hub_download(listing.repo_id, state.name, revision=listing.revision, cache_dir=cache_dir(),
                        endpoint=endpoint(), token=token())
    except Exception:  # the files are in place; a missing ref only hides the branch name in `list`
        pass


def _fetch(listing: RepoListing, state: _FileState, out: "Output", progress: "_DownloadProgress") -> Path:
    from huggingface_hub import hf_hub_download

    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return Path(hf_hub_download(
                listing.repo_id, state.name, revision=listing.commit, cache_dir=cache_dir(),
                endpoint=endpoint(), token=token(), local_files_only=offline(), tqdm_class=progress.tqdm_class,
            ))
        except Exception as exc:
            reason = _transient(exc)
            if reason is None:
                raise
            if attempt == DOWNLOAD_ATTEMPTS:
                raise NetworkError(f"download of {state.name} failed: {reason}, {DOWNLOAD_ATTEMPTS} attempts",
                                   hint="run the same command again: it resumes where it stopped") from exc
            out.warn(f"{state.name}: {reason}; resuming (attempt {attempt + 1} of {DOWNLOAD_ATTEMPTS})")
            time.sleep(RETRY_DELAY * attempt)
    raise AssertionError("unreachable")


def _verify(path: Path, state: _FileState) -> None:
    """sha256 against the Hub's LFS metadata; a mismatching file is deleted, never left to load."""
    got = _sha256(path)
    if got != state.sha256:
        blob = path.resolve()
        for victim in {blob, path}:
            victim.unlink(missing_ok=True)
        raise BadModel(f"{state.name} is corrupt: its sha256 {got[:12]}… is not the Hub's {state.sha256[:12]}…; "
                       "the file was deleted", hint="pull again; if it repeats, the repo or a proxy serves a bad file")


def _human(n: int) -> str:
    from localrun.output import human_bytes

    return human_bytes(n)


class _DownloadProgress:
    """One rich progress bar (size, speed, ETA) over every file of a download, driven by
    huggingface_hub through its `tqdm_class` hook. Quiet when stderr is not a terminal."""

    def __init__(self, out: "Output", label: str, *, total: int, done: int):
        self.out, self.label, self.total, self.done = out, label, total, done
        self.counted: dict[str, int] = {}  # bytes each file has contributed, to rebase on resume
        self.file: str | None = None
        self._progress: Any = None
        self._task: Any = None
        owner = self

        class Bar(_TqdmAdapter):
            progress = owner

        self.tqdm_class = Bar

    def __enter__(self) -> "_DownloadProgress":
        if self.out.interactive and self.done < self.total:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                TextColumn("{task.fields[speed]}"), TimeRemainingColumn(compact=True, elapsed_when_finished=True),
                console=self.out.err,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.total, completed=self.done, speed="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self.describe(self.label)
            self._progress.stop()

    def current(self, state: _FileState, position: str = "") -> None:
        """The next file starts; `position` ("2/3") tells the shards of a split apart."""
        self.file = state.name
        self.counted[state.name] = state.size if state.complete else state.partial
        self.describe(f"{self.label} {position}".strip())

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def rebase(self, initial: int) -> None:
        """huggingface_hub starts (or restarts) the current file at `initial` bytes."""
        self.advance(initial - self.counted.get(self.file or "", 0))

    def advance(self, n: int) -> None:
        if self.file is not None:
            self.counted[self.file] = self.counted.get(self.file, 0) + n
        if self._progress is not None and n:
            self._progress.advance(self._task, n)
            speed = self._progress.tasks[0].speed  # in the same binary units as the sizes
            self._progress.update(self._task, speed=f"{_human(int(speed))}/s" if speed else "")


class _TqdmAdapter:
    """The part of tqdm's interface huggingface_hub's downloads use."""

    progress: _DownloadProgress

    def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any):
        self.total, self.n = total, initial
        self.progress.rebase(initial)

    def update(self, n: int | None = 1) -> None:
        self.n += n or 0
        self.progress.advance(n or 0)

    def close(self) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> "_TqdmAdapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
