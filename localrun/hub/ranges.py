"""A model's GGUF header read from the Hub with HTTP Range requests: no model file is downloaded."""

from __future__ import annotations

from localrun.errors import BadModel, NotFound
from localrun.hub.errors import translate_hub_error
from localrun.hub.settings import download_timeout, endpoint, token
from localrun.model.header import HeaderInfo, interpret
from localrun.model.parse import FIRST_FETCH, Parsed, parse
from localrun.text import safe


def _remote_reader(repo_id: str, filename: str, revision: str | None, size: int | None):
    """A read(offset, n) over HTTP Range requests, and the file size the server reports."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint())
    headers = build_hf_headers(token=token(), library_name="localrun")
    state = {"size": size or None}

    def read(offset: int, n: int) -> bytes:
        end = offset + n
        if state["size"] is not None:
            end = min(end, state["size"])
            if offset >= end:
                return b""
        want = end - offset
        try:
            with get_session().stream(
                "GET", url, headers={**headers, "Range": f"bytes={offset}-{end - 1}"}, timeout=download_timeout()
            ) as r:
                if r.status_code == 416:
                    return b""
                hf_raise_for_status(r)
                total = r.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit():
                    state["size"] = int(total)
                skip = offset if r.status_code == 200 else 0  # server ignored Range: skip, then stop early
                out = bytearray()
                for chunk in r.iter_bytes():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    out += chunk
                    if len(out) >= want:
                        break
                if r.status_code == 200 and state["size"] is None:
                    length = r.headers.get("Content-Length", "")
                    state["size"] = int(length) if length.isdigit() else None
                return bytes(out[:want])
        except Exception as exc:
            translated = translate_hub_error(exc)
            if isinstance(translated, NotFound):  # name what was not found
                what = safe(filename) if isinstance(exc, hf_errors.EntryNotFoundError) else None
                translated = NotFound(
                    f"{what} not found in {repo_id}" if what else translated.message.replace("the repo", repo_id),
                    hint=translated.hint,
                )
            if translated is not None:
                raise translated from exc
            raise

    return read, state


def _parse_remote(repo_id: str, filename: str, revision: str | None, size: int | None) -> tuple[Parsed, int]:
    read, state = _remote_reader(repo_id, filename, revision, size)
    first = read(0, FIRST_FETCH)
    label = safe(filename.rsplit("/", 1)[-1])
    if first[:4] != b"GGUF":
        raise BadModel(f"{label} in {repo_id} is not a GGUF file", hint="pick another file or quant of the repo")
    total = state["size"] if state["size"] is not None else len(first)

    def cached_read(offset: int, n: int) -> bytes:
        if offset + n <= len(first):
            return first[offset : offset + n]
        return read(offset, n)

    return parse(cached_read, total, label), total


def read_remote_header(
    repo_id: str, filenames: list[str], *, revision: str | None = None, sizes: list[int] | None = None
) -> HeaderInfo:
    """The header of a model on the Hub, read with HTTP Range requests (every shard of a split)."""
    parsed = [_parse_remote(repo_id, name, revision, sizes[i] if sizes else None) for i, name in enumerate(filenames)]
    return interpret([p for p, _ in parsed], [s for _, s in parsed], safe(filenames[0].rsplit("/", 1)[-1]))
