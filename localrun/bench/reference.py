"""The reference's next-token distributions, kept whole on disk, and KL divergence against them.

The reference run writes, for every scored position, its log-probability of every token in the
vocabulary; later runs read them back through a numpy memmap, a block of positions at a time, and
compute KL over the whole vocabulary. Small vocabularies are stored as float32. When that would
take more than FULL_DIST_BYTES (Gemma's 262k vocabulary over the shipped text: ~2 GB), positions
are stored as llama-perplexity's `--kl-divergence-base` stores them: per position a scale and an
offset, and one uint16 per token over the 16 nats below the most likely one (half as much, and the
same rounding llama.cpp's own KLD figures carry). Either way the sum runs over every token with a
reference log-probability above -16, as llama-perplexity's does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localrun.errors import NoSpace
from localrun.hub.settings import free_disk
from localrun.text import human_bytes

FULL_DIST_BYTES = 128 * 2**20  # float32 up to this size; above it, 16 bits per token
LOG_P_FLOOR = -16.0  # llama-perplexity leaves tokens below e^-16 out of the KL sum; so do we
BLOCK = 32  # positions dequantized at once: 32 MB of float32 for a 262k vocabulary
META = "reference.npz"
LOGP = "reference-logp.npy"


def encoding_for(rows: int, n_vocab: int) -> str:
    return "float32" if rows * n_vocab * 4 <= FULL_DIST_BYTES else "uint16"


def bytes_needed(rows: int, n_vocab: int) -> int:
    """Disk space for `rows` positions over `n_vocab` tokens (plus the small per-position arrays)."""
    per_token = 4 if encoding_for(rows, n_vocab) == "float32" else 2
    return rows * n_vocab * per_token + rows * 16 + 2**20


def ensure_room(folder: Path, rows: int, n_vocab: int) -> None:
    """Raise NoSpace when `folder` cannot hold the reference distributions."""
    needed, free = bytes_needed(rows, n_vocab), free_disk(folder)
    if needed > free:
        raise NoSpace(
            f"the reference distributions for KL divergence need {human_bytes(needed)} in {folder}, "
            f"which has {human_bytes(free)} free",
            hint="point TMPDIR at a disk with room, score fewer windows (--ppl-chunks N), "
            "or measure speed only (--no-quality)",
        )


def encode_uint16(logp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of log-probabilities -> (codes, scale, offset) as llama-perplexity stores them:
    log p ~ scale * code + offset over [max - 16, max]; anything lower is code 0 (left out)."""
    top = logp.max(axis=1)
    low = np.maximum(logp.min(axis=1), top - 16.0)
    scale = ((top - low) / 65535.0).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    codes = np.rint((logp - low[:, None]) * inv[:, None])
    codes[logp <= low[:, None]] = 0
    return np.clip(codes, 0, 65535).astype(np.uint16), scale, low.astype(np.float32)


def decode_uint16(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale[:, None] + offset[:, None]


def kl_rows(ref_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(reference || candidate) per position, summed over the tokens above LOG_P_FLOOR.
    Both arguments are rows of log-probabilities over the same vocabulary."""
    kept = ref_logp > LOG_P_FLOOR
    p = np.exp(np.where(kept, ref_logp, -np.inf))
    kl = (p * np.where(kept, ref_logp - logp, 0.0)).sum(axis=1, dtype=np.float64)
    # A sum cut at the floor (or over 16-bit rounded values) can dip a hair below 0; KL cannot.
    return np.maximum(kl, 0.0)


class ReferenceWriter:
    """Written by the reference run: the tokens, then each window's scored positions in order."""

    def __init__(
        self, folder: Path, tokens: list[int], vocab: str, rows: int, n_vocab: int, encoding: str | None = None
    ):
        self.folder, self.tokens, self.vocab = folder, tokens, vocab
        self.encoding = encoding or encoding_for(rows, n_vocab)
        ensure_room(folder, rows, n_vocab)
        dtype = np.float32 if self.encoding == "float32" else np.uint16
        self.logp = np.lib.format.open_memmap(folder / LOGP, mode="w+", dtype=dtype, shape=(rows, n_vocab))
        self.scale = np.zeros(rows, dtype=np.float32)
        self.offset = np.zeros(rows, dtype=np.float32)
        self.top = np.zeros(rows, dtype=np.int32)
        self.row = 0

    def add(self, logp: np.ndarray) -> None:
        """Append rows of log-probabilities (one per scored position)."""
        for start in range(0, len(logp), BLOCK):
            block = logp[start : start + BLOCK]
            end = self.row + len(block)
            self.top[self.row : end] = block.argmax(axis=1)
            if self.encoding == "float32":
                self.logp[self.row : end] = block
            else:
                self.logp[self.row : end], self.scale[self.row : end], self.offset[self.row : end] = encode_uint16(
                    block
                )
            self.row = end

    def close(self) -> None:
        self.logp.flush()
        del self.logp
        np.savez(
            self.folder / META,
            tokens=np.asarray(self.tokens, dtype=np.int32),
            vocab=np.asarray(self.vocab),
            encoding=np.asarray(self.encoding),
            scale=self.scale,
            offset=self.offset,
            top=self.top,
        )


@dataclass
class Comparison:
    kld: np.ndarray  # per position
    same_top: np.ndarray  # per position: the candidate's most likely token is the reference's


class ReferenceReader:
    """Read by every later run: the reference's tokens, and KL against its distributions."""

    def __init__(self, folder: Path):
        meta = np.load(folder / META)
        self.tokens: list[int] = meta["tokens"].tolist()
        self.vocab = str(meta["vocab"])
        self.encoding = str(meta["encoding"])
        self.scale, self.offset, self.top = meta["scale"], meta["offset"], meta["top"]
        self.logp = np.load(folder / LOGP, mmap_mode="r")
        self.row = 0

    def compare(self, logp: np.ndarray) -> Comparison:
        """KL and top-token agreement for the next len(logp) positions, in the order written."""
        kld = np.empty(len(logp))
        for start in range(0, len(logp), BLOCK):
            rows = slice(self.row + start, self.row + min(start + BLOCK, len(logp)))
            stored = np.asarray(self.logp[rows])
            ref = stored if self.encoding == "float32" else decode_uint16(stored, self.scale[rows], self.offset[rows])
            kld[start : start + len(ref)] = kl_rows(ref, logp[start : start + BLOCK])
        same_top = logp.argmax(axis=1) == self.top[self.row : self.row + len(logp)]
        self.row += len(logp)
        return Comparison(kld, same_top)
