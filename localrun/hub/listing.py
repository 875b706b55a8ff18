"""A repo's GGUF files, grouped one entry per quantization (a split is one), best quality first."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from localrun.errors import AccessDenied, BadModel, NetworkError, NotFound, UsageError
from localrun.hub.settings import any_token, api, metadata_timeout, offline
from localrun.model import quants
from localrun.model.files import SHARD_RE
from localrun.model.refs import ModelRef
from localrun.text import safe

# Files that are GGUF but not a model to run: vision projectors, importance matrices, draft models.
_NOT_A_MODEL_RE = re.compile(r"(?<![a-z0-9])(mmproj|imatrix|draft)(?![a-z])", re.IGNORECASE)


@dataclass
class RepoQuant:
    """One quantization of the model in a repo: a single file, or every shard of a split in order."""

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
class Grouped:
    quants: list[RepoQuant]  # best quality first
    mmproj: list[str]  # vision projectors: never a model to run
    incomplete: list[str]  # shards of splits whose other shards are missing
    skipped: list[str]  # those splits, described
    other: list[str] = field(default_factory=list)  # GGUFs that are no model: imatrix, draft


@dataclass
class RepoListing:
    repo_id: str
    commit: str
    quants: list[RepoQuant]  # best quality first
    mmproj: list[str]  # vision projectors, for later; never candidates
    skipped: list[str] = field(default_factory=list)  # splits with shards missing
    revision: str = "main"  # the branch or tag asked for; `commit` is what it pointed to

    def select(self, tag: str | None = None, filename: str | None = None) -> int:
        """The index of the quant a file name or a quant tag names; NotFound lists what there is."""
        return select(self.repo_id, self.quants, tag=tag, filename=filename, mmproj=self.mmproj)


def select(
    repo_id: str,
    found: list[RepoQuant],
    *,
    tag: str | None = None,
    filename: str | None = None,
    mmproj: list[str] | None = None,
) -> int:
    if filename:
        wanted = filename.strip("/")
        for i, quant in enumerate(found):
            if wanted in quant.files:
                return i
        if wanted in (mmproj or []):
            raise UsageError(  # it is there: asking for it is the mistake
                f"{safe(filename)} is a vision projector (mmproj), not a model to run",
                hint="name one of the repo's models: " + ", ".join(safe(q.files[0]) for q in found),
            )
        names = ", ".join(safe(q.files[0]) for q in found)
        raise NotFound(f"no GGUF model file {safe(filename)} in {repo_id}", hint=f"files there: {names}")
    if tag:
        for i, quant in enumerate(found):  # best first; the first match wins, as llama.cpp's -hf
            if quants.tag_names(tag, quant.quant, quant.files[0]):
                return i
        raise NotFound(
            f"no {safe(tag)} quantization in {repo_id}", hint="available: " + ", ".join(safe(q.label) for q in found)
        )
    raise ValueError("select() needs a tag or a file name")


def unsafe_name(name: str) -> bool:
    """A repo path that could leave the cache folder if it were joined to a local path."""
    return (
        not name
        or "\\" in name
        or "\0" in name
        or name.startswith("/")
        or bool(re.match(r"^[A-Za-z]:", name))
        or any(part in ("", ".", "..") for part in name.split("/"))
    )


def group_files(files: dict[str, tuple[int, str | None]]) -> Grouped:
    """GGUF files (repo path -> (size, sha256)) grouped per quant, best first, and what is not a
    model. Serves both a Hub listing and a scan of a cached snapshot."""
    found: list[RepoQuant] = []
    splits: dict[tuple[str, int], dict[int, str]] = {}
    mmproj: list[str] = []
    other: list[str] = []
    for name in sorted(files):
        if not name.lower().endswith(".gguf"):
            continue
        kind = _NOT_A_MODEL_RE.search(name)
        if kind:
            (mmproj if kind.group(1).lower() == "mmproj" else other).append(name)
            continue
        if m := SHARD_RE.match(name):
            splits.setdefault((m["stem"], int(m["total"])), {})[int(m["index"])] = name
        else:
            found.append(_quant([name], files))
    incomplete: list[str] = []
    skipped: list[str] = []
    for (stem, total), shards in splits.items():
        if sorted(shards) == list(range(1, total + 1)):
            found.append(_quant([shards[i] for i in sorted(shards)], files))
        else:
            incomplete += [shards[i] for i in sorted(shards)]
            skipped.append(f"{safe(stem)}-*-of-{total:05d}.gguf ({len(shards)} of {total} shards)")
    found.sort(key=lambda q: (quants.sort_key(q.quant, q.size), q.files[0].count("/"), q.files[0]))
    return Grouped(found, mmproj, incomplete, skipped, other)


def _quant(names: list[str], files: dict[str, tuple[int, str | None]]) -> RepoQuant:
    first = names[0]
    # The quant is in the file name; big splits sometimes carry it only in their folder's name.
    quant = quants.quant_from_filename(first) or next(
        (q for part in reversed(first.split("/")[:-1]) if (q := quants.quant_from_filename(part))), None
    )
    return RepoQuant(
        quant,
        names,
        sum(files[n][0] for n in names),
        {n: sha for n in names if (sha := files[n][1])},
        {n: files[n][0] for n in names},
    )


class RepoNotFound(NotFound):
    """The repo does not exist, or is private to others: not for good (a token may reach it)."""


def _missing(repo_id: str) -> NotFound:
    """A repo that does not exist, with the closest names the Hub's search finds."""
    from localrun.hub.search import similar

    close = similar(repo_id)
    hint = "check the name; for a private repo set HF_TOKEN"
    if close:
        hint = f"did you mean {' or '.join(close)}? (a private repo needs HF_TOKEN; `localrun search WORDS` finds more)"
    return RepoNotFound(f"repository {repo_id} not found (or private)", hint=hint)


