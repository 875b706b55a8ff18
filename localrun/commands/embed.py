"""`localrun embed MODEL`: each line of stdin's text to a vector, as JSON Lines or a numpy .npy."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localrun.commands.loading import open_embedder
from localrun.errors import UsageError
from localrun.inference.embedding import normalized
from localrun.inference.opening import EngineConfig
from localrun.output import Output
from localrun.text import plural, safe

FORMATS = ("jsonl", "npy")


@dataclass
class Embedded:
    """The vectors of the inputs, one row each, and what it took."""

    vectors: np.ndarray  # (inputs, dimensions) float32
    n_tokens: list[int]  # per input
    truncated: list[int]  # the inputs cut to the context
    pooling: str  # how the vectors were pooled, and whence that choice
    seconds: float


def embed(
    reference: str,
    texts: list[str],
    cfg: EngineConfig,
    out: Output,
    *,
    max_tokens: int,
    normalize: bool = True,
    truncate: bool = False,
) -> Embedded:
    """Load the model for embeddings and embed every text (unit length with `normalize`)."""
    if not texts:
        raise UsageError(
            "no input: give the texts on stdin, one per line", hint="echo 'some text' | localrun embed MODEL"
        )
    embedder = open_embedder(reference, cfg, max_tokens, out)
    try:
        started = time.perf_counter()
        found = embedder.embed(texts, truncate=truncate)
        seconds = time.perf_counter() - started
        pooling = embedder.describe_pooling()
    finally:
        embedder.close()
    rows = [normalized(e.vector) if normalize else e.vector for e in found]
    vectors = np.stack(rows).astype(np.float32, copy=False)
    cut = [i for i, e in enumerate(found) if e.truncated]
    return Embedded(vectors, [e.n_tokens for e in found], cut, pooling, seconds)


def check_output(output: Path | None) -> None:
    """Refuse, before any work, a file the vectors could not be written to."""
    if output is None:
        return
    if output.is_dir():
        raise UsageError(f"-o {safe(str(output))} is a folder", hint="name a file in it")
    if not output.parent.is_dir():
        raise UsageError(f"-o {safe(str(output))}: there is no folder {safe(str(output.parent))}")


def show_embedded(out: Output, result: Embedded, fmt: str, output: Path | None) -> None:
    """The vectors on stdout (or in `output`): JSON Lines {"index", "embedding"}, or a .npy array;
    what was done on stderr."""
    if output is not None:
        try:
            if fmt == "npy":
                np.save(output, result.vectors, allow_pickle=False)
            else:
                with output.open("w", encoding="utf-8") as file:
                    file.writelines(_json_lines(result.vectors))
        except OSError as exc:
            raise UsageError(f"cannot write {safe(str(output))}: {exc.strerror or exc}") from None
    elif fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, result.vectors)
        out.binary(buffer.getvalue())
    else:
        for line in _json_lines(result.vectors):
            out.text(line)
    if result.truncated:
        shown = ", ".join(map(str, result.truncated[:10])) + (" ..." if len(result.truncated) > 10 else "")
        out.warn(f"{plural(len(result.truncated), 'input')} cut to the context: {shown}")
    n, dims = result.vectors.shape
    out.info(
        f"{plural(n, 'input')} ({plural(sum(result.n_tokens), 'token')}) to {dims} dimensions in "
        f"{result.seconds:.2f} s; {result.pooling}"
    )


def _json_lines(vectors: np.ndarray):
    for i, row in enumerate(vectors):
        yield json.dumps({"index": i, "embedding": row.tolist()}) + "\n"
