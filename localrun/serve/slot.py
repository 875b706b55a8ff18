"""One parallel slot: a sequence of the shared KV cache (its id is the slot's), what it holds, and
the reply it is generating -- sampled with its own chain, decoded to text across token
boundaries, stopped at stop strings that never leak, as Engine.generate does for one sequence."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from localrun.inference.engine import Stats
from localrun.inference.runtime import common_prefix
from localrun.inference.stops import StopMatcher

if TYPE_CHECKING:
    from localrun.inference.runtime import LlamaContext, LlamaModel
    from localrun.inference.sampler import Sampler
    from localrun.serve.errors import ApiError


@dataclass
class TokenLogprob:
    """A sampled token's log-probability and the most likely alternatives, from the raw logits."""

    piece: bytes
    logprob: float
    top: list[tuple[bytes, float]]


@dataclass
class Output:
    """Text that became final, and the tokens sampled since the last Output (when logprobs are asked)."""

    text: str
    tokens: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Failed:
    error: ApiError


JobEvent = Output | Stats | Failed


@dataclass(eq=False)
class Job:
    """A request as the scheduler sees it; `sink` is called from the scheduler thread, never blocks."""

    prompt: list[int]
    sampler: Sampler
    limit: int  # max tokens, already capped by the room the slot's context leaves
    room: int  # the slot's context minus the prompt
    stop: list[str]
    sink: Callable[[JobEvent], None]
    top_logprobs: int | None = None  # None: no logprobs; 0: the sampled token's only
    cancelled: bool = False  # set by the request (its client went away); the scheduler frees the slot
    submitted: float = field(default_factory=time.perf_counter)


