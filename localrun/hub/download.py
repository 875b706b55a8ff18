"""Downloads through huggingface_hub into the standard cache: resumable, retried, sha256-verified.

huggingface_hub writes `<blob>.incomplete` and renames it under its lock; an interrupted download
keeps the partial file and the next one resumes it with a Range request. Every blob is marked
unverified before its download starts and cleared once its sha256 matched (hub/integrity.py), so
a pull killed between the rename and the end of the check leaves a file that is checked again
before it is kept or loaded. Progress reaches the caller through a DownloadProgress (the command
draws it), never through printing here.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from localrun.errors import BadModel, Interrupted, NetworkError, NoSpace
from localrun.hub import integrity
from localrun.hub.listing import RepoListing, RepoQuant
from localrun.hub.retry import RETRY_AFTER_LIMIT, check_reachable, duration, retry_for, too_long
from localrun.hub.settings import (
    cache_dir,
    endpoint,
    free_disk,
    metadata_timeout,
    offline,
    quiet_hub_logs,
    repo_folder,
    token,
)
from localrun.text import human_bytes, plural, safe

DOWNLOAD_ATTEMPTS = 3  # within one pull; a later pull resumes from the .incomplete file anyway
RETRY_DELAY = 0.5  # seconds, times the attempt number


class DownloadProgress(Protocol):
    """What a download tells whoever shows it: messages, then bytes done out of the total."""

    def message(self, text: str, *, warning: bool = False) -> None: ...
    def begin(self, label: str, total: int, done: int) -> None: ...
    def update(self, done: int, description: str) -> None: ...
    def end(self) -> None: ...


class SilentProgress:
    def message(self, text: str, *, warning: bool = False) -> None:
        pass

    def begin(self, label: str, total: int, done: int) -> None:
        pass

    def update(self, done: int, description: str) -> None:
        pass

    def end(self) -> None:
        pass


@dataclass
class _FileState:
    name: str
    size: int
    sha256: str | None
    blob: Path | None  # where huggingface_hub keeps it: LFS blobs are named by their sha256
    cached: Path | None  # its snapshot file, when it is in the cache already
    complete: bool  # in the cache already: never downloaded again
    partial: int  # bytes kept in <blob>.incomplete by an interrupted download

    def kept(self) -> int:
        """Bytes in <blob>.incomplete now: what the next attempt resumes from."""
        incomplete = self.blob.with_name(self.blob.name + ".incomplete") if self.blob else None
        return incomplete.stat().st_size if incomplete and incomplete.exists() else 0


def _file_states(listing: RepoListing, quant: RepoQuant) -> list[_FileState]:
    from huggingface_hub import try_to_load_from_cache

    blobs = repo_folder(listing.repo_id) / "blobs"
    states = []
    for name in quant.files:
        sha, size = quant.sha256.get(name), quant.sizes.get(name, 0)
        blob = blobs / sha if sha else None
        cached = try_to_load_from_cache(listing.repo_id, name, cache_dir=cache_dir(), revision=listing.commit)
        complete = isinstance(cached, str) or bool(blob and blob.exists())
        state = _FileState(name, size, sha, blob, Path(cached) if isinstance(cached, str) else None, complete, 0)
        state.partial = 0 if complete else min(state.kept(), size)
        states.append(state)
    return states


def _recheck_interrupted(states: list[_FileState], progress: DownloadProgress) -> None:
    """A file in the cache whose sha256 check a pull did not finish is checked now; a corrupt one
    is deleted, to be downloaded again."""
    present = {s.blob: s for s in states if s.complete and s.blob is not None and s.sha256}
    for blob in integrity.unverified(present):
        state = present[blob]
        progress.message(f"checking {safe(state.name)}: a pull stopped before its sha256 was checked")
        if not integrity.recheck(blob, [state.cached] if state.cached else []):
            progress.message(f"{safe(state.name)} was corrupt: deleted, downloading it again", warning=True)
            state.complete, state.cached, state.partial = False, None, 0


def download(
    listing: RepoListing,
    quant: RepoQuant,
    progress: DownloadProgress | None = None,
    *,
    free_space: Callable[[Path], int] = free_disk,
) -> list[Path]:
    """Every file of `quant` into the HF cache (resuming partial files), sha256-verified; the paths
    to load, in shard order. `free_space(path) -> bytes` is the disk check, a parameter for tests."""
    progress = progress or SilentProgress()
    quiet_hub_logs()
    states = _file_states(listing, quant)
    _recheck_interrupted(states, progress)
    todo = [s for s in states if not s.complete]
    remaining = sum(s.size - s.partial for s in todo)
    if todo and not offline():
        free = free_space(cache_dir())
        if remaining > free:
            raise NoSpace(
                f"not enough disk space: {human_bytes(remaining)} to download, {human_bytes(free)} free "
                f"in {cache_dir()}",
                hint="free some space, or set HF_HUB_CACHE to a bigger disk",
            )
    if todo:
        done = sum(s.size for s in states if s.complete) + sum(s.partial for s in todo)
        resumed = f", resuming from {human_bytes(done)}" if done else ""
        progress.message(
            f"downloading {safe(quant.label)}: {plural(len(todo), 'file')}, {human_bytes(remaining)}{resumed}"
        )
    counter = _ByteCounter(progress, safe(quant.label))
    paths: list[Path] = []
    marking = True  # until a mark cannot be written (said once)
    progress.begin(counter.label, quant.size, sum(s.size if s.complete else s.partial for s in states))
    try:
        for i, state in enumerate(states, 1):
            counter.next_file(state, f"{i}/{len(states)}" if len(states) > 1 else "")
            if marking and not state.complete and state.blob is not None:
                marking = _mark(state.blob, progress)
            try:
                path = _fetch(listing, state, progress, counter)
            except KeyboardInterrupt:
                raise Interrupted(
                    f"interrupted: the download of {safe(quant.label)} stopped",
                    hint="run the same command again: it resumes where it stopped",
                ) from None
            if not state.complete and state.sha256:
                progress.update(counter.total, f"verifying {safe(state.name.rsplit('/', 1)[-1])}")
                _verify(path, state)
            paths.append(path)
        progress.update(counter.total, counter.label)
    finally:
        progress.end()
    if todo:
        _record_revision(listing, states[0])
    return paths


def _mark(blob: Path, progress: DownloadProgress) -> bool:
    """Mark `blob` unverified until its check passes; False, said once, when that cannot be written."""
    try:
        integrity.mark(blob)
    except OSError as exc:
        progress.message(
            f"cannot record sha256 checks in $LOCALRUN_HOME ({exc.strerror or exc}): "
            "a pull stopped while checking a file would go unnoticed",
            warning=True,
        )
        return False
    return True


def _record_revision(listing: RepoListing, state: _FileState) -> None:
    """Let the cache know which commit `main` (or the tag asked for) is, as `hf download` does.

    Files are fetched pinned to the listed commit, so every shard comes from one commit; such
    downloads record no branch. One more call by name (a HEAD request, nothing downloaded)
    records it through huggingface_hub itself.
    """
    from huggingface_hub import hf_hub_download

    if listing.revision == listing.commit or offline():
        return
    try:
        check_reachable(listing.repo_id, state.name, listing.revision)  # else hf_hub_download retries for minutes
        hf_hub_download(
            listing.repo_id,
            state.name,
            revision=listing.revision,
            cache_dir=cache_dir(),
            endpoint=endpoint(),
            token=token(),
            etag_timeout=metadata_timeout(),
        )
    except Exception:  # the files are in place; a missing ref only hides the branch name in `list`
        pass


def _fetch(listing: RepoListing, state: _FileState, progress: DownloadProgress, counter: _ByteCounter) -> Path:
    from huggingface_hub import hf_hub_download

    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            if not state.complete and not offline():
                check_reachable(listing.repo_id, state.name, listing.commit)
            return Path(
                hf_hub_download(
                    listing.repo_id,
                    state.name,
                    revision=listing.commit,
                    cache_dir=cache_dir(),
                    endpoint=endpoint(),
                    token=token(),
                    local_files_only=offline(),
                    etag_timeout=metadata_timeout(),
                    tqdm_class=counter.tqdm_class,
                )
            )
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # huggingface_hub names no path
                raise _disk_full(state) from exc
            retry = retry_for(exc)
            if retry is None:
                raise
            if retry.wait is not None and retry.wait > RETRY_AFTER_LIMIT:
                raise too_long(retry) from exc
            if attempt == DOWNLOAD_ATTEMPTS:
                raise NetworkError(
                    f"download of {safe(state.name)} failed: {retry.reason}, {DOWNLOAD_ATTEMPTS} attempts",
                    hint="run the same command again: it resumes where it stopped",
                ) from exc
            if retry.wait is not None:
                delay, then = retry.wait, f"waiting {duration(retry.wait)}"
            else:
                delay, then = RETRY_DELAY * attempt, "resuming" if state.kept() else "trying again"
            progress.message(
                f"{safe(state.name)}: {retry.reason}; {then} (attempt {attempt + 1} of {DOWNLOAD_ATTEMPTS})",
                warning=True,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _disk_full(state: _FileState) -> NoSpace:
    return NoSpace(
        f"no space left on device in {cache_dir()}: the download of {safe(state.name)} stopped, "
        f"{human_bytes(state.kept())} kept",
        hint="free some space (or set HF_HUB_CACHE to a bigger disk), then run the same command "
        "again: it resumes where it stopped",
    )


def _verify(path: Path, state: _FileState) -> None:
    """sha256 against the Hub's LFS metadata: a match clears the blob's mark; a mismatching file is
    deleted with its mark, never left to load."""
    blob = path.resolve()
    got = integrity.sha256_of(blob)
    if got == state.sha256:
        integrity.clear(blob)
        return
    integrity.discard(blob, [path])
    raise BadModel(
        f"{safe(state.name)} is corrupt: its sha256 {got[:12]}… is not the Hub's {(state.sha256 or '')[:12]}…; "
        "the file was deleted",
        hint="pull again; if it repeats, the repo or a proxy serves a bad file",
    )


class _ByteCounter:
    """Counts bytes over every file of a download, fed by huggingface_hub through its `tqdm_class`
    hook: it restarts a file at `initial` bytes when it resumes, so each file's share is rebased."""

    def __init__(self, progress: DownloadProgress, label: str):
        self.progress, self.label = progress, label
        self.counted: dict[str, int] = {}  # bytes each file has contributed
        self.file: str | None = None
        self.description = label
        owner = self

        class Bar(_TqdmAdapter):
            counter = owner

        self.tqdm_class = Bar

    @property
    def total(self) -> int:
        return sum(self.counted.values())

    def next_file(self, state: _FileState, position: str = "") -> None:
        """The next file starts; `position` ("2/3") tells the shards of a split apart."""
        self.file = state.name
        self.counted[state.name] = state.size if state.complete else state.partial
        self.description = f"{self.label} {position}".strip()
        self.progress.update(self.total, self.description)

    def rebase(self, initial: int) -> None:
        """huggingface_hub starts (or restarts) the current file at `initial` bytes."""
        if self.file is not None:
            self.counted[self.file] = initial
        self.progress.update(self.total, self.description)

    def advance(self, n: int) -> None:
        if self.file is not None and n:
            self.counted[self.file] = self.counted.get(self.file, 0) + n
            self.progress.update(self.total, self.description)


class _TqdmAdapter:
    """The part of tqdm's interface huggingface_hub's downloads use."""

    counter: _ByteCounter

    def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any):
        self.total, self.n = total, initial
        self.counter.rebase(initial)

    def update(self, n: int | None = 1) -> None:
        self.n += n or 0
        self.counter.advance(n or 0)

    def close(self) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _TqdmAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
