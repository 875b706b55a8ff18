"""The server's thread over the generation core: it owns the llama.cpp context and steps the
core's Scheduler (inference/scheduler.py) while any request is in flight.

A request that arrives takes a free sequence (a slot) at the next step, without waiting for the
others to finish (continuous batching). Cancelled requests (the client went away) are reaped
before each batch is built: a slot is free again within one step. Requests beyond free slots wait
in a bounded queue. A grammar's token is sampled in a low-priority thread pool beside the decodes.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from localrun.fit import UBATCH
from localrun.inference.generation.scheduler import Scheduler
from localrun.inference.generation.sequence import Failed, Request
from localrun.inference.llama.runtime import Loaded
from localrun.serve.errors import ApiError, shutting_down

if TYPE_CHECKING:
    from localrun.inference.generation.prompt_cache import PromptCache
    from localrun.inference.generation.speculative import Speculator

# Requests sent together (a client's parallel calls) reach the loop a few ms apart: each is
# parsed, rendered and tokenized first. Woken from idle while others are still being prepared, it
# waits for them (at most GATHER seconds) so their prompts are read in one batch -- rather than the
# first alone while the rest wait out that whole decode (4 prompts of 100 tokens on 2 cores: TTFT
# 0.56 s for all four, against 0.14 s for one and 0.55 s for three).
GATHER = 0.02
SAMPLERS = 2  # threads sampling grammars beside the decodes


class QueueFull(Exception):
    """Every slot is busy and the queue holds as many requests as it may."""


@dataclass
class SlotStatus:
    busy: int
    queued: int


class SlotLoop:
    """Owns `loaded.ctx` from start() to stop(): nothing else may decode on it meanwhile."""

    def __init__(
        self,
        loaded: Loaded,
        n_slots: int,
        queue_limit: int,
        *,
        chunk: int = UBATCH,
        preparing: Callable[[], int] = lambda: 0,
        speculator: Speculator | None = None,
        prompt_cache: PromptCache | None = None,
    ):
        self._pool = ThreadPoolExecutor(SAMPLERS, thread_name_prefix="localrun-grammar", initializer=_yield_to_decodes)
        self.core = Scheduler(
            loaded, n_slots, chunk=chunk, speculator=speculator, prompt_cache=prompt_cache, pool=self._pool
        )
        self.ctx = loaded.ctx
        self.n_slots = n_slots
        self.n_ctx_slot = self.core.n_ctx_seq
        self.queue_limit = queue_limit
        self._preparing = preparing  # requests received for this model, not yet submitted
        self.idle_since = time.monotonic()
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stopping: ApiError | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="localrun-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- called from request handlers (any thread) ------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue `request`; QueueFull when every slot is busy and the queue is full."""
        with self._cond:
            if self._stopping is not None:  # shutting down, or the loop failed
                raise self._stopping
            free = self.n_slots - self.core.busy
            if len(self._waiting) >= free + self.queue_limit:
                raise QueueFull
            self._waiting.append(request)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """The request is gone: free its slot (or its place in the queue) at the next step."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    def status(self) -> SlotStatus:
        return SlotStatus(self.core.busy, len(self._waiting))

    @property
    def idle(self) -> bool:
        return not self._waiting and not self.core.busy

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
        self.core.close()
        # a grammar being sampled reads the model's vocabulary: wait for it before the model goes
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.core.speculator is not None:  # handed over at start: its draft model goes with the loop
            self.core.speculator.close()

    # -- the loop's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        try:
            while True:
                with self._cond:
                    if self.idle:
                        while self._stopping is None and self.idle:
                            self._cond.wait()
                        self._gather()
                    if self._stopping is not None:
                        self._end_all(self._stopping)
                        core.flush()
                        return
                    core.reap()
                    self._assign()
                core.step()
                if self.idle:
                    core.flush()
                    self.idle_since = time.monotonic()
        except BaseException as exc:  # never leave a request waiting forever, nor take new ones
            with self._cond:
                self._stopping = ApiError(500, f"the scheduler failed: {exc}", type="server_error")
                self._end_all(self._stopping)
            core.flush()
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

    def _assign(self) -> None:
        """Waiting requests, oldest first, to free slots (the core picks which)."""
        if any(request.cancelled for request in self._waiting):
            self._waiting = deque(request for request in self._waiting if not request.cancelled)
        while self._waiting and self.core.busy < self.n_slots:
            self.core.assign(self._waiting.popleft())

    def _end_all(self, error: ApiError) -> None:
        for seq in self.core.sequences:
            seq.fail(error)
        while self._waiting:
            self.core.outbox.append((self._waiting.popleft(), Failed(error)))


def _yield_to_decodes() -> None:
    """A grammar's sampling thread runs at a lower priority than the decodes (Linux keeps a
    niceness per thread), so on a machine with few cores the other slots keep their pace."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: the same priority as the rest
        pass
