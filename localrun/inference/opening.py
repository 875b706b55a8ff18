"""Opening a model for generation, written once for run, chat and serve: llama.cpp's load with the
back-off (fewer GPU layers, then a smaller context where the caller allows it), the engine with
its speculator and prompt cache, and the chat template.

What a back-off changed comes back as typed notes (localrun.notes) and is said through `notify`
as it happens; nothing here prints."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from localrun import fit
from localrun.errors import NoSpace, UsageError
from localrun.fit import MIN_CTX, Plan
from localrun.hardware import default_threads
from localrun.inference.embedding import Embedder, embedding_options
from localrun.inference.engine import Engine, ModelInfo
from localrun.inference.generation.prompt_cache import DEFAULT_LIMIT, PromptCache, kv_identity
from localrun.inference.generation.speculative import K_MAX, LookupDrafter, Mode, ModelDrafter, Speculator
from localrun.inference.llama import runtime
from localrun.inference.llama.runtime import Loaded, LoadOptions
from localrun.inference.prompting import templates
from localrun.inference.prompting.templates import ChatTemplate
from localrun.model.files import ModelFiles
from localrun.notes import Note, context_rounded, load_context_reduced, load_gpu_reduced
from localrun.text import safe

Notify = Callable[[str], None]


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

    @property
    def logits_rows(self) -> int:
        """Logits rows one decode may return: one, or a speculative verify batch's K_MAX + 1."""
        return 1 if self.speculate == "off" else K_MAX + 1

    @property
    def shape(self) -> fit.Shape:
        """The context these options ask for, as the planner counts it."""
        return fit.Shape(self.type_k, self.type_v, self.flash_attn, self.logits_rows)


@dataclass
class Opened:
    """A model loaded by load_backing_off: the options it was loaded with in the end, and what
    backing off changed."""

    loaded: Loaded
    opts: LoadOptions
    notes: list[Note]


