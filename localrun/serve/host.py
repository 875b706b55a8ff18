"""One served model: loaded with N slots sharing one context (planned for N x the per-slot
context), its chat template, its scheduler; unloaded after --keep-alive idle, loaded again by the
next request that names it.

The weights are mapped from the model's file (mmap): if the file is truncated in place while
loaded, the next read of a page past its new end kills the process (SIGBUS). The host notes the
file's identity, size and time at load and checks them every sweep and before each request; a
file changed in place ends the model's requests with an error and unloads it (the next request
loads whatever is there, and says what is wrong with it). A truncation during a decode step
cannot be caught this way: do not rewrite a model file that is being served."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from localrun import fit
from localrun.hardware import Machine, default_threads
from localrun.inference.embedding import DEFAULT_TOKENS
from localrun.inference.engine import Engine
from localrun.inference.generation.prompt_cache import DEFAULT_LIMIT
from localrun.inference.generation.speculative import Mode
from localrun.inference.llama import runtime
from localrun.inference.llama.runtime import LoadOptions
from localrun.inference.opening import (
    EngineConfig,
    ModelInfo,
    choose_template,
    load_backing_off,
    prompt_cache_for,
    speculator_for,
)
from localrun.inference.prompting.families import Detected, detect
from localrun.inference.prompting.templates import ChatTemplate
from localrun.model.files import ModelFiles
from localrun.notes import beyond_trained
from localrun.serve.embedder import EmbeddingWorker
from localrun.serve.errors import ApiError, shutting_down
from localrun.serve.loop import SlotLoop
from localrun.serve.protocol import SlotsHealth
from localrun.store.opening import open_checked
from localrun.store.resolve import Resolved
from localrun.text import plural, safe

Notify = Callable[[str], None]
Stamp = tuple[tuple[int, int, int, int], ...]  # per file: device, inode, size, mtime (ns)


def _stat_files(paths: tuple[Path, ...]) -> Stamp:
    return tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))


@dataclass
class ServeOptions:
    parallel: int = 4  # slots per model
    ctx: int | None = None  # tokens per slot; None: 4096 capped by what the model was trained with
    threads: int | None = None
    gpu_layers: int | None = None  # None: the planner's choice
    queue: int = 16  # requests per model waiting for a slot beyond the free ones
    keep_alive: float | None = 300.0  # seconds an idle model stays loaded; None: until the server stops
    batch: int = 2048  # tokens one decode may hold (prompt chunks plus one token per generating slot)
    chat_format: str | None = None
    template_file: Path | None = None
    verbose: bool = False
    speculate: Mode = "auto"  # as `run --speculate`: drafts verified in the slots' shared batch
    draft: ModelFiles | None = None  # a draft model for speculative decoding (same vocabulary)
    prompt_cache: bool = True  # reusable prefixes' KV states on disk, as `run` keeps them
    prompt_cache_size: int = DEFAULT_LIMIT
    embed_ctx: int = DEFAULT_TOKENS  # tokens per embedding input (and per embedding decode)
    reasoning_budget: int | None = None  # a thinking model's reasoning tokens before its end is forced

    def generation(self) -> EngineConfig:
        """What the slots' generation uses, as run's options say it."""
        return EngineConfig(
            speculate=self.speculate,
            draft=self.draft,
            prompt_cache=self.prompt_cache,
            prompt_cache_size=self.prompt_cache_size,
            verbose=self.verbose,
        )


class ModelHost:
    """A model the server answers for. Requests check it out (loading it if needed) and in again;
    it is never unloaded while checked out."""

    def __init__(
        self,
        model_id: str,
        aliases: set[str],
        source: Callable[[], Resolved],
        machine: Callable[[], Machine],
        opts: ServeOptions,
        notify: Notify,
    ):
        self.id = model_id
        self.aliases = aliases | {model_id}
        self.created = int(time.time())
        self.opts = opts
        self.keep_alive = opts.keep_alive  # seconds idle before unloading (a request of Ollama's may change it)
        self._source, self._machine, self._notify = source, machine, notify
        self._lock = threading.Lock()
        self._users = 0
        self._last = time.monotonic()
        self._stopped = False
        self.engine: Engine | None = None  # the loaded model: its vocabulary, template, context
        self.template: ChatTemplate | None = None
        self.replies: Detected | None = None  # how its replies are taken apart (reasoning, tool calls)
        self.scheduler: SlotLoop | None = None
        self.embeddings: EmbeddingWorker | None = None  # its embedding context, made on first use
        self.n_ctx_slot = opts.ctx or 0
        self.preparing = 0  # requests checked out and being prepared (changed on the event loop only)
        self._files: tuple[Path, ...] = ()  # the files the loaded weights are mapped from
        self._stamp: Stamp = ()  # and what they were when loaded
        self._changed = False  # a file changed in place: the model's requests are being ended
        self.loads = 0  # times the model was loaded (for /metrics)
        self.load_seconds = 0.0  # and the time those loads took, planning and checks included
        self._described: Resolved | None = None

    def described(self) -> Resolved:
        """The model's files, header and plan, as found when first asked (what a listing says of it)."""
        if self._described is None:
            self._described = self._source()
        return self._described

    def checkout(self) -> SlotLoop:
        """The running scheduler, loading the model first if it is not (blocking: call off the
        event loop). Pair with checkin()."""
        self.unload_if_changed()
        with self._lock:
            if self._stopped:
                raise shutting_down()
            if self._changed:  # its requests are still ending
                raise ApiError(
                    503, f"{self.id} is being unloaded: {self._changed_why()}", type="server_error", retry_after=1
                )
            if self.scheduler is None:
                self._load()
            assert self.scheduler is not None
            self._users += 1
            return self.scheduler

    def checkout_now(self) -> SlotLoop | None:
        """checkout() when it would not wait (the model is loaded and not being loaded or unloaded),
        else None: a request on the event loop takes this path, and a thread only when it must."""
        if self.scheduler is None or self._changed or self.file_changed() or not self._lock.acquire(blocking=False):
            return None
        try:
            if self._stopped or self.scheduler is None:
                return None
            self._users += 1
            return self.scheduler
        finally:
            self._lock.release()

    def checkin(self) -> None:
        with self._lock:
            self._users -= 1
            self._last = time.monotonic()

    def unload_if_idle(self, *, force: bool = False) -> bool:
        """Unload when nothing used the model for keep_alive seconds (force: now, if nothing uses
        it); True if it was unloaded."""
        keep = 0.0 if force else self.keep_alive
        scheduler = self.scheduler
        if keep is None or scheduler is None or self._users or not scheduler.idle:
            return False
        with self._lock:
            idle_for = time.monotonic() - max(self._last, scheduler.idle_since)
            if self.scheduler is None or self._users or not scheduler.idle or idle_for < keep:
                return False
            self._unload()
        why = "to make room for another" if force else "--keep-alive"
        self._notify(f"unloaded {self.id}: idle for {idle_for:.0f} s ({why})")
        return True

    def expires_in(self) -> float | None:
        """Seconds until a loaded model is unloaded if nothing uses it (None: never; 0: once idle)."""
        if self.keep_alive is None:
            return None
        scheduler = self.scheduler
        busy = self._users or (scheduler is not None and not scheduler.idle)
        last = max(self._last, scheduler.idle_since) if scheduler is not None and not busy else time.monotonic()
        return max(0.0, last + self.keep_alive - time.monotonic())

    def file_changed(self) -> bool:
        """Whether a loaded model's file was changed in place (truncated, rewritten) since it was
        loaded. A file deleted or replaced by another (a new inode) leaves the mapped data intact."""
        if not self._stamp:
            return False
        try:
            now = _stat_files(self._files)
        except OSError:
            return False
        return any(a[:2] == b[:2] and a != b for a, b in zip(now, self._stamp))

    def unload_if_changed(self) -> bool:
        """End the model's requests and unload it if its file changed in place (see the module's
        docstring); True if it was unloaded. Its requests still finishing: at the next call."""
        scheduler = self.scheduler
        if scheduler is None or not (self._changed or self.file_changed()):
            return False
        with self._lock:
            if self.scheduler is not scheduler:
                return False
            first, self._changed = not self._changed, True
        if first:
            self._notify(f"unloading {self.id}: {self._changed_why()}; its requests were ended")
            error = ApiError(503, self._changed_why(), type="server_error", code="model_file_changed")
            scheduler.stop(error)
        with self._lock:
            if self._users or self.scheduler is not scheduler:
                return False
            self._unload()
        return True

    def _changed_why(self) -> str:
        name = safe(self._files[0].name) if self._files else self.id
        return f"its file {name} changed on disk while it was loaded (its weights are mapped from that file)"

    def drain(self) -> None:
        """End every request (shutting down) and refuse new ones; the model stays until close()."""
        self._stopped = True
        scheduler = self.scheduler
        if scheduler is not None:
            scheduler.stop(shutting_down())
        if self.embeddings is not None:
            self.embeddings.stop()

    def close(self) -> None:
        with self._lock:
            self._unload()

    def status(self) -> SlotsHealth:
        scheduler = self.scheduler
        state = scheduler.status() if scheduler is not None else None
        return SlotsHealth(
            id=self.id,
            loaded=scheduler is not None,
            slots=self.opts.parallel,
            busy=state.busy if state else 0,
            queued=state.queued if state else 0,
            ctx_per_slot=self.n_ctx_slot,
        )

    def say(self, message: str) -> None:
        """A line of the server's log about this model."""
        self._notify(f"{self.id}: {message}")

    # -- loading ---------------------------------------------------------------------------------
    def _load(self) -> None:
        began = time.perf_counter()
        resolved = self._source()
        n = self.opts.parallel
        say = self.say

        per_slot = runtime.padded_ctx(fit.default_ctx(resolved.header, self.opts.ctx))
        plan = fit.plan(resolved.header, self._machine(), n * per_slot)
        if plan.n_ctx < n * per_slot:
            per_slot = max(fit.CELL_PAD, plan.n_ctx // n // fit.CELL_PAD * fit.CELL_PAD)
            say(f"context reduced to {n} slots × {per_slot} tokens to fit in memory")
        # the plan's notes on the context are about all slots together: say them per slot instead
        notes = [note for note in plan.notes if note.kind not in ("beyond_trained", "context_reduced")]
        beyond = beyond_trained(per_slot, resolved.header.n_ctx_train, f"{per_slot} tokens per slot")
        if beyond:
            notes.append(beyond)
        if notes:
            say("; ".join(note.text for note in notes))
        model = resolved.model
        try:
            stamp = _stat_files(model.files)
        except OSError as exc:
            raise ApiError(
                503,
                f"the file of {self.id} is gone: {safe(exc.filename)} was moved or deleted since the server started",
                type="server_error",
                code="model_file_missing",
            ) from None
        threads = self.opts.threads or default_threads()
        generation = self.opts.generation()
        opts = LoadOptions(
            n_gpu_layers=self.opts.gpu_layers if self.opts.gpu_layers is not None else plan.n_gpu_layers,
            n_ctx=n * per_slot,
            n_batch=min(self.opts.batch, n * per_slot),
            n_threads=threads,
            use_extra_bufts=plan.extra_bufts,
            verbose=self.opts.verbose,
            n_outputs=n * generation.logits_rows,  # per slot and step: one row, or a verify batch's
            n_seq_max=n,
            kv_unified=False,  # each slot its own KV stream of per_slot cells: no slot crowds out another
            rpc=plan.rpc,
            tensor_split=plan.tensor_split if self.opts.gpu_layers is None else (),
        )

        def load() -> tuple[Engine, ChatTemplate, SlotLoop]:
            started = time.perf_counter()
            # the slots' contexts are fixed: back off on the GPU layers only
            opened = load_backing_off(model.path, opts, say, shrink_ctx=False)
            loaded, gpu = opened.loaded, opened.opts.n_gpu_layers
            engine = Engine(loaded, ModelInfo.of(model, loaded, gpu, threads, started))
            try:
                template = choose_template(engine, self.opts.chat_format, self.opts.template_file, say)
                scheduler = SlotLoop(
                    loaded,
                    n,
                    self.opts.queue,
                    chunk=fit.UBATCH,
                    preparing=lambda: self.preparing,
                    speculator=speculator_for(loaded, generation.speculate, generation.draft, say),
                    prompt_cache=prompt_cache_for(model, loaded, generation),
                )
            except BaseException:
                loaded.close()
                raise
            return engine, template, scheduler

        engine, self.template, scheduler = open_checked(model, plan, load, say, "a smaller --ctx or --parallel")
        self.replies = detect(self.template.source, engine.special_tokens())
        if self.replies.reasoning is not None or self.replies.tools.name != "generic":
            say("; ".join(self.replies.evidence))
        self.engine, self.n_ctx_slot = engine, scheduler.n_ctx_slot
        self.embeddings = EmbeddingWorker(engine.loaded.model, opts, self.opts.embed_ctx, self.opts.queue, say)
        self._files, self._stamp = model.files, stamp
        scheduler.start()
        self.scheduler = scheduler
        self.loads += 1
        self.load_seconds += time.perf_counter() - began
        self._notify(
            f"loaded {safe(self.id)}: {n} slot{'s' * (n > 1)} × {self.n_ctx_slot} tokens, "
            f"{plural(threads, 'thread')}, {engine.info.n_gpu_layers} GPU layers, in {engine.info.load_s:.1f} s"
        )

    def _unload(self) -> None:
        self._files, self._stamp, self._changed = (), (), False
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        if self.embeddings is not None:
            self.embeddings.close()
            self.embeddings = None
        if self.engine is not None:
            self.engine.loaded.close()
            self.engine = None
