"""Load a model as planned (backing off when llama.cpp cannot allocate) and stream a generation
as typed events.

One generator, Engine.generate(), yields Piece(text) events as text becomes final
(PrefillProgress while a long prompt is read) and one Stats event at the end; the renderers and
JSON writers of the commands consume the same stream. It is the generation core's (scheduler.py)
one sequence, stepped from the caller's thread: what its KV cache holds is kept, so a chat turn
only decodes the new suffix of the prompt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from localrun.errors import NoSpace, UsageError
from localrun.fit import MIN_CTX, Plan
from localrun.hardware import default_threads
from localrun.inference import runtime
from localrun.inference.events import PROGRESS_EVERY, Event, PrefillProgress, Stats
from localrun.inference.prompt_cache import DEFAULT_LIMIT, PromptCache, kv_identity
from localrun.inference.runtime import DecodeAborted, Loaded, LoadOptions, common_prefix
from localrun.inference.sampler import Sampler
from localrun.inference.sampling import SamplingOptions
from localrun.inference.scheduler import Scheduler
from localrun.inference.sequence import Failed, Request, Sequence, Update
from localrun.inference.speculative import K_MAX, LookupDrafter, Mode, ModelDrafter, Speculator
from localrun.inference.templates import ChatTemplate, Message
from localrun.inference.vocabulary import Part, holds_special, tokenize_parts
from localrun.model.files import ModelFiles
from localrun.text import safe


@dataclass
class EngineConfig:
    n_ctx: int | None = None  # None: the fit planner's choice
    n_gpu_layers: int | None = None  # None: the fit planner's choice
    n_threads: int | None = None
    verbose: bool = False
    speculate: Mode = "auto"  # drafts verified in batches: auto (when it pays), lookup, draft, off
    draft: ModelFiles | None = None  # a draft model for speculative decoding (same vocabulary)
    prompt_cache: bool = True  # keep and reuse the KV state of a prompt's reusable prefix on disk
    prompt_cache_size: int = DEFAULT_LIMIT
    type_k: str = "f16"  # KV cache types
    type_v: str = "f16"
    flash_attn: bool | None = None  # None: llama.cpp decides


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

    @classmethod
    def of(cls, model: ModelFiles, loaded: Loaded, n_gpu: int, threads: int, started: float) -> ModelInfo:
        """What was loaded (since `started`), as commands name it."""
        name = loaded.model.meta("general.name") or model.path.stem
        elapsed = time.perf_counter() - started
        n_ctx, trained = loaded.ctx.n_ctx, loaded.model.n_ctx_train
        return cls(model.path, model.label, model.quant, name, n_ctx, trained, n_gpu, threads, elapsed)

    def timings(self) -> dict[str, float]:
        return {"resolve_s": round(self.resolve_s, 4), "plan_s": round(self.plan_s, 4), "load_s": round(self.load_s, 4)}


class Engine:
    """A loaded model and context; generate() streams events, reuses the KV cache (from the last
    turn, or from disk), and drafts and verifies when that pays (speculative decoding)."""

    def __init__(
        self,
        loaded: Loaded,
        info: ModelInfo,
        speculator: Speculator | None = None,
        prompt_cache: PromptCache | None = None,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.ctx = loaded.ctx
        self.info = info
        self.speculator = speculator
        self.prompt_cache = prompt_cache
        self.scheduler = Scheduler(loaded, 1, speculator=speculator, prompt_cache=prompt_cache)

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
                n_outputs=1 if cfg.speculate == "off" else K_MAX + 1,  # a verify batch's logits rows
                type_k=cfg.type_k,
                type_v=cfg.type_v,
                flash_attn=cfg.flash_attn,
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
        info = ModelInfo.of(model, loaded, n_gpu, threads, started)
        info.notes = notes
        try:
            speculator = _speculator(loaded, opts, cfg, notify)
        except BaseException:
            loaded.close()
            raise
        cache = None
        if cfg.prompt_cache:
            cache = PromptCache(kv_identity(model.files, opts), model.label, cfg.prompt_cache_size)
        return cls(loaded, info, speculator, cache)

    def close(self) -> None:
        self.scheduler.close()
        if self.speculator is not None:
            self.speculator.close()
        self.loaded.close()

    # -- vocabulary ------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Tokens of rendered text. Special tokens written in it are parsed; a BOS the text
        already starts with is not doubled."""
        return self._with_bos(self.model.tokenize(text, add_special=False, parse_special=True), add_bos)

    def tokenize_parts(self, parts: list[Part]) -> list[int]:
        """Tokens of a prompt cut into markup and contents: special tokens come from the markup
        only, a content is read as text whatever it writes (see vocabulary)."""
        if not any(content and holds_special(self.model, text) for text, content in parts):
            return self.tokenize("".join(text for text, _ in parts))
        return self._with_bos(tokenize_parts(self.model, parts), True)

    def chat_tokens(self, template: ChatTemplate, messages: list[Message]) -> list[int]:
        """The prompt of a conversation: the messages through the template, each content read as
        text (rendered twice, to find the contents, only when one writes a special token)."""
        if not any(holds_special(self.model, m["content"]) for m in messages):
            return self.tokenize(template.render(messages))
        return self._with_bos(tokenize_parts(self.model, template.render_parts(messages)), True)

    def reusable(self, text: str, last: str, tokens: list[int], keep: int = 0) -> int:
        """How many of a prompt's `tokens` (the rendered `text`) come before its last message
        `last` (and the first `keep` characters of it: piped material) -- what the prompt cache
        keeps: the template's preamble, the system prompt, the material. 0 when the template
        changed the message beyond recognition."""
        start = text.rfind(last)
        if start < 0:
            return 0
        return common_prefix(self.tokenize(text[: start + keep]), tokens[:-1])

    def _with_bos(self, tokens: list[int], add_bos: bool) -> list[int]:
        lc, vocab = self.model._lc, self.model.vocab
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
    @property
    def cached(self) -> list[int]:
        """The tokens the KV cache holds, in order."""
        return self.scheduler.sequences[0].cached

    @cached.setter
    def cached(self, tokens: list[int]) -> None:
        """What the next prompt may reuse (an empty list: nothing, a cold start)."""
        seq = self.scheduler.sequences[0]
        seq.cached = list(tokens)
        seq.confirmed = min(seq.confirmed, len(tokens))

    def generate(
        self,
        prompt_tokens: list[int],
        sampling: SamplingOptions,
        max_tokens: int | None,
        stop: list[str],
        *,
        grammar: str | None = None,
        reusable: int = 0,
        top_logprobs: int | None = None,
    ) -> Iterator[Event]:
        """Stream Piece events, then one Stats: the scheduler's one sequence, stepped from this
        thread. max_tokens None: until the context is full. `grammar` (GBNF) constrains the
        reply; the first `reusable` prompt tokens may come from (and go to) the prompt cache;
        `top_logprobs` (0 or more alternatives) adds each token's log-probability to the Pieces.
        A KeyboardInterrupt raised in here, or thrown in by the consumer, ends it as 'cancelled'."""
        n_prompt = len(prompt_tokens)
        if n_prompt >= self.n_ctx:
            raise NoSpace(
                f"the prompt ({n_prompt} tokens) does not fit in the context ({self.n_ctx})",
                hint="use a larger --ctx or a shorter prompt",
            )
        room = self.n_ctx - n_prompt
        limit = room if max_tokens is None or max_tokens < 0 else min(room, max_tokens)
        sampler = Sampler(self.model, sampling, grammar, n_ctx=self.n_ctx)
        updates: list[Update] = []
        request = Request(prompt_tokens, sampler, limit, room, stop, updates.append, top_logprobs, reusable)
        core, seq = self.scheduler, self.scheduler.sequences[0]
        self.ctx.clear_abort()
        try:
            core.assign(request)
            while True:
                try:
                    if seq.request is request:
                        if seq.reading:
                            yield from self._read(seq)
                        else:
                            core.step()
                    core.flush()
                    while updates:
                        update = updates.pop(0)
                        if isinstance(update, Failed):
                            if not isinstance(update.error, DecodeAborted):
                                raise update.error
                            update = update.stats
                        yield update
                        if isinstance(update, Stats):
                            return
                except KeyboardInterrupt:
                    if seq.request is request:
                        seq.rewind(self.ctx)
                        seq.cancel()
        finally:
            if seq.request is request:  # the consumer closed the stream
                seq.rewind(self.ctx)
                seq.cancel()
                core.outbox.clear()
            sampler.close()

    def _read(self, seq: Sequence) -> Iterator[PrefillProgress]:
        """One step of reading the prompt, in a worker thread so that Ctrl-C in this one (or thrown
        in by the consumer) aborts it; progress while it runs."""
        done = threading.Event()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.scheduler.step()
            except BaseException as exc:  # handed to this thread
                failure.append(exc)
            finally:
                done.set()

        # Wait on an Event, not Thread.join: a join interrupted by Ctrl-C marks a running thread
        # as stopped (Python < 3.13), and we must never free the context under a running decode.
        request = seq.request
        assert request is not None
        threading.Thread(target=work, name="localrun-prefill", daemon=True).start()
        try:
            while not done.wait(PROGRESS_EVERY):
                todo = len(request.prompt) - seq.reused
                yield PrefillProgress(todo, seq.reused, time.perf_counter() - request.submitted)
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