def list_quants(ref: ModelRef, *, suggest: bool = True) -> RepoListing:
    """The repo's GGUF files at one commit, grouped per quant. Rejects a listing with unsafe names.
    A repo that does not exist is a NotFound naming the closest repos (`suggest`: a search more;
    a search that lists repos asks for none)."""
    assert ref.repo_id is not None
    if offline():
        raise NetworkError(
            f"offline (HF_HUB_OFFLINE=1): cannot list the files of {ref.repo_id}",
            hint="unset HF_HUB_OFFLINE, or use a model that is already pulled",
        )
    try:
        info = api().model_info(ref.repo_id, revision=ref.revision, files_metadata=True, timeout=metadata_timeout())
    except Exception as exc:
        from huggingface_hub import errors as hf

        if isinstance(exc, hf.RepositoryNotFoundError) and not isinstance(exc, hf.GatedRepoError):
            if not suggest:
                raise RepoNotFound(f"repository {ref.repo_id} not found (or private)") from exc
            raise _missing(ref.repo_id) from exc
        raise
    if info.gated and not any_token():
        raise AccessDenied(
            f"{ref.repo_id} is gated: accept its licence on the model page and authenticate",
            hint="accept the licence at https://huggingface.co/"
            + ref.repo_id
            + ", then set HF_TOKEN (or run `hf auth login`)",
        )
    siblings = info.siblings or []
    hostile = [s.rfilename for s in siblings if unsafe_name(s.rfilename)]
    if hostile:
        raise BadModel(
            f"{ref.repo_id} lists an unsafe file name {safe(repr(hostile[0]))}; nothing was downloaded",
            hint="a repo path must not be absolute or contain '..' or backslashes",
        )
    files = {
        s.rfilename: (
            int(s.size if s.size is not None else s.lfs.size if s.lfs else 0),
            s.lfs.sha256 if s.lfs else None,
        )
        for s in siblings
    }
    grouped = group_files(files)
    if not grouped.quants:
        raise NotFound(
            f"{ref.repo_id} has no GGUF model files",
            hint="localrun runs GGUF models: look for a repo named like ...-GGUF",
        )
    return RepoListing(
        ref.repo_id,
        info.sha or ref.revision or "main",
        grouped.quants,
        grouped.mmproj,
        grouped.skipped,
        ref.revision or "main",
    )
