"""Stream a generation from a loaded model (inference.opening loads it) as typed events.

One generator, Engine.generate(), yields Piece(text) events as text becomes final
(PrefillProgress while a long prompt is read) and one Stats event at the end; the renderers and
JSON writers of the commands consume the same stream. The engine keeps track of what its KV cache
holds, so a chat turn only decodes the new suffix of the prompt.
"""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

from localrun.errors import NoSpace
from localrun.inference.events import PROGRESS_EVERY, Event, Notice, Piece, PrefillProgress, Speculation, Stats
from localrun.inference.prompt_cache import MIN_TOKENS, PromptCache
from localrun.inference.runtime import DecodeAborted, Loaded, common_prefix
from localrun.inference.sampling import SamplingOptions
from localrun.inference.speculative import Speculator
from localrun.inference.stops import StopMatcher
from localrun.inference.templates import ChatTemplate, Message
from localrun.inference.vocabulary import Part, holds_special, tokenize_parts

if TYPE_CHECKING:  # opening builds an Engine and imports this module
    from localrun.inference.opening import ModelInfo


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
        self.cached: list[int] = []  # the tokens the KV cache holds, in order
        self.speculator = speculator
        self.prompt_cache = prompt_cache

    def close(self) -> None:
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
    def _prefill(
        self, tokens: list[int], reusable: int = 0
    ) -> Generator[PrefillProgress | Notice, None, tuple[int, int]]:
        """Bring the KV cache to `tokens`, decoding only what differs from what it holds (at least
        the last token, for fresh logits): (tokens not decoded, of those read from disk). The
        first `reusable` tokens (what comes before the question) are loaded from the prompt
        cache when it has them, and saved to it when it does not. The decode runs in a worker
        thread so that Ctrl-C in the main thread (or thrown in by the consumer) aborts it."""
        self.ctx.clear_abort()
        # Always resync first: an interrupted turn may have left positions we did not record.
        reuse = min(common_prefix(self.cached, tokens), len(tokens) - 1)
        if not self.ctx.truncate(reuse):
            reuse = 0
        self.cached = self.cached[:reuse]
        cache = self.prompt_cache if reusable >= MIN_TOKENS and reusable < len(tokens) else None
        from_disk, save_at = 0, None
        notices: list[str] = []
        if cache is not None and reuse < reusable:
            if cache.load(self.ctx, tokens[:reusable], notices.append):
                reuse = from_disk = reusable
                self.cached = tokens[:reusable]
            else:  # a failed read may have cleared the context: nothing of it is trusted
                save_at, reuse, self.cached = reusable, 0, []
                self.ctx.truncate(0)
        for text in notices:
            yield Notice(text)
        todo = tokens[reuse:]
        failure: list[BaseException] = []
        done = threading.Event()

        def work() -> None:
            try:
                if save_at is not None:  # the reusable prefix, saved, then the rest
                    self.ctx.decode(tokens[reuse:save_at])
                    cache.save(self.ctx, tokens[:save_at])  # type: ignore[union-attr]
                    self.ctx.decode(tokens[save_at:])
                else:
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
        return reuse, from_disk

    def generate(
        self,
        prompt_tokens: list[int],
        sampling: SamplingOptions,
        max_tokens: int | None,
        stop: list[str],
        *,
        grammar: str | None = None,
        reusable: int = 0,
    ) -> Iterator[Event]:
        """Stream Piece events, then one Stats. max_tokens None: until the context is full.
        `grammar` (GBNF) constrains the reply; the first `reusable` prompt tokens may come from
        (and go to) the prompt cache. A KeyboardInterrupt raised in here, or thrown in by the
        consumer, ends it as 'cancelled'."""
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
        reused = from_disk = 0
        t_prefill = t_first = None
        generated, finish = 0, "length"
        spec = self.speculator
        drafted_before = (spec.stats.drafted, spec.stats.accepted) if spec else (0, 0)
        try:
            ctx.set_sampling(sampling, grammar)
            sampler = ctx.sampler
            reused, from_disk = yield from self._prefill(prompt_tokens, reusable)
            t_prefill = time.perf_counter()
            history = list(prompt_tokens)  # what drafts are looked up in: the prompt and the reply
            step = [sampler.sample(ctx, -1)]
            while finish == "length":
                for token in step:
                    generated += 1
                    history.append(token)
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
                if finish != "length" or generated >= limit:
                    break
                if spec is not None:
                    verified = spec.stats.verify_batches
                    step = spec.step(ctx, sampler, self.cached, step[-1], history, limit - generated)
                    if spec.stats.verify_batches != verified:
                        yield Speculation(
                            spec.stats.drafted - drafted_before[0], spec.stats.accepted - drafted_before[1]
                        )
                else:
                    ctx.decode([step[-1]])
                    self.cached.append(step[-1])
                    step = [sampler.sample(ctx, -1)]
            tail = matcher.flush() + decoder.decode(b"", final=True) if finish != "stop" else ""
            if tail:
                t_first = t_first or time.perf_counter()
                yield Piece(tail)
        except (KeyboardInterrupt, DecodeAborted):
            finish = "cancelled"
        t_end = time.perf_counter()
        gen_time = t_end - (t_prefill or t_end)
        drafted = spec.stats.drafted - drafted_before[0] if spec else 0
        accepted = spec.stats.accepted - drafted_before[1] if spec else 0
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
            from_disk=from_disk,
            drafted=drafted,
            accepted=accepted,
        )
