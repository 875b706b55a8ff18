"""Load a model as planned (backing off when llama.cpp cannot allocate) and stream a generation
as typed events.

One generator, Engine.generate(), yields Piece(text) events as text becomes final
(PrefillProgress while a long prompt is read) and one Stats event at the end; the renderers and
JSON writers of the commands consume the same stream. The engine keeps track of what its KV cache
holds, so a chat turn only decodes the new suffix of the prompt.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from localrun.errors import NoSpace
from localrun.fit import MIN_CTX, Plan
from localrun.hardware import default_threads
from localrun.inference import runtime
from localrun.inference.runtime import DecodeAborted, Loaded, LoadOptions
from localrun.inference.sampling import SamplingOptions
from localrun.inference.stops import StopMatcher
from localrun.model.files import ModelFiles

FinishReason = Literal["eog", "stop", "length", "cancelled"]


@dataclass
class EngineConfig:
    n_ctx: int | None = None  # None: the fit planner's choice
    n_gpu_layers: int | None = None  # None: the fit planner's choice
    n_threads: int | None = None
    verbose: bool = False


@dataclass
class Piece:
    text: str
    kind: str = "piece"


@dataclass
class Stats:
    prompt_tokens: int  # tokens in the prompt
    prompt_tps: float | None  # prefill speed over the tokens decoded (not cached); None: not read to the end
    generated_tokens: int
    gen_tps: float
    ttft_s: float | None  # from generate() to the first piece of text; None: no text came
    total_s: float
    finish_reason: FinishReason  # end-of-generation token, a stop string, max tokens or context, Ctrl-C
    cached_tokens: int = 0  # prompt tokens reused from the KV cache of the previous turn
    context_full: bool = False  # "length" because the context had no room left, not max_tokens
    kind: str = "stats"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PrefillProgress:
    """While a long prompt is processed (every PROGRESS_EVERY seconds), for live displays."""

    prompt_tokens: int  # being decoded
    cached_tokens: int
    elapsed_s: float
    kind: str = "progress"


PROGRESS_EVERY = 0.2

Event = Piece | PrefillProgress | Stats


@dataclass
class ModelInfo:
    path: Path
    label: str  # org/repo:QUANT, or the path of a local file: what was loaded, as commands name it
    quant: str | None
    name: str  # general.name from the file
    n_ctx: int
    n_ctx_train: int
    n_gpu_layers: int
    n_threads: int
    load_s: float  # llama.cpp: weights and context
    plan_s: float = 0.0  # reading the header and planning GPU layers and context
    resolve_s: float = 0.0  # finding (or pulling) and validating the file
    notes: list[str] = field(default_factory=list)

    def timings(self) -> dict[str, float]:
        return {"resolve_s": round(self.resolve_s, 4), "plan_s": round(self.plan_s, 4), "load_s": round(self.load_s, 4)}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """A loaded model and context; generate() streams events and reuses the KV cache."""

    def __init__(self, loaded: Loaded, info: ModelInfo):
        self.loaded = loaded
        self.model = loaded.model
        self.ctx = loaded.ctx
        self.info = info
        self.cached: list[int] = []  # the tokens the KV cache holds, in order

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        model: ModelFiles,
        plan: Plan,
        cfg: EngineConfig,
        notify: Callable[[str], None] = lambda message: None,
        progress: Callable[[float], None] | None = None,
    ) -> Engine:
        """Load `model` with the planned GPU layers and context (explicit options win); back off
        (fewer GPU layers, then a smaller context) when llama.cpp cannot allocate, and say so."""
        n_ctx = cfg.n_ctx if cfg.n_ctx is not None else plan.n_ctx
        n_gpu = cfg.n_gpu_layers if cfg.n_gpu_layers is not None else plan.n_gpu_layers
        threads = cfg.n_threads or default_threads()
        notes: list[str] = []
        started = time.perf_counter()
        while True:
            opts = LoadOptions(
                n_gpu_layers=n_gpu,
                n_ctx=n_ctx,
                n_threads=threads,
                use_extra_bufts=plan.extra_bufts,
                verbose=cfg.verbose,
            )
            try:
                loaded = runtime.load(model.path, opts, progress)
                break
            except NoSpace:
                if n_gpu > 0:
                    step = n_gpu // 2
                    notify(f"could not allocate with {n_gpu} GPU layers; retrying with {step}")
                    notes.append(f"GPU layers reduced from {n_gpu} to {step} to fit")
                    n_gpu = step
                elif n_ctx > MIN_CTX:
                    smaller = max(MIN_CTX, n_ctx // 2)
                    notify(f"could not allocate a context of {n_ctx} tokens; retrying with {smaller}")
                    notes.append(f"context reduced from {n_ctx} to {smaller} to fit")
                    n_ctx = smaller
                else:
                    raise
        if loaded.ctx.n_ctx != n_ctx:
            note = f"context {n_ctx} became {loaded.ctx.n_ctx}: llama.cpp sizes it in steps of 256 tokens"
            notify(note)
            notes.append(note)
        name = loaded.model.meta("general.name") or model.path.stem
        info = ModelInfo(
            model.path,
            model.label,
            model.quant,
            name,
            loaded.ctx.n_ctx,
            loaded.model.n_ctx_train,
            n_gpu,
            threads,
            time.perf_counter() - started,
            notes=notes,
        )
        return cls(loaded, info)

    def close(self) -> None:
        self.loaded.close()

    # -- vocabulary ------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Tokens of rendered text. Special tokens written in it are parsed; a BOS the text
        already starts with is not doubled."""
        lc, vocab = self.model._lc, self.model.vocab
        tokens = self.model.tokenize(text, add_special=False, parse_special=True)
        bos = lc.llama_vocab_bos(vocab)
        if add_bos and bos >= 0 and lc.llama_vocab_get_add_bos(vocab) and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    def token_text(self, token: int) -> str:
        raw = self.model._lc.llama_vocab_get_text(self.model.vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    def special_text(self, which: str) -> str:
        """The text of the BOS or EOS token ("" when the model has none)."""
        lc = self.model._lc
        token = lc.llama_vocab_bos(self.model.vocab) if which == "bos" else lc.llama_vocab_eos(self.model.vocab)
        return self.token_text(token) if token >= 0 else ""

    def has_token(self, text: str) -> bool:
        """Whether `text` is one token of the vocabulary (used to guess a chat format)."""
        return len(self.model.tokenize(text, add_special=False, parse_special=True)) == 1

    def chat_template(self) -> str | None:
        return self.model.chat_template()

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    # -- generation ------------------------------------------------------------------------------
    def _prefill(self, tokens: list[int]) -> Generator[PrefillProgress, None, int]:
        """Bring the KV cache to `tokens`, decoding only what differs from what it holds (at least
        the last token, for fresh logits); returns how many were reused, yielding Progress while
        it works. The decode runs in a worker thread so that Ctrl-C in the main thread (or thrown
        in by the consumer) can abort a long prompt."""
        self.ctx.clear_abort()
        # Always resync first: an interrupted turn may have left positions we did not record.
        reuse = min(_common_prefix(self.cached, tokens), len(tokens) - 1)
        if not self.ctx.truncate(reuse):
            reuse = 0
        self.cached = self.cached[:reuse]
        todo = tokens[reuse:]
        failure: list[BaseException] = []
        done = threading.Event()

        def work() -> None:
            try:
                self.ctx.decode(todo)
            except BaseException as exc:  # handed to the main thread
                failure.append(exc)
            finally:
                done.set()

        # Wait on an Event, not Thread.join: a join interrupted by Ctrl-C marks a running thread
        # as stopped (Python < 3.13), and we must never free the context under a running decode.
        started = time.perf_counter()
        threading.Thread(target=work, name="localrun-prefill", daemon=True).start()
        try:
            while not done.wait(PROGRESS_EVERY):
                yield PrefillProgress(len(todo), reuse, time.perf_counter() - started)
        except BaseException:  # Ctrl-C, or the consumer closed the stream
            self.ctx.abort()
            while not done.is_set():
                try:
                    done.wait()
                except KeyboardInterrupt:
                    pass
            raise
        if failure:
            raise failure[0]
        self.cached = list(tokens)
        return reuse

    def generate(
        self, prompt_tokens: list[int], sampling: SamplingOptions, max_tokens: int | None, stop: list[str]
    ) -> Iterator[Event]:
        """Stream Piece events, then one Stats. max_tokens None: until the context is full.
        A KeyboardInterrupt raised in here, or thrown in by the consumer, ends it as 'cancelled'."""
        t0 = time.perf_counter()
        n_prompt = len(prompt_tokens)
        if n_prompt >= self.n_ctx:
            raise NoSpace(
                f"the prompt ({n_prompt} tokens) does not fit in the context ({self.n_ctx})",
                hint="use a larger --ctx or a shorter prompt",
            )
        ctx, model = self.ctx, self.model
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        matcher = StopMatcher(stop)
        room = self.n_ctx - n_prompt
        limit = room if max_tokens is None or max_tokens < 0 else min(room, max_tokens)
        reused, t_prefill, t_first = 0, None, None
        generated, finish = 0, "length"
        try:
            ctx.set_sampling(sampling)
            reused = yield from self._prefill(prompt_tokens)
            t_prefill = time.perf_counter()
            while generated < limit:
                token = ctx.sample()
                generated += 1
                if model.is_eog(token):
                    finish = "eog"
                    break
                text, stopped = matcher.feed(decoder.decode(model.piece(token, special=True)))
                if text:
                    if t_first is None:
                        t_first = time.perf_counter()
                    yield Piece(text)
                if stopped:
                    finish = "stop"
                    break
                if generated >= limit:
                    break
                ctx.decode([token])
                self.cached.append(token)
            tail = matcher.flush() + decoder.decode(b"", final=True) if finish != "stop" else ""
            if tail:
                t_first = t_first or time.perf_counter()
                yield Piece(tail)
        except (KeyboardInterrupt, DecodeAborted):
            finish = "cancelled"
        t_end = time.perf_counter()
        gen_time = t_end - (t_prefill or t_end)
        yield Stats(
            prompt_tokens=n_prompt,
            prompt_tps=(n_prompt - reused) / (t_prefill - t0) if t_prefill and t_prefill > t0 else None,
            generated_tokens=generated,
            gen_tps=generated / gen_time if gen_time > 0 and generated else 0.0,
            ttft_s=t_first - t0 if t_first else None,
            total_s=t_end - t0,
            finish_reason=finish,
            cached_tokens=reused,
            context_full=finish == "length" and generated >= room,
        )


class EventSink(Protocol):
    """Whatever shows or collects a generation: a live renderer, a JSON writer, a server stream."""

    def piece(self, text: str) -> None: ...
    def progress(self, event: PrefillProgress) -> None: ...
    def finish(self, stats: Stats) -> None: ...


def drive(events: Iterable[Event], sink: EventSink) -> Stats:
    """Feed events to a sink. Ctrl-C while rendering is thrown into the generator, which
    ends the reply as 'cancelled'; the Stats are returned either way."""
    it = iter(events)
    stats: Stats | None = None
    try:
        for event in it:
            if isinstance(event, Piece):
                sink.piece(event.text)
            elif isinstance(event, PrefillProgress):
                sink.progress(event)
            else:
                stats = event
    except KeyboardInterrupt:
        try:
            event = it.throw(KeyboardInterrupt)  # type: ignore[attr-defined]
            stats = event if isinstance(event, Stats) else None
        except (KeyboardInterrupt, StopIteration):
            stats = None
        if stats is None:
            stats = Stats(0, None, 0, 0.0, None, 0.0, "cancelled")
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    assert stats is not None, "the engine always ends a stream with Stats"
    sink.finish(stats)
    return stats
