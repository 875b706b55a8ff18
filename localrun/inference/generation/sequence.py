"""One sequence of a context and the reply it is generating: what its KV cells hold, and the
per-token work every caller shares -- sample, end of generation, the token's text decoded across
token boundaries, stop strings that never leak, limits, log-probabilities, the tail flush and the
Stats. The Scheduler (scheduler.py) decides what each sequence decodes in each batch.

A request's Watch follows the text token by token (a thinking model's reasoning) and may have
tokens forced: emitted next as if sampled -- through the same text, stop, limit and Stats path,
accepted into the sampler's state (a grammar that rules one out stops the forcing there) -- and
decoded together in the next batch, where no draft is verified."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from localrun.inference.generation.events import Event, Piece, SampledToken, Speculation, Stats
from localrun.inference.generation.speculative import Controller, LookupDrafter, SeqDrafter, SpecStats
from localrun.inference.generation.stops import StopMatcher
from localrun.inference.llama.runtime import common_prefix

if TYPE_CHECKING:
    from localrun.inference.generation.sampler import Sampler
    from localrun.inference.llama.runtime import LlamaContext, LlamaModel


@dataclass
class Failed:
    """The reply ended on an error (a decode that failed or was aborted); `stats` are its figures
    so far, ended as cancelled (None: it never started)."""

    error: BaseException
    stats: Stats | None = None


Update = Event | Failed


class Watch(Protocol):
    """Follows a reply's text as it is generated, token by token (a thinking model's reasoning:
    its tokens counted, its closing marker forced once a budget is spent)."""

    def start(self) -> list[int]:
        """Tokens to force before anything is sampled (a reasoning budget of 0)."""
        ...

    def see(self, text: str) -> tuple[bool, list[int]]:
        """The text of the reply's next token: whether the token is reasoning, and the tokens to
        force after it."""
        ...


@dataclass(eq=False)
class Request:
    """A reply to generate. `sink` is called from the thread that steps the scheduler and must not
    block. `cached_prefix`: how many prompt tokens may come from (and go to) the prompt cache."""

    prompt: list[int]
    sampler: Sampler
    limit: int  # max tokens, already capped by the room the sequence's context leaves
    room: int  # the sequence's context minus the prompt
    stop: list[str]
    sink: Callable[[Update], None]
    top_logprobs: int | None = None  # None: no logprobs; 0: the sampled token's only
    cached_prefix: int = 0
    speculate: bool = True  # drafts may be verified for it (when the scheduler has drafters)
    cancelled: bool = False  # set by the caller (its client went away); the scheduler ends it
    watch: Watch | None = None  # follows the text; may force tokens (see the module docstring)
    submitted: float = field(default_factory=time.perf_counter)


class Sequence:
    """Sequence `seq` of the context. `cached` is what its KV cells hold (the part of it that is
    sure: `confirmed`), kept after a reply so that the next request extending it (a chat's next
    turn) decodes only its new suffix."""

    def __init__(self, seq: int, outbox: list[tuple[Request, Update]]):
        self.seq = seq
        self.outbox = outbox  # events for the scheduler to hand over
        self.cached: list[int] = []
        self.confirmed = 0  # of cached, the tokens a finished decode holds
        self.request: Request | None = None
        # sampled (and forced after it), to be decoded in the next batch
        self.pending: list[int] = []
        self.rows: list[int] = []  # this step's logits rows in the batch
        self.draft: list[int] = []  # the drafted tokens being verified in this step
        # a grammar's token being sampled beside the next decodes, and the row it is sampled from
        self.sampling: tuple[Future[int], Any] | None = None
        self.last_used = 0.0
        # its own prompt lookup and draft model view, and how much drafting pays (see speculative)
        self.drafters: tuple[LookupDrafter | None, SeqDrafter | None] = (None, None)
        self.controller = Controller()
        self.tally = SpecStats()  # the scheduler's, over every sequence
        # the reply being generated (set by start)
        self.reused = self.from_disk = self.generated = self.drafted = self.accepted = self.reasoned = 0
        self.save_at: int | None = None  # the prompt cache's prefix, saved once read
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.matcher = StopMatcher([])
        self.history: list[int] = []  # the prompt and the reply so far: what drafts are looked up in
        self.logprobs: list[SampledToken] = []
        self.t_start = 0.0
        self.t_read: float | None = None
        self.t_first: float | None = None

    @property
    def reading(self) -> bool:
        return self.request is not None and not self.pending and len(self.cached) < len(self.request.prompt)

    def start(self, request: Request, ctx: LlamaContext, reuse: int) -> None:
        """Take `request`, keeping the first `reuse` tokens it holds of the prompt."""
        if not ctx.drop(self.seq, reuse, -1):  # whatever the cells hold beyond (an interrupted step's)
            ctx.drop(self.seq, 0, -1)  # a cache that cannot drop a tail (some recurrent ones): start over
            reuse = 0
        self.cached = request.prompt[:reuse]
        self.confirmed = reuse
        self.request, self.pending, self.rows, self.draft, self.sampling = request, [], [], [], None
        self.reused, self.from_disk, self.generated, self.drafted, self.accepted = reuse, 0, 0, 0, 0
        self.reasoned = 0  # of the generated tokens, the reasoning's (as the request's watch tells)
        self.save_at = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.matcher = StopMatcher(request.stop)
        self.history = list(request.prompt)
        lookup, drafter = self.drafters
        if lookup is not None:  # its n-gram index is of the last reply's history: another request's
            self.drafters = (LookupDrafter(), drafter)
        self.logprobs = []
        self.t_start, self.t_read, self.t_first = time.perf_counter(), None, None

    def shares(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` this sequence's KV cells hold."""
        return common_prefix(self.cached[: self.confirmed], prompt)

    def rewind(self, ctx: LlamaContext) -> None:
        """A decode failed or was aborted: what it may have written is forgotten, what was there
        before is kept."""
        if not ctx.drop(self.seq, self.confirmed, -1):
            ctx.drop(self.seq, 0, -1)
            self.confirmed = 0
        del self.cached[self.confirmed :]

    # -- sampling ----------------------------------------------------------------------------------
    def take(self, ctx: LlamaContext, model: LlamaModel, pool: Executor | None) -> bool:
        """Sample from this step's logits rows (a verify: each in turn while the draft holds);
        True when the reply has ended. With a `pool`, a grammar's token is sampled there from a
        copy of the row instead (masking a large vocabulary against a large grammar can take
        seconds): the others decode meanwhile, and collect() takes it."""
        request = self.request
        assert request is not None and self.rows
        if self.t_read is None:
            self.t_read = time.perf_counter()
        if not self.generated and request.watch is not None:  # the reply begins with forced tokens
            opening = request.watch.start()
            if opening:
                ended = self._force(opening, model)
                if ended or self.pending:  # this row is not sampled: the forced tokens come first
                    self.rows, self.draft = [], []
                    return ended
        rows, draft = self.rows, self.draft
        self.rows, self.draft = [], []
        if pool is not None and request.sampler.rule:
            row = ctx.logits(rows[0]).copy()
            self.sampling = (pool.submit(request.sampler.sample_row, row), row)
            return False
        want = request.top_logprobs is not None
        ended, held = False, 0  # held: drafted tokens the model agreed with (they stay in the cache)
        self.drafted += len(draft)
        for i, row in enumerate(rows):
            token = request.sampler.sample(ctx, row)
            agrees = i < len(draft) and token == draft[i]
            ended = self._took(token, ctx.logits(row) if want else None, model)
            # a drafted token the model agrees with is in the cache; but when tokens were forced
            # after it, they take the place of the rest of the draft, and it is decoded with them
            agrees = agrees and (ended or len(self.pending) == 1)
            held += agrees
            self.accepted += agrees
            if ended or not agrees:
                break
        kept = len(self.cached) - len(draft) + held
        if kept < len(self.cached):
            if not ctx.drop(self.seq, kept, -1):
                raise RuntimeError("the KV cache cannot drop rejected draft tokens")  # checked at load: never
            del self.cached[kept:]
            self.confirmed = min(self.confirmed, kept)
        if draft:
            self.controller.observe(len(draft), held)
            self.tally.drafted += len(draft)
            self.tally.accepted += held
            self.tally.verify_batches += 1
            if request is self.request:
                self.outbox.append((request, Speculation(self.drafted, self.accepted)))
        return ended

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
            self.fail(exc)
            return True
        return self._took(token, row, model)

    def _took(self, token: int, logits: Any, model: LlamaModel, *, forced: bool = False) -> bool:
        """A token of the reply, sampled (from `logits`) or forced: True when the reply has ended."""
        request = self.request
        assert request is not None
        self.generated += 1
        self.history.append(token)
        if not forced:
            self.pending = []
        if model.is_eog(token):
            return self._finish("eog")
        piece = model.piece(token, special=True)
        if request.top_logprobs is not None:  # a forced token was certain: probability 1
            self.logprobs.append(
                logprob(logits, token, request.top_logprobs, model, piece)
                if not forced
                else SampledToken(piece, 0.0, [])
            )
        decoded = self.decoder.decode(piece)
        force: list[int] = []
        if request.watch is not None:
            reasoning, force = request.watch.see(decoded)
            self.reasoned += reasoning
        text, stopped = self.matcher.feed(decoded)
        if text:
            self._emit(text)
        if stopped:
            self.logprobs = []  # the tokens of the stop string: their text is not part of the reply
            return self._finish("stop")
        if self.generated >= request.limit:
            return self._finish("length")
        self.pending.append(token)
        return self._force(force, model) if force else False

    def _force(self, tokens: list[int], model: LlamaModel) -> bool:
        """Emit `tokens` as if sampled, each accepted into the sampler first (stopping at one its
        grammar rules out); True when the reply has ended."""
        request = self.request
        assert request is not None
        for token in tokens:
            if not request.sampler.force(token):
                return False
            if self._took(token, None, model, forced=True):
                return True
        return False

    # -- ending ------------------------------------------------------------------------------------
    def cancel(self) -> None:
        self._finish("cancelled")

    def fail(self, error: BaseException) -> None:
        request = self.request
        if request is not None:
            stats = self._stats("cancelled")
            self._end()
            self.outbox.append((request, Failed(error, stats)))

    def _emit(self, text: str) -> None:
        assert self.request is not None
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.outbox.append((self.request, Piece(text, tokens=self.logprobs)))
        self.logprobs = []

    def _finish(self, reason: str) -> bool:
        request = self.request
        assert request is not None
        if reason in ("eog", "length"):
            tail = self.matcher.flush() + self.decoder.decode(b"", final=True)
            if tail or self.logprobs:
                self._emit(tail)
        stats = self._stats(reason)
        self._end()
        self.outbox.append((request, stats))
        return True

    def _stats(self, reason: str) -> Stats:
        request = self.request
        assert request is not None
        end = time.perf_counter()
        read = self.t_read
        gen_time = end - read if read is not None else 0.0
        n_prompt = len(request.prompt)
        return Stats(
            prompt_tokens=n_prompt,
            prompt_tps=(n_prompt - self.reused) / (read - self.t_start) if read and read > self.t_start else None,
            generated_tokens=self.generated,
            gen_tps=self.generated / gen_time if gen_time > 0 and self.generated else 0.0,
            ttft_s=self.t_first - request.submitted if self.t_first is not None else None,
            total_s=end - request.submitted,
            finish_reason=reason,  # type: ignore[arg-type]
            cached_tokens=self.reused,
            context_full=reason == "length" and self.generated >= request.room,
            from_disk=self.from_disk,
            drafted=self.drafted,
            accepted=self.accepted,
            stop=self.matcher.matched if reason == "stop" else None,
            reasoning_tokens=self.reasoned,
        )

    def _end(self) -> None:
        if self.sampling is not None:  # a grammar's token no longer wanted: not sampled if not started
            self.sampling[0].cancel()
            self.sampling = None
        self.pending = []  # sampled, never decoded: no longer wanted
        self.request, self.rows, self.draft = None, [], []
        self.last_used = time.perf_counter()


def logprob(logits: Any, token: int, k: int, model: LlamaModel, piece: bytes) -> SampledToken:
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
    return SampledToken(piece, float(logits[token]) - norm, top)
