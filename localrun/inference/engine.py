"""Stream a generation from a loaded model (inference.opening loads it) as typed events.

One generator, Engine.generate(), yields Piece(text) events as text becomes final
(PrefillProgress while a long prompt is read) and one Stats event at the end; the renderers and
JSON writers of the commands consume the same stream. It is the generation core's (scheduler.py)
one sequence, stepped from the caller's thread: what its KV cache holds is kept, so a chat turn
only decodes the new suffix of the prompt.
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localrun.errors import NoSpace
from localrun.inference.generation.events import PROGRESS_EVERY, Event, PrefillProgress, Stats
from localrun.inference.generation.prompt_cache import PromptCache
from localrun.inference.generation.sampler import Sampler
from localrun.inference.generation.scheduler import Scheduler
from localrun.inference.generation.sequence import Failed, Request, Sequence, Update, Watch
from localrun.inference.generation.settings import SamplingOptions
from localrun.inference.generation.speculative import Speculator
from localrun.inference.llama.interrupt import Interruptible
from localrun.inference.llama.runtime import DecodeAborted, LlamaModel, Loaded, common_prefix
from localrun.inference.llama.vocabulary import Part, holds_special, tokenize_parts
from localrun.inference.prompting.families import ReasoningFormat
from localrun.inference.prompting.reasoning_watch import ReasoningWatch
from localrun.inference.prompting.templates import ChatTemplate, Message
from localrun.model.files import ModelFiles


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
        self._scheduler: Scheduler | None = None  # made when first asked to generate
        self._interruptible = Interruptible(self.ctx.abort)

    def close(self) -> None:
        self._interruptible.close()
        if self._scheduler is not None:
            self._scheduler.close()
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

    def chat_tokens(self, template: ChatTemplate, messages: list[Message], **context: Any) -> list[int]:
        """The prompt of a conversation: the messages through the template (with `context`: tools,
        the template's switches), each content read as text (rendered twice, to find the contents,
        only when one writes a special token)."""
        if not any(holds_special(self.model, m["content"]) for m in messages):
            return self.tokenize(template.render(messages, **context))
        return self._with_bos(tokenize_parts(self.model, template.render_parts(messages, **context)), True)

    def reasoning_watch(self, fmt: ReasoningFormat, *, opened: bool, budget: int | None) -> ReasoningWatch:
        """What follows a reply's reasoning in the core: counts its tokens, and forces the format's
        closing marker (its tokens in this vocabulary) after `budget` of them."""
        closing = self.model.tokenize_inside(fmt.closing)
        return ReasoningWatch(fmt, starts_in_reasoning=opened, budget=budget, closing=closing)

    def special_tokens(self) -> SpecialTokens:
        """The vocabulary's control tokens, for a text to be looked up in."""
        return SpecialTokens(self.model)

    def prefix_length(self, text: str, last: str, tokens: list[int], keep: int = 0) -> int:
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

    @property
    def scheduler(self) -> Scheduler:
        """The generation core with this engine's one sequence (made on first use: a server's
        engine only tokenizes, its loop owns the context's scheduler)."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self.loaded, 1, speculator=self.speculator, prompt_cache=self.prompt_cache)
        return self._scheduler

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
        triggers: tuple[str, ...] = (),
        cached_prefix: int = 0,
        top_logprobs: int | None = None,
        watch: Watch | None = None,
    ) -> Iterator[Event]:
        """Stream Piece events, then one Stats: the scheduler's one sequence, stepped from this
        thread. max_tokens None: until the context is full. `grammar` (GBNF) constrains the
        reply (lazily, from a match of one of `triggers`, when given); the first `cached_prefix` prompt tokens may come from (and go to) the prompt cache;
        `top_logprobs` (0 or more alternatives) adds each token's log-probability to the Pieces;
        `watch` follows the text (a thinking model's reasoning, counted and held to its budget).
        A KeyboardInterrupt raised in here, or thrown in by the consumer, ends it as 'cancelled'."""
        n_prompt = len(prompt_tokens)
        if n_prompt >= self.n_ctx:
            raise NoSpace(
                f"the prompt ({n_prompt} tokens) does not fit in the context ({self.n_ctx})",
                hint="use a larger --ctx or a shorter prompt",
            )
        room = self.n_ctx - n_prompt
        limit = room if max_tokens is None or max_tokens < 0 else min(room, max_tokens)
        sampler = Sampler(self.model, sampling, grammar, n_ctx=self.n_ctx, triggers=triggers)
        updates: list[Update] = []
        request = Request(
            prompt_tokens, sampler, limit, room, stop, updates.append, top_logprobs, cached_prefix, watch=watch
        )
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
        """One step of reading the prompt (up to a batch of it), on this thread: every decode of
        a reply is then made from one thread, as a plain loop makes them (read on a thread of its
        own, a 256-token prompt took 3-8% longer in bench_engine: llama.cpp's OpenMP workers belong
        to the thread that calls it). Progress comes before a step when more follow or the reading
        has taken a while; Ctrl-C aborts the decode in progress (Interruptible)."""
        request = seq.request
        assert request is not None
        elapsed = time.perf_counter() - request.submitted
        if len(request.prompt) - len(seq.cached) > self.ctx.n_batch or elapsed >= PROGRESS_EVERY:
            yield PrefillProgress(len(request.prompt) - seq.reused, seq.reused, elapsed)
        with self._interruptible:
            self.scheduler.step()


class SpecialTokens(Container[str]):
    """The vocabulary's control tokens, as a chat format's markers are asked after: a text is one
    when it is a single control token (looked up, never listed: a 262k vocabulary takes 0.15 s)."""

    def __init__(self, model: LlamaModel):
        self._model = model

    def __contains__(self, text: object) -> bool:
        if not isinstance(text, str):
            return False
        tokens = self._model.tokenize(text, add_special=False, parse_special=True)
        return len(tokens) == 1 and self._model.is_control(tokens[0])