class Slot:
    """Sequence `seq` of the context. `cached` is what its KV cache holds, kept after a reply so the
    next request that extends it (a chat's next turn) decodes only its new suffix."""

    def __init__(self, seq: int, outbox: list[tuple[Job, JobEvent]]):
        self.seq = seq
        self.outbox = outbox  # events for the scheduler to hand over when it next releases the GIL
        self.cached: list[int] = []
        self.job: Job | None = None
        self.pending: int | None = None  # sampled, to be decoded in the next batch
        self.row: int | None = None  # this step's logits row in the batch
        # a grammar's token being sampled beside the next decodes, and the row it is sampled from
        self.sampling: tuple[Future[int], object] | None = None
        self.last_used = 0.0
        # the reply being generated (set by start)
        self.reused = self.generated = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.matcher = StopMatcher([])
        self.logprobs: list[TokenLogprob] = []
        self.t_start = 0.0
        self.t_read: float | None = None
        self.t_first: float | None = None

    @property
    def reading(self) -> bool:
        return self.job is not None and self.pending is None and len(self.cached) < len(self.job.prompt)

    def start(self, job: Job, ctx: LlamaContext) -> None:
        """Take `job`, keeping the longest prefix of its prompt this sequence already holds (all
        but the last token at most: its logits are needed fresh)."""
        reuse = min(common_prefix(self.cached, job.prompt), len(job.prompt) - 1)
        if reuse < len(self.cached) and not ctx.drop(self.seq, reuse, -1):
            ctx.drop(self.seq, 0, -1)  # a cache that cannot drop a tail (some recurrent ones): start over
            reuse = 0
        self.cached = job.prompt[:reuse]
        self.job, self.pending, self.row, self.sampling = job, None, None, None
        self.reused, self.generated = reuse, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.matcher = StopMatcher(job.stop)
        self.logprobs = []
        self.t_start, self.t_read, self.t_first = time.perf_counter(), None, None

    def forget(self, ctx: LlamaContext) -> None:
        """The sequence's KV state is unknown (a failed decode): clear it."""
        ctx.drop(self.seq, 0, -1)
        self.cached = []

    def take(self, ctx: LlamaContext, model: LlamaModel, pool: Executor) -> bool:
        """Sample from this step's logits row; True when the reply has ended. A grammar's token
        is sampled in `pool` from a copy of the row instead (masking a large vocabulary against
        a large grammar can take seconds): the others decode meanwhile, and collect() takes it."""
        job = self.job
        assert job is not None and self.row is not None
        now = time.perf_counter()
        if self.t_read is None:
            self.t_read = now
        if job.sampler.rule:
            row = ctx.logits(self.row).copy()
            self.sampling = (pool.submit(job.sampler.sample_row, row), row)
            return False
        token = job.sampler.sample(ctx, self.row)
        return self._took(token, ctx.logits(self.row) if job.top_logprobs is not None else None, model)

    def collect(self, model: LlamaModel) -> bool | None:
        """The grammar's token, once sampled (see take): True when the reply has ended, None
        while it is still being sampled."""
        assert self.sampling is not None
        future, row = self.sampling
        if not future.done():
            return None
        self.sampling = None
        try:
            token = future.result()
        except Exception as exc:  # never leave the request waiting
            from localrun.errors import LocalrunError
            from localrun.serve.errors import ApiError, from_localrun

            error = from_localrun(exc) if isinstance(exc, LocalrunError) else None
            self.fail(error or ApiError(500, f"sampling the grammar failed: {exc}", type="server_error"))
            return True
        return self._took(token, row, model)

    def _took(self, token: int, logits, model: LlamaModel) -> bool:
        job = self.job
        assert job is not None
        self.generated += 1
        if model.is_eog(token):
            return self._finish("eog")
        piece = model.piece(token, special=True)
        if job.top_logprobs is not None:
            self.logprobs.append(_logprob(logits, token, job.top_logprobs, model, piece))
        text, stopped = self.matcher.feed(self.decoder.decode(piece))
        if text:
            self._emit(text)
        if stopped:
            self.logprobs = []  # the tokens of the stop string: their text is not part of the reply
            return self._finish("stop")
        if self.generated >= job.limit:
            return self._finish("length")
        self.pending = token
        return False

    def cancel(self) -> None:
        self._finish("cancelled")

    def fail(self, error: ApiError) -> None:
        job = self.job
        if job is not None:
            self._drop_sampling()
            self.job, self.pending, self.row = None, None, None
            self.last_used = time.perf_counter()
            self.outbox.append((job, Failed(error)))

    def _emit(self, text: str) -> None:
        assert self.job is not None
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.outbox.append((self.job, Output(text, self.logprobs)))
        self.logprobs = []

    def _finish(self, reason: str) -> bool:
        job = self.job
        assert job is not None
        if reason in ("eog", "length"):
            tail = self.matcher.flush() + self.decoder.decode(b"", final=True)
            if tail or self.logprobs:
                self._emit(tail)
        end = time.perf_counter()
        read = self.t_read
        gen_time = end - read if read is not None else 0.0
        self.outbox.append(
            (
                job,
                Stats(
                    prompt_tokens=len(job.prompt),
                    prompt_tps=(len(job.prompt) - self.reused) / (read - self.t_start) if read else None,
                    generated_tokens=self.generated,
                    gen_tps=self.generated / gen_time if gen_time > 0 and self.generated else 0.0,
                    ttft_s=self.t_first - job.submitted if self.t_first is not None else None,
                    total_s=end - job.submitted,
                    finish_reason=reason,  # type: ignore[arg-type]
                    cached_tokens=self.reused,
                    context_full=reason == "length" and self.generated >= job.room,
                ),
            )
        )
        self._drop_sampling()
        self.job, self.pending, self.row = None, None, None
        self.last_used = end
        return True

    def _drop_sampling(self) -> None:
        """A grammar's token no longer wanted: not sampled if it has not started."""
        if self.sampling is not None:
            self.sampling[0].cancel()
            self.sampling = None


def _logprob(logits, token: int, k: int, model: LlamaModel, piece: bytes) -> TokenLogprob:
    """Log-softmax of the raw logits (before penalties, grammar or temperature: the model's own
    distribution, as OpenAI reports it), at the sampled token and the k most likely."""
    import numpy as np

    top_logit = float(logits.max())
    norm = top_logit + float(np.log(np.exp(logits - top_logit).sum()))
    top: list[tuple[bytes, float]] = []
    if k > 0:
        best = np.argpartition(-logits, k - 1)[:k]
        best = best[np.argsort(-logits[best], kind="stable")]
        top = [(model.piece(int(t), special=True), float(logits[t]) - norm) for t in best]
    return TokenLogprob(piece, float(logits[token]) - norm, top)
