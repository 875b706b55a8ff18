"""The one generation core: a scheduler of sequences over a llama.cpp context. Each step decodes
ONE batch holding every generating sequence's next token -- or its speculative verify rows, when
drafting pays for the whole batch -- plus chunks of any prompt being read.

`run` and `chat` drive one sequence from the caller's thread (engine.py); `serve` drives N from
its scheduler thread (serve/loop.py); the self-test's probe steps one to the end. A request takes
the free sequence already holding the longest prefix of its prompt (a chat's earlier turns), else
the least recently used; a longer prefix another sequence holds is copied into it rather than read
again, and a reusable prefix (a system prompt, piped material) comes from the prompt cache on disk
when it is there, and goes to it when it is not. While others generate, a prompt is read at most
`chunk` tokens per step, so a long one delays their next token by one micro-batch.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Executor, wait
from typing import TYPE_CHECKING

from localrun.errors import LocalrunError
from localrun.inference.generation.events import Notice
from localrun.inference.generation.prompt_cache import MIN_TOKENS
from localrun.inference.generation.sequence import Request, Sequence, Update
from localrun.inference.generation.speculative import K_MAX
from localrun.inference.llama.build import llama
from localrun.inference.llama.runtime import Batch, DecodeAborted, Loaded

if TYPE_CHECKING:
    from localrun.inference.generation.prompt_cache import PromptCache
    from localrun.inference.generation.speculative import Speculator


class Scheduler:
    """Owns `loaded.ctx`'s decodes: whoever steps it must be the only one decoding on it."""

    def __init__(
        self,
        loaded: Loaded,
        n_seq: int,
        *,
        chunk: int | None = None,
        speculator: Speculator | None = None,
        prompt_cache: PromptCache | None = None,
        pool: Executor | None = None,
    ):
        self.ctx, self.model = loaded.ctx, loaded.model
        self.n_ctx_seq = int(llama().llama_n_ctx_seq(self.ctx.ptr))  # each sequence's own KV cells
        self.chunk = max(1, min(chunk or self.ctx.n_batch, self.ctx.n_batch))
        self.max_rows = max(n_seq, loaded.opts.n_outputs)  # logits rows one decode may return
        self.speculator, self.prompt_cache, self.pool = speculator, prompt_cache, pool
        self.outbox: list[tuple[Request, Update]] = []
        self.sequences = [Sequence(i, self.outbox) for i in range(n_seq)]
        if speculator is not None:
            for seq in self.sequences:
                seq.drafters = speculator.for_sequence(seq.seq)
                seq.controller.adaptive = speculator.mode == "auto"
                seq.tally = speculator.stats
        self.batch = Batch(self.ctx.n_batch, n_seq)

    def close(self) -> None:
        self.batch.close()

    @property
    def busy(self) -> int:
        return sum(1 for s in self.sequences if s.request is not None)

    # -- requests ----------------------------------------------------------------------------------
    def assign(self, request: Request) -> Sequence | None:
        """Start `request` on the free sequence that suits it best (None when none is free)."""
        free = [s for s in self.sequences if s.request is None]
        if not free:
            return None
        prompt = request.prompt
        seq = max(free, key=lambda s: _affinity(s, prompt))
        seq.start(request, self.ctx, min(seq.shares(prompt), len(prompt) - 1))
        self._copy_prefix(seq, prompt)
        self._disk_prefix(seq, request)
        return seq

    def _copy_prefix(self, seq: Sequence, prompt: list[int]) -> None:
        """A longer prefix of the prompt that another sequence holds, copied rather than read."""
        donor = max((s for s in self.sequences if s is not seq), key=lambda s: s.shares(prompt), default=None)
        if donor is None:
            return
        shared = min(donor.shares(prompt), len(prompt) - 1)
        if shared - len(seq.cached) < MIN_TOKENS:
            return
        held = shared if self.ctx.copy(donor.seq, seq.seq, shared) else 0
        seq.cached, seq.confirmed, seq.reused = prompt[:held], held, held

    def _disk_prefix(self, seq: Sequence, request: Request) -> None:
        """The prompt's reusable prefix loaded from the prompt cache; else saved once read."""
        cache, reusable = self.prompt_cache, request.cached_prefix
        if cache is None or not MIN_TOKENS <= reusable < len(request.prompt) or len(seq.cached) >= reusable:
            return
        prefix = request.prompt[:reusable]
        if not cache.holds(prefix):
            seq.save_at = reusable
            return
        notices: list[str] = []
        if cache.load(self.ctx, prefix, notices.append, seq.seq):
            held = reusable
            seq.from_disk = reusable
        else:  # a failed read may have cleared the sequence: nothing of it is trusted
            held = 0
            seq.save_at = reusable
        seq.cached, seq.confirmed, seq.reused = request.prompt[:held], held, held
        self.outbox.extend((request, Notice(text)) for text in notices)

    def reap(self) -> None:
        """End the replies whose callers went away."""
        for seq in self.sequences:
            if seq.request is not None and seq.request.cancelled:
                seq.cancel()

    def flush(self) -> None:
        """Hand the events of the last steps to their requests."""
        outbox = self.outbox
        for request, event in outbox:
            request.sink(event)
        outbox.clear()

    def run(self, request: Request) -> None:
        """Generate `request` to its end in this thread (its sink gets every event)."""
        seq = self.assign(request)
        if seq is None:
            raise RuntimeError("no free sequence")
        while seq.request is request:
            self.step()
        self.flush()

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> None:
        """Build one batch of every sequence's work, decode it, sample what it gave."""
        for seq in self.sequences:
            if seq.sampling is not None:
                seq.collect(self.model)
        batch = self.batch
        batch.clear()
        generating = [s for s in self.sequences if s.pending]
        reading = sorted((s for s in self.sequences if s.reading), key=lambda s: s.request.submitted)  # type: ignore[union-attr]
        # what drafts may take: logits rows, and the batch's room after every pending token
        spare = min(
            self.max_rows - len(generating) - len(reading), batch.capacity - sum(len(s.pending) for s in generating)
        )
        for i, seq in enumerate(generating):
            busy = batch.n_tokens + len(generating) - i  # the batch's rows if it drafts nothing
            spare -= self._add_generating(seq, spare, busy)
        added = list(generating)
        budget = self.ctx.n_batch - batch.n_tokens
        if generating:
            budget = min(budget, self.chunk)
        for seq in reading:
            if budget <= 0:
                break
            budget -= self._add_prompt(seq, budget)
            added.append(seq)
        self.flush()
        if not batch.n_tokens:
            waiting = [s.sampling[0] for s in self.sequences if s.sampling is not None]
            if waiting:  # only grammars are being sampled: wait for one (or a new request, soon)
                wait(waiting, timeout=0.05, return_when=FIRST_COMPLETED)
            return
        started = time.perf_counter()
        try:
            self.ctx.decode_batch(batch)
        except (DecodeAborted, LocalrunError) as exc:
            for seq in added:
                seq.rewind(self.ctx)
                seq.fail(exc)
            self.ctx.clear_abort()
            return
        if self.speculator is not None and len(added) == len(generating):  # no prompt in it: a step's cost
            self.speculator.curve.observe(batch.n_tokens, time.perf_counter() - started)
        for seq in added:
            seq.confirmed = len(seq.cached)
            if seq.save_at is not None and seq.save_at == len(seq.cached):
                assert self.prompt_cache is not None and seq.request is not None
                self.prompt_cache.save(self.ctx, seq.request.prompt[: seq.save_at], seq.seq)
                seq.save_at = None
        for seq in self.sequences:
            if seq.rows and seq.request is not None:
                seq.take(self.ctx, self.model, self.pool)

    def _add_generating(self, seq: Sequence, spare: int, busy: int) -> int:
        """Its pending token (and the tokens forced after it), and a draft after it when that pays;
        the drafted tokens added. Forced tokens are decoded without logits but the last, and no
        draft follows them."""
        request, spec = seq.request, self.speculator
        assert request is not None and seq.pending
        start = len(seq.cached)
        draft: list[int] = []
        pooled = self.pool is not None and request.sampler.rule
        if spec is not None and request.speculate and spare > 0 and not pooled and len(seq.pending) == 1:
            k = min(K_MAX, spare, request.limit - seq.generated - 1, self.n_ctx_seq - start - 2)
            if k > 0:
                draft = spec.draft(seq.drafters, seq.controller, seq.history, k, busy)
        batch = self.batch
        tokens, first_row = [*seq.pending, *draft], len(seq.pending) - 1
        rows = [batch.add(token, start + i, seq.seq, i >= first_row) for i, token in enumerate(tokens)]
        seq.rows = rows[first_row:]
        seq.cached.extend(tokens)
        seq.draft, seq.pending = draft, []
        return len(draft)

    def _add_prompt(self, seq: Sequence, budget: int) -> int:
        """A chunk of its prompt (cut where the prompt cache saves); the tokens added."""
        request = seq.request
        assert request is not None
        prompt, start = request.prompt, len(seq.cached)
        end = min(len(prompt), start + budget)
        if seq.save_at is not None and start < seq.save_at < end:
            end = seq.save_at
        batch = self.batch
        last = -1
        for pos in range(start, end):
            last = batch.add(prompt[pos], pos, seq.seq, pos == len(prompt) - 1)
        seq.cached.extend(prompt[start:end])
        seq.rows = [last] if end == len(prompt) else []
        return end - start


def _affinity(seq: Sequence, prompt: list[int]) -> tuple[int, float]:
    """How well a free sequence suits a prompt: the prefix it holds when the prompt mostly extends
    its cache (else -1: taking it would lose a conversation for little), then least recently used."""
    shared = seq.shares(prompt)
    return (shared if 2 * shared >= len(seq.cached) else -1, -seq.last_used)