def _speculator(
    loaded: Loaded, opts: LoadOptions, cfg: EngineConfig, notify: Callable[[str], None]
) -> Speculator | None:
    """What speculative decoding can use with this model: prompt lookup, and a draft model when
    given one of the same vocabulary. None when it is off, or the cache cannot rewind."""
    if cfg.speculate == "off":
        return None
    lc = loaded.model._lc
    if lc.llama_model_is_recurrent(loaded.model.ptr) or lc.llama_model_is_hybrid(loaded.model.ptr):
        if cfg.speculate != "auto" or cfg.verbose:  # asked for by name: say why it is not there
            notify("speculative decoding is off: this model's state cannot rewind a rejected draft")
        return None
    drafters: list = []
    if cfg.speculate in ("auto", "lookup"):
        drafters.append(LookupDrafter())
    if cfg.draft is not None and cfg.speculate in ("auto", "draft"):
        draft_opts = LoadOptions(
            n_gpu_layers=0,  # on the CPU: the planner counted it there (commands.loading)
            n_ctx=opts.n_ctx,
            n_threads=opts.n_threads,
            use_extra_bufts=opts.use_extra_bufts,
            verbose=opts.verbose,
        )
        draft = runtime.load(cfg.draft.path, draft_opts)
        if draft.model.vocab_fingerprint() != loaded.model.vocab_fingerprint():
            draft.close()
            raise UsageError(
                f"the draft model {safe(cfg.draft.label)} has another vocabulary than the model",
                hint="a draft model must share the vocabulary (the same family, a smaller size)",
            )
        drafters.append(ModelDrafter(draft.model, draft.ctx))
    return Speculator(cfg.speculate, drafters) if drafters else None