def load_backing_off(
    path: Path,
    opts: LoadOptions,
    notify: Notify,
    *,
    shrink_ctx: bool = True,
    progress: Callable[[float], None] | None = None,
) -> Opened:
    """Load with `opts`; when llama.cpp cannot allocate, halve the GPU layers down to none, then
    (with `shrink_ctx`) the context down to fit.MIN_CTX, saying each step through `notify`."""
    notes: list[Note] = []
    while True:
        try:
            loaded = runtime.load(path, opts, progress)
            break
        except NoSpace:
            n_gpu, n_ctx = opts.n_gpu_layers, opts.n_ctx
            if n_gpu > 0:
                notify(f"could not allocate with {n_gpu} GPU layers; retrying with {n_gpu // 2}")
                notes.append(load_gpu_reduced(n_gpu, n_gpu // 2))
                opts = replace(opts, n_gpu_layers=n_gpu // 2)
            elif shrink_ctx and n_ctx > MIN_CTX:
                smaller = max(MIN_CTX, n_ctx // 2)
                notify(f"could not allocate a context of {n_ctx} tokens; retrying with {smaller}")
                notes.append(load_context_reduced(n_ctx, smaller))
                opts = replace(opts, n_ctx=smaller)
            else:
                raise
    if loaded.ctx.n_ctx != opts.n_ctx:
        rounded = context_rounded(opts.n_ctx, loaded.ctx.n_ctx)
        notify(rounded.text)
        notes.append(rounded)
    return Opened(loaded, opts, notes)


def load_engine(
    model: ModelFiles,
    plan: Plan,
    cfg: EngineConfig,
    notify: Notify = lambda message: None,
    progress: Callable[[float], None] | None = None,
) -> Engine:
    """Load `model` with the planned GPU layers and context (explicit options win), backing off
    when llama.cpp cannot allocate; with a speculator and the prompt cache as `cfg` asks."""
    threads = cfg.n_threads or default_threads()
    started = time.perf_counter()
    opts = LoadOptions(
        n_gpu_layers=cfg.n_gpu_layers if cfg.n_gpu_layers is not None else plan.n_gpu_layers,
        n_ctx=cfg.n_ctx if cfg.n_ctx is not None else plan.n_ctx,
        n_threads=threads,
        use_extra_bufts=plan.extra_bufts,
        verbose=cfg.verbose,
        n_outputs=cfg.logits_rows,
        type_k=cfg.type_k,
        type_v=cfg.type_v,
        flash_attn=cfg.flash_attn,
        rpc=plan.rpc,
        tensor_split=plan.tensor_split if cfg.n_gpu_layers is None else (),
    )
    opened = load_backing_off(model.path, opts, notify, progress=progress)
    loaded, opts = opened.loaded, opened.opts
    info = ModelInfo.of(model, loaded, opts.n_gpu_layers, threads, started)
    info.notes = [note.text for note in opened.notes]
    try:
        speculator = speculator_for(loaded, cfg.speculate, cfg.draft, notify)
    except BaseException:
        loaded.close()
        raise
    return Engine(loaded, info, speculator, prompt_cache_for(model, loaded, cfg))


def load_embedder(
    model: ModelFiles,
    plan: Plan,
    cfg: EngineConfig,
    max_tokens: int,
    notify: Notify = lambda message: None,
    progress: Callable[[float], None] | None = None,
) -> Embedder:
    """Load `model` for embeddings alone (an embedding context, no generation context), with the
    planned GPU layers (explicit options win), backing off on them when llama.cpp cannot allocate."""
    base = LoadOptions(
        n_gpu_layers=cfg.n_gpu_layers if cfg.n_gpu_layers is not None else plan.n_gpu_layers,
        n_threads=cfg.n_threads or default_threads(),
        use_extra_bufts=plan.extra_bufts,
        verbose=cfg.verbose,
        flash_attn=cfg.flash_attn,
    )
    opened = load_backing_off(
        model.path, embedding_options(base, max_tokens), notify, shrink_ctx=False, progress=progress
    )
    return Embedder.of(opened.loaded, max_tokens)


def choose_template(
    engine: Engine, chat_format: str | None, template_file: Path | None, notify: Notify
) -> ChatTemplate:
    """The loaded model's chat template: --template FILE, else --chat-format NAME, else its own,
    else a built-in format guessed from its vocabulary (said through `notify`)."""
    return templates.choose(
        engine.chat_template(),
        chat_format=chat_format,
        template_file=template_file,
        has_token=engine.has_token,
        bos_token=engine.special_text("bos"),
        eos_token=engine.special_text("eos"),
        notify=notify,
    )


def prompt_cache_for(model: ModelFiles, loaded: Loaded, cfg: EngineConfig) -> PromptCache | None:
    """The prompt cache of this model and context, when `cfg` asks for it."""
    if not cfg.prompt_cache:
        return None
    return PromptCache(kv_identity(model.files, loaded.opts), model.label, cfg.prompt_cache_size)


def speculator_for(loaded: Loaded, mode: Mode, draft: ModelFiles | None, notify: Notify) -> Speculator | None:
    """What speculative decoding can use with this model: prompt lookup, and a draft model when
    given one of the same vocabulary (its context has as many sequences as the model's). None
    when it is off, or the cache cannot rewind."""
    if mode == "off":
        return None
    opts = loaded.opts
    lc = loaded.model._lc
    if lc.llama_model_is_recurrent(loaded.model.ptr) or lc.llama_model_is_hybrid(loaded.model.ptr):
        if mode != "auto" or opts.verbose:  # asked for by name: say why it is not there
            notify("speculative decoding is off: this model's state cannot rewind a rejected draft")
        return None
    drafters: list = []
    if mode in ("auto", "lookup"):
        drafters.append(LookupDrafter())
    if draft is not None and mode in ("auto", "draft"):
        # on the CPU (the planner counted it there: commands.loading; no worker), one logits row, f16
        # cells; the target's context, batch, sequences and threads
        draft_opts = replace(
            opts, n_gpu_layers=0, n_outputs=1, type_k="f16", type_v="f16", flash_attn=None, rpc=(), tensor_split=()
        )
        drafting = runtime.load(draft.path, draft_opts)
        if drafting.model.vocab_fingerprint() != loaded.model.vocab_fingerprint():
            drafting.close()
            raise UsageError(
                f"the draft model {safe(draft.label)} has another vocabulary than the model",
                hint="a draft model must share the vocabulary (the same family, a smaller size)",
            )
        drafters.append(ModelDrafter(drafting.model, drafting.ctx, opts.n_seq_max))
    return Speculator(mode, drafters) if drafters else None
