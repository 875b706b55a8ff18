"""A served model's embeddings: an embedding context of its own on the model the slots use, made
on first use and owned by one thread.

llama.cpp shares a loaded model between contexts, but a context is not thread-safe: this one is
made, used and freed in a single thread of its own, which runs one embedding request at a time.
The slots' context goes on decoding in the scheduler's thread meanwhile: embeddings neither wait
for the chat slots nor stop them (the two share the CPU's cores while both work).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from localrun.inference.embedding import Embedder
from localrun.inference.llama.runtime import DecodeAborted, LlamaModel, LoadOptions
from localrun.serve.loop import QueueFull

T = TypeVar("T")


class EmbeddingWorker:
    """Runs work on a model's Embedder in the one thread that owns it; close() frees it there.
    Beyond the one running, `queue` requests may wait (as many as wait for the chat slots)."""

    def __init__(self, model: LlamaModel, opts: LoadOptions, max_tokens: int, queue: int, say: Callable[[str], None]):
        self._model, self._opts, self._max_tokens, self._say = model, opts, max_tokens, say
        self.queue_limit = queue
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="localrun-embed")
        self._embedder: Embedder | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._pending = 0  # running or waiting

    def submit(self, work: Callable[[Embedder], T]) -> Future[T]:
        """`work(embedder)` in the worker's thread (the embedder made there first if need be);
        QueueFull when one is running and `queue` wait already."""
        with self._lock:
            if self._pending > self.queue_limit:
                raise QueueFull()
            self._pending += 1
        future = self._pool.submit(lambda: work(self._ready()))
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._lock:
            self._pending -= 1

    def _ready(self) -> Embedder:
        if self._stopped:
            raise DecodeAborted()
        if self._embedder is None:
            self._embedder = Embedder.beside(self._model, self._opts, self._max_tokens)
            self._say(
                f"embeddings: {self._embedder.describe_pooling()}, up to {self._embedder.max_tokens} tokens "
                f"per input, {self._embedder.n_seq} inputs per decode"
            )
        return self._embedder

    def stop(self) -> None:
        """End the embedding in flight (its decode stops with DecodeAborted) and those queued:
        the server is shutting down. Safe from any thread."""
        self._stopped = True
        embedder = self._embedder
        if embedder is not None:
            embedder.ctx.abort()

    def close(self) -> None:
        """Free the embedding context once the work in flight is done (before the model is freed)."""

        def free() -> None:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None

        self._pool.submit(free).result()
        self._pool.shutdown()
