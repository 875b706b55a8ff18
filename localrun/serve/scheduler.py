"""The slot scheduler: one thread owns the llama.cpp context and, each step, decodes ONE batch
holding the next token of every generating slot plus a chunk of any prompt being read.

A request that arrives takes a free slot at the next step, without waiting for the others to
finish (continuous batching); the slot is the one already holding the longest prefix of its
prompt (a chat's earlier turns), else the least recently used. While others generate, a prompt is
read at most one micro-batch per step, so a long one delays their next token by one micro-batch,
not by the whole prompt. Cancelled requests (the client went away) are reaped before each batch
is built: a slot is free again within one step. Requests beyond free slots wait in a bounded queue.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from localrun.errors import LocalrunError
from localrun.fit import UBATCH
from localrun.inference.build import llama
from localrun.inference.runtime import DecodeAborted, Loaded, common_prefix
from localrun.inference.sampler import Batch
from localrun.serve.errors import ApiError, shutting_down
from localrun.serve.slot import Failed, Job, JobEvent, Slot

# Requests sent together (a client's parallel calls) reach the scheduler a few ms apart: each is
# parsed, rendered and tokenized first. Woken from idle while others are still being prepared, it
# waits for them (at most GATHER seconds) so their prompts are read in one batch -- rather than the
# first alone while the rest wait out that whole decode (4 prompts of 100 tokens on 2 cores: TTFT
# 0.56 s for all four, against 0.14 s for one and 0.55 s for three).
GATHER = 0.02
SAMPLERS = 2  # threads sampling grammars beside the decodes (see Slot.take)


class QueueFull(Exception):
    """Every slot is busy and the queue holds as many requests as it may."""


@dataclass
class SlotStatus:
    busy: int
    queued: int


class Scheduler:
    """Owns `loaded.ctx` from start() to stop(): nothing else may decode on it meanwhile."""

    def __init__(
        self,
        loaded: Loaded,
        n_slots: int,
        queue_limit: int,
        *,
        chunk: int = UBATCH,
        preparing: Callable[[], int] = lambda: 0,
    ):
        self.ctx, self.model = loaded.ctx, loaded.model
        self.n_slots = n_slots
        self.n_ctx_slot = int(llama().llama_n_ctx_seq(self.ctx.ptr))  # each sequence's own KV cells
        self.queue_limit = queue_limit
        self._preparing = preparing  # requests received for this model, not yet submitted
        self.chunk = max(1, min(chunk, self.ctx.n_batch))
        # Events of a step are handed to the requests just before the next decode: the event loop
        # then wakes while llama_decode has released the GIL, instead of taking it between the
        # sampling calls of this thread (which then waits for it: measured 0.35 ms more per step).
        self._outbox: list[tuple[Job, JobEvent]] = []
        self.slots = [Slot(i, self._outbox) for i in range(n_slots)]
        self.batch = Batch(self.ctx.n_batch, n_slots)
        self._pool = ThreadPoolExecutor(SAMPLERS, thread_name_prefix="localrun-grammar", initializer=_yield_to_decodes)
        self.idle_since = time.monotonic()
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping: ApiError | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="localrun-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- called from request handlers (any thread) ------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull when every slot is busy and the queue is full."""
        with self._cond:
            if self._stopping is not None:
                raise shutting_down()
            free = sum(1 for s in self.slots if s.job is None)
            if len(self._waiting) >= free + self.queue_limit:
                raise QueueFull
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The request is gone: free its slot (or its place in the queue) at the next step."""
        job.cancelled = True
        with self._cond:
            self._cond.notify()

    def status(self) -> SlotStatus:
        return SlotStatus(sum(1 for s in self.slots if s.job is not None), len(self._waiting))

    @property
    def idle(self) -> bool:
        return not self._waiting and all(s.job is None for s in self.slots)

    def stop(self, error: ApiError | None = None) -> None:
        """End every request (with `error`, by default "shutting down") and the thread; the context is
        free for the caller to close once this returns."""
        with self._cond:
            self._stopping = error or shutting_down()
            self._cond.notify()
        self.ctx.abort()  # a long prompt being read stops now, not at the end of its batch
        if self._thread.is_alive():
            # An Event, not Thread.join: a join interrupted by Ctrl-C marks a running thread as
            # stopped (Python < 3.13), and the context must never be freed under a running decode.
            while not self._done.is_set():
                try:
                    self._done.wait()
                except KeyboardInterrupt:
                    pass
        self.ctx.clear_abort()
        self.batch.close()
        # a grammar being sampled reads the model's vocabulary: wait for it before the model goes
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- the scheduler thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self.idle:
                        while self._stopping is None and self.idle:
                            self._cond.wait()
                        self._gather()
                    if self._stopping is not None:
                        self._end_all(self._stopping)
                        self._flush()
                        return
                    self._reap()
                    self._assign()
                self._step()
                if self.idle:
                    self._flush()
                    self.idle_since = time.monotonic()
        except BaseException as exc:  # never leave a request waiting forever
            with self._cond:
                self._end_all(ApiError(500, f"the scheduler failed: {exc}", type="server_error"))
            self._flush()
            raise
        finally:
            self._done.set()

    def _gather(self) -> None:
        """Wait (holding the lock, as wait() needs) for requests being prepared: see GATHER."""
        deadline = time.monotonic() + GATHER
        while self._stopping is None and self._preparing() > 0 and len(self._waiting) < self.n_slots:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(min(left, 0.002))  # a request refused while prepared never notifies

    def _flush(self) -> None:
        outbox = self._outbox
        for job, event in outbox:
            job.sink(event)
        outbox.clear()

    def _end_all(self, error: ApiError) -> None:
        for slot in self.slots:
            slot.fail(error)
        while self._waiting:
            self._outbox.append((self._waiting.popleft(), Failed(error)))

    def _reap(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                slot.cancel()
        if any(job.cancelled for job in self._waiting):
            self._waiting = deque(job for job in self._waiting if not job.cancelled)

    def _assign(self) -> None:
        """Waiting requests, oldest first, to free slots: the one whose cache the prompt mostly
        extends (a conversation's earlier turns), longest prefix first; else the least recently used.
        A slot sharing only a little (a template's first tokens) is not worth the conversation it holds."""
        while self._waiting:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self._waiting.popleft()
            max(free, key=lambda slot: _affinity(slot, job.prompt)).start(job, self.ctx)

    def _step(self) -> None:
        for slot in self.slots:
            if slot.sampling is not None:
                slot.collect(self.model)
        batch = self.batch
        batch.clear()
        generating = [s for s in self.slots if s.pending is not None]
        for slot in generating:
            slot.row = batch.add(slot.pending, len(slot.cached), slot.seq, True)
            slot.cached.append(slot.pending)
            slot.pending = None
        budget = self.ctx.n_batch - len(generating)
        if generating:
            budget = min(budget, self.chunk)
        added = list(generating)
        reading = sorted((s for s in self.slots if s.reading), key=lambda s: s.job.submitted)  # type: ignore[union-attr]
        for slot in reading:
            if budget <= 0:
                break
            prompt = slot.job.prompt  # type: ignore[union-attr]
            start = len(slot.cached)
            end = min(len(prompt), start + budget)
            for pos in range(start, end):
                index = batch.add(prompt[pos], pos, slot.seq, pos == len(prompt) - 1)
            slot.cached.extend(prompt[start:end])
            slot.row = index if end == len(prompt) else None
            budget -= end - start
            added.append(slot)
        self._flush()
        if not batch.n_tokens:
            waiting = [s.sampling[0] for s in self.slots if s.sampling is not None]
            if waiting:  # only grammars are being sampled: wait for one (or a new request, soon)
                wait(waiting, timeout=0.05, return_when=FIRST_COMPLETED)
            return
        try:
            self.ctx.decode_batch(batch)
        except (DecodeAborted, LocalrunError) as exc:
            error = shutting_down() if isinstance(exc, DecodeAborted) else _decode_error(exc)
            for slot in added:
                slot.forget(self.ctx)
                slot.fail(error)
            self.ctx.clear_abort()
            return
        for slot in self.slots:
            if slot.row is not None and slot.job is not None:
                slot.take(self.ctx, self.model, self._pool)
            slot.row = None


def _yield_to_decodes() -> None:
    """A grammar's sampling thread runs at a lower priority than the decodes (Linux keeps a
    niceness per thread), so on a machine with few cores the other slots keep their pace."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: the same priority as the rest
        pass


def _affinity(slot: Slot, prompt: list[int]) -> tuple[int, float]:
    """How well a free slot suits a prompt: the prefix it holds when the prompt mostly extends its
    cache (else -1: taking it would lose a conversation for little), then least recently used."""
    shared = common_prefix(slot.cached, prompt)
    return (shared if 2 * shared >= len(slot.cached) else -1, -slot.last_used)


def _decode_error(exc: LocalrunError) -> ApiError:
    return ApiError(500, f"llama.cpp failed to decode: {exc.message}", type="server_error", code="decode_failed")
