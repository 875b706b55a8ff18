"""What a plan or a load says beside its figures, as data: a kind, the figures it is about and the
sentence it reads as. Callers pick notes by kind (the server says the context ones per slot);
none splits a sentence to find them again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NoteKind = Literal[
    "beyond_trained",  # figures: the context, the context the model was trained with
    "context_reduced",  # the planner's context (figures: it), or a load's (figures: from, to)
    "context_rounded",  # llama.cpp sized the context in steps of 256 (figures: asked, made)
    "gpu_partial",  # figures: GPU layers, all layers
    "gpu_none",  # no layer fits in VRAM
    "gpu_reduced",  # a load backed off (figures: from, to)
    "no_fit",  # not even the CPU has room
    "split",  # layers across this machine and its workers (figures: layers per place, here first)
]


@dataclass(frozen=True)
class Note:
    kind: NoteKind
    figures: tuple[int, ...]
    text: str

    def __str__(self) -> str:
        return self.text


def beyond_trained(n_ctx: int, trained: int, subject: str | None = None) -> Note | None:
    """The warning for a context past the one the model was trained with (None when it is not);
    `subject` names the context ("512 tokens per slot"), else "context N"."""
    if not 0 < trained < n_ctx:
        return None
    subject = subject or f"context {n_ctx}"
    text = f"{subject} is beyond the {trained} the model was trained with: expect worse output past that"
    return Note("beyond_trained", (n_ctx, trained), text)


def context_reduced(n_ctx: int) -> Note:
    return Note("context_reduced", (n_ctx,), f"context reduced to {n_ctx} to fit")


def gpu_partial(n_gpu: int, total: int) -> Note:
    return Note("gpu_partial", (n_gpu, total), f"{n_gpu}/{total} layers on GPU")


GPU_NONE = Note("gpu_none", (), "no layer fits in VRAM")
NO_FIT = Note("no_fit", (), "needs more memory than this machine has")
NO_FIT_SPLIT = Note("no_fit", (), "needs more memory than this machine and its workers have together")


def split(places: list[tuple[str, int]]) -> Note:
    """The plan line of a model split across workers: `plan: 12 layers here, 10 on 10.0.0.2:50052`."""
    parts = [f"{n} layer{'s' * (n != 1)} here" if where == "here" else f"{n} on {where}" for where, n in places]
    return Note("split", tuple(n for _, n in places), "plan: " + ", ".join(parts))


def load_gpu_reduced(was: int, now: int) -> Note:
    return Note("gpu_reduced", (was, now), f"GPU layers reduced from {was} to {now} to fit")


def load_context_reduced(was: int, now: int) -> Note:
    return Note("context_reduced", (was, now), f"context reduced from {was} to {now} to fit")


def context_rounded(asked: int, made: int) -> Note:
    text = f"context {asked} became {made}: llama.cpp sizes it in steps of 256 tokens"
    return Note("context_rounded", (asked, made), text)
