"""A thin, typed layer over llama.cpp's public C API (llama_cpp's ctypes bindings).

We use the low-level API rather than llama_cpp.Llama because we need model parameters the
high-level class does not expose (use_extra_bufts, for CPUs whose AMX path crashes), exact
control over batching and cancellation, and per-token timing without overhead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localrun.errors import BadModel, LocalrunError, NoSpace, UsageError
from localrun.fit import CELL_PAD, UBATCH
from localrun.hardware import default_threads
from localrun.inference.llama import rpc
from localrun.inference.llama.build import llama
from localrun.inference.llama.log import install as install_log
from localrun.inference.llama.log import last_error, recent
from localrun.inference.llama.threads import interruptibly

# ggml.h's `enum ggml_type` ids of the KV cache types (fixed: GGUF files store them). The gguf
# package has the whole table, but importing it costs a one-shot run more than its answer.
GGML_KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}


def ggml_type(name: str) -> int:
    """The ggml type id of a KV cache type name (f16, q8_0, ...)."""
    try:
        return GGML_KV_TYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown KV cache type {name!r}", hint="use f16, q8_0 or q4_0") from None


def padded_ctx(n_ctx: int) -> int:
    """The context llama.cpp really makes for `n_ctx` tokens (a multiple of 256)."""
    return max(CELL_PAD, -(-n_ctx // CELL_PAD) * CELL_PAD)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share (what a KV cache holding `a` keeps for `b`)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DecodeAborted(Exception):
    """llama_decode stopped early because abort() was called (from another thread or a signal)."""


@dataclass
class LoadOptions:
    n_gpu_layers: int = 0
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int | None = None
    # Whether the AMX/repack buffer types may be used: the planner's (machine.this_machine, from
    # the self-test's verdict on this build and CPU). False, the safe path, unless told.
    use_extra_bufts: bool = False
    use_mmap: bool = True
    logits_all: bool = False  # keep logits for every position (perplexity, KL divergence)
    flash_attn: bool | None = None  # None: llama.cpp decides
    verbose: bool = False
    n_outputs: int = 1  # logits rows one decode may return (a verify batch, one per parallel slot)
    n_seq_max: int = 1  # sequences sharing the context (parallel slots)
    kv_unified: bool = False  # one KV buffer for every sequence (slots take what they need)
    type_k: str = "f16"  # KV cache types: f16, q8_0, q4_0 (see fit.KV_TYPES)
    type_v: str = "f16"
    # An embedding context: every token's hidden state pooled per sequence (a decode holds whole
    # sequences: one micro-batch of n_batch tokens, each an output). pooling: a llama_pooling_type,
    # or None for the model's own from its GGUF, mean where it names none (a generative model).
    embeddings: bool = False
    pooling: int | None = None
    rpc: tuple[str, ...] = ()  # workers' endpoints (HOST:PORT) whose devices may take layers
    tensor_split: tuple[int, ...] = ()  # layers per offload device, llama.cpp's order (fit.Plan)


def _with_reason(message: str) -> str:
    """`message`, followed by llama.cpp's last logged error when there is one."""
    reason = last_error(recent(30))
    return f"{message}: {reason}" if reason else message


class LlamaModel:
    """A loaded model and its vocabulary. Use as a context manager or call close()."""

    def __init__(
        self, path: str | os.PathLike[str], opts: LoadOptions, progress: Callable[[float], None] | None = None
    ):
        lc = llama()
        install_log(echo=opts.verbose)
        self.path = Path(path)
        self.opts = opts
        params = lc.llama_model_default_params()
        params.n_gpu_layers = opts.n_gpu_layers
        params.use_mmap = opts.use_mmap
        params.use_extra_bufts = opts.use_extra_bufts
        if opts.rpc:
            self._devices, gpus_here = rpc.model_devices(opts.rpc, len(opts.tensor_split))
            params.devices = ctypes.cast(self._devices, ctypes.c_void_p)
            if not gpus_here:  # the output layer stays here: no logits over the network
                self._overrides = rpc.output_here()
                params.tensor_buft_overrides = ctypes.cast(self._overrides, ctypes.c_void_p)
        if opts.tensor_split:
            self._split = (ctypes.c_float * max(len(opts.tensor_split), lc.LLAMA_MAX_DEVICES))(*opts.tensor_split)
            params.tensor_split = self._split
        self._lc = lc
        self.ptr = _load_abortably(lc, str(self.path).encode(), params, progress)
        if not self.ptr:
            raise BadModel(
                _with_reason(f"llama.cpp could not load {self.path.name}"),
                hint="check the file with `localrun show`; run with --verbose for llama.cpp's log",
            )
        self.vocab = lc.llama_model_get_vocab(self.ptr)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lc.llama_model_n_ctx_train(self.ptr)
        self.n_layer = lc.llama_model_n_layer(self.ptr)
        self._buffers = threading.local()  # piece()'s buffer, one per thread: a server reads pieces in several

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._lc.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def pooling_type(self) -> int | None:
        """The pooling its GGUF names (`<arch>.pooling_type`, a llama_pooling_type), None if none."""
        value = self.meta(f"{self.meta('general.architecture')}.pooling_type")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    def chat_template(self) -> str | None:
        raw = self._lc.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    @property
    def n_embd_out(self) -> int:
        """The width of the vectors an embedding context gives."""
        return self._lc.llama_model_n_embd_out(self.ptr)

    def rerank_pair(self, query: str, document: str) -> list[int]:
        """A (query, document) pair's tokens for a reranker: the GGUF's rerank template, else BOS
        query EOS SEP document EOS (as far as the vocabulary adds each), as llama-server builds them."""
        lc, vocab = self._lc, self.vocab
        raw = lc.llama_model_chat_template(self.ptr, b"rerank")
        if raw:
            text = raw.decode("utf-8", errors="replace").replace("{query}", query).replace("{document}", document)
            return self.tokenize(text, add_special=False, parse_special=True)
        eos = lc.llama_vocab_eos(vocab)
        if eos == lc.LLAMA_TOKEN_NULL:
            eos = lc.llama_vocab_sep(vocab)
        toks: list[int] = []
        if lc.llama_vocab_get_add_bos(vocab):
            toks.append(lc.llama_vocab_bos(vocab))
        toks += self.tokenize(query, add_special=False, parse_special=False)
        if lc.llama_vocab_get_add_eos(vocab):
            toks.append(eos)
        if lc.llama_vocab_get_add_sep(vocab):
            toks.append(lc.llama_vocab_sep(vocab))
        toks += self.tokenize(document, add_special=False, parse_special=False)
        if lc.llama_vocab_get_add_eos(vocab):
            toks.append(eos)
        return toks

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        buf = (self._lc.llama_token * n_max)()
        n = self._lc.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            buf = (self._lc.llama_token * -n)()
            n = self._lc.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def tokenize_inside(self, text: str) -> list[int]:
        """`text`'s tokens as they come inside a longer text (special tokens read as such): without
        the space a SentencePiece vocabulary puts before a text's start. Read after a newline, and
        the newline's own tokens dropped, where they come out the same alone."""
        lead = self.tokenize("\n", add_special=False, parse_special=True)
        joined = self.tokenize("\n" + text, add_special=False, parse_special=True)
        if joined[: len(lead)] == lead and len(joined) > len(lead):
            return joined[len(lead) :]
        return self.tokenize(text, add_special=False, parse_special=True)

    def piece(self, token: int, special: bool = False) -> bytes:
        # the call releases the GIL: a buffer shared by threads could be overwritten before it is read
        buf = getattr(self._buffers, "piece", None)
        if buf is None:
            buf = self._buffers.piece = ctypes.create_string_buffer(256)
        n = self._lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self.vocab, token, big, len(big), 0, special)
            return big.raw[:n]
        return buf.raw[:n]

    def is_control(self, token: int) -> bool:
        """A control (or unknown) token: one that only special-token parsing makes from text."""
        lc = self._lc
        return bool(
            lc.llama_vocab_get_attr(self.vocab, token) & (lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_UNKNOWN)
        )

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token of the vocabulary (computed once)."""
        if getattr(self, "_eog", None) is None:
            self._eog = [t for t in range(self.n_vocab) if self._lc.llama_vocab_is_eog(self.vocab, t)]
        return self._eog

    def vocab_fingerprint(self) -> str:
        """Identifies a vocabulary: token ids mean the same text in two models with the same hash
        (bench's KLD, a draft model). Computed once per model."""
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256(str(self.n_vocab).encode())
            for token in range(self.n_vocab):
                digest.update(self.piece(token, special=True) + b"\0")
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lc.llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LlamaContext:
    """An inference context over a model: decode tokens, read logits, sample."""

    _averages_here = False  # an embedding context that pools a generative model's states itself

    def __init__(self, model: LlamaModel, opts: LoadOptions):
        lc = model._lc
        self._lc = lc
        self.model = model
        params = lc.llama_context_default_params()
        # llama.cpp pads the context to a multiple of 256 but sizes the batch by the context asked
        # for: ask for the padded size, so that every figure below is what the context really has.
        params.n_ctx = padded_ctx(opts.n_ctx)
        params.n_batch = opts.n_batch
        params.n_ubatch = min(opts.n_batch, UBATCH)
        threads = opts.n_threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        if opts.flash_attn is not None:
            params.flash_attn_type = 1 if opts.flash_attn else 0
        params.type_k, params.type_v = ggml_type(opts.type_k), ggml_type(opts.type_v)
        params.n_seq_max = opts.n_seq_max
        params.kv_unified = opts.kv_unified
        if not opts.logits_all:
            # The rows generation reads: one per decode (more to verify a draft, or one per slot).
            # By default llama.cpp reserves a row per token of a micro-batch: 512 MiB of compute
            # buffer for a 262k vocabulary.
            params.n_outputs_max = max(1, opts.n_outputs)
        if opts.embeddings:
            # Pooling reads a sequence's hidden states from one micro-batch (llama.cpp overwrites
            # a sequence's pooled vector with each micro-batch's part): one micro-batch per decode.
            params.embeddings = True
            params.n_ubatch = opts.n_batch
            params.n_outputs_max = opts.n_batch
            self._averages_here = opts.pooling is None and _names_no_pooling(model)
            if self._averages_here:
                # A generative model's default: mean. Its graph ends in its output head, n_vocab
                # logits per token (on a 262k vocabulary, more work than all its layers), which
                # llama.cpp computes before it pools and an embedding context never reads. Asked
                # for each token's state (pooling none), llama.cpp returns the final norm's output,
                # a node before the head: the graph stops there (_stop_at_embeddings) and the
                # states are averaged here, per sequence (sequence_embedding).
                params.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
                self._stop_cb = _stop_at_embeddings(lc)
                params.cb_eval = self._stop_cb
            else:  # asked for by name, or the model's own (an embedding model, a reranker)
                params.pooling_type = opts.pooling if opts.pooling is not None else model.pooling_type()
        self.logits_all = opts.logits_all
        self.ptr = lc.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise NoSpace(
                _with_reason(f"llama.cpp could not create a context of {opts.n_ctx} tokens"),
                hint="try a smaller --ctx or fewer --gpu-layers",
            )
        self.n_ctx = lc.llama_n_ctx(self.ptr)
        self.n_batch = lc.llama_n_batch(self.ptr)  # at most n_ctx: one decode never holds more
        self.n_seq_max = lc.llama_n_seq_max(self.ptr)
        # LLAMA_POOLING_TYPE_NONE unless an embedding context; the vectors' pooling, wherever done
        self.pooling = lc.LLAMA_POOLING_TYPE_MEAN if self._averages_here else lc.llama_pooling_type(self.ptr)
        self._seq_of: Any = None  # an embedding context averaging here: each token's sequence, last decode
        self.ranks = self.pooling == lc.LLAMA_POOLING_TYPE_RANK  # a reranker's head scores each sequence
        self.n_past = 0
        # Abort flag read by llama.cpp between graph nodes. The callback is libc's strlen on a
        # 2-byte buffer: it returns 0 until abort() writes byte 1, costs no GIL and no Python call.
        self._abort_flag = ctypes.create_string_buffer(2)
        self._abort_cb = _strlen_callback(lc)
        if self._abort_cb is not None:
            lc.llama_set_abort_callback(self.ptr, self._abort_cb, ctypes.cast(self._abort_flag, ctypes.c_void_p))

    def abort(self) -> None:
        """Make the running (or next) decode stop early with DecodeAborted. Safe from any thread."""
        self._abort_flag[0] = b"\x01"

    def clear_abort(self) -> None:
        self._abort_flag[0] = b"\x00"

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int]) -> None:
        """Append tokens to the sequence, in batches of n_batch. Logits: last token (or all)."""
        lc = self._lc
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            n = len(chunk)
            if not self.logits_all:  # the common case: no per-call batch allocation
                arr = (lc.llama_token * n)(*chunk)  # must outlive the call: the batch points into it
                rc = lc.llama_decode(self.ptr, lc.llama_batch_get_one(arr, n))
                self._check(rc)
                self.n_past += n
                continue
            batch = lc.llama_batch_init(n, 0, 1)
            try:
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = self.n_past + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = self.logits_all or (start + i == len(tokens) - 1)
                batch.n_tokens = n
                rc = lc.llama_decode(self.ptr, batch)
            finally:
                lc.llama_batch_free(batch)
            self._check(rc)
            self.n_past += n

    def _check(self, rc: int) -> None:
        if rc == 0:
            return
        if rc == 2:
            raise DecodeAborted()
        if rc == 1:
            raise NoSpace(
                "the context is full (no room in the KV cache)", hint="use a larger --ctx, or /clear the conversation"
            )
        raise LocalrunError(_with_reason(f"llama_decode failed ({rc})"))

    def logits(self, index: int = -1):
        """The logits row for batch position `index` of the last decode, as a numpy view."""
        import numpy as np

        ptr = self._lc.llama_get_logits_ith(self.ptr, index)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def sequence_embedding(self, seq: int):
        """The pooled vector of sequence `seq` after the last decode of an embedding context (a
        copy: llama.cpp reuses its buffer), or for rank pooling the classifier's scores."""
        import numpy as np

        lc = self._lc
        if self._averages_here:
            ptr = lc.llama_get_embeddings(self.ptr) if self._seq_of is not None else None
            if not ptr:
                raise LocalrunError(f"llama.cpp gave no token embeddings for sequence {seq}")
            shape = (len(self._seq_of), self.model.n_embd_out)
            states = np.ctypeslib.as_array(ptr, shape=shape)[self._seq_of == seq]
            if not len(states):
                raise LocalrunError(f"the last decode held no tokens of sequence {seq}")
            return states.mean(axis=0, dtype=np.float64).astype(np.float32)
        ptr = lc.llama_get_embeddings_seq(self.ptr, seq)
        if not ptr:
            raise LocalrunError(f"llama.cpp gave no pooled embedding for sequence {seq}")
        n = lc.llama_model_n_cls_out(self.model.ptr) if self.pooling == lc.LLAMA_POOLING_TYPE_RANK else None
        n = n or lc.llama_model_n_embd_out(self.model.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n,)).copy()

    def truncate(self, n_keep: int) -> bool:
        """Forget every position from n_keep on (rewind the sequence). False: the memory could
        not drop a partial sequence (some sliding-window caches), so it was cleared entirely."""
        if not self.drop(0, n_keep):
            self.reset()
            return False
        self.n_past = min(self.n_past, n_keep)
        return True

    def reset(self) -> None:
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self.ptr), True)
        self.n_past = 0

    # -- several positions or sequences in one decode (speculative verification, parallel slots) --
    def decode_batch(self, batch: Batch) -> None:
        """Decode what `batch` holds at the positions and sequences it says; logits where flagged."""
        if batch.n_tokens:
            self._seq_of = None
            self._check(self._lc.llama_decode(self.ptr, batch.raw))
            if self._averages_here:
                import numpy as np

                ids = batch.raw.seq_id
                self._seq_of = np.fromiter((ids[i][0] for i in range(batch.n_tokens)), np.int32, batch.n_tokens)

    def drop(self, seq: int, start: int, end: int = -1) -> bool:
        """Forget positions [start, end) of one sequence; False when the memory cannot."""
        return bool(self._lc.llama_memory_seq_rm(self._lc.llama_get_memory(self.ptr), seq, start, end))

    def copy(self, src: int, dst: int, n: int) -> bool:
        """Sequence `dst` made to hold the first `n` positions of `src` (its own cells dropped). A
        copy between KV streams takes the whole of `src` (llama.cpp aborts on a part of one), so the
        rest is dropped after; False when the memory cannot, and then `dst` is empty."""
        lc = self._lc
        memory = lc.llama_get_memory(self.ptr)
        lc.llama_memory_seq_rm(memory, dst, -1, -1)
        lc.llama_memory_seq_cp(memory, src, dst, -1, -1)
        if not self.drop(dst, n, -1):
            lc.llama_memory_seq_rm(memory, dst, -1, -1)
            return False
        return True

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lc.llama_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> LlamaContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Batch:
    """A llama_batch allocated once for up to `capacity` tokens: clear(), add() each token with its
    position and sequence (and whether its logits are wanted), then LlamaContext.decode_batch()."""

    def __init__(self, capacity: int, n_seq_max: int = 1):
        self._lc = llama()
        self.capacity, self.n_seq = capacity, n_seq_max
        self.raw: Any = self._lc.llama_batch_init(capacity, 0, n_seq_max)
        self.n_tokens = 0

    def clear(self) -> None:
        self.n_tokens = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int = 0, logits: bool = False) -> int:
        """Append one token; its index in the batch (to read its logits with)."""
        i = self.n_tokens
        if i >= self.capacity:
            raise ValueError(f"a batch of {self.capacity} is full")
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq
        raw.logits[i] = logits
        self.n_tokens = raw.n_tokens = i + 1
        return i

    def close(self) -> None:
        if getattr(self, "raw", None) is not None:
            self._lc.llama_batch_free(self.raw)
            self.raw = None

    def __del__(self) -> None:
        self.close()


@dataclass
class Loaded:
    model: LlamaModel
    ctx: LlamaContext
    opts: LoadOptions
    notes: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.ctx.close()
        self.model.close()


def _names_no_pooling(model: LlamaModel) -> bool:
    """Whether the model's GGUF names no pooling (a generative model, not an embedding model)."""
    lc = model._lc
    own = model.pooling_type()
    return own is None or own in (lc.LLAMA_POOLING_TYPE_NONE, lc.LLAMA_POOLING_TYPE_UNSPECIFIED)


EMBEDDINGS_NODE = b"result_embd_pooled"  # llama.cpp's name for the graph node its embeddings are read from


def _stop_at_embeddings(lc):
    """An eval callback (llama_context_params.cb_eval) that ends a decode's graph once the node
    llama.cpp reads the embeddings from is computed: ggml's scheduler asks it about each node in
    order (ask=true: "do you want this one?") and stops the graph when told false about one it
    wanted. Of a generative model with pooling none, that node is the final norm's output, and what
    follows it is the output head only: embeddings come out as without it, logits are never made."""
    name = rpc.ggml().ggml_get_name

    @lc.ggml_backend_sched_eval_callback
    def stop(tensor: Any, ask: bool, user_data: Any) -> bool:
        return ask and name(tensor) == EMBEDDINGS_NODE

    return stop


def _strlen_callback(lc):
    """libc's strlen as a ggml_abort_callback (see LlamaContext.__init__); None if unavailable."""
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        return lc.ggml_abort_callback(ctypes.cast(libc.strlen, ctypes.c_void_p).value)
    except (OSError, AttributeError, TypeError):
        return None


def _load_abortably(lc: Any, path: bytes, params: Any, progress: Callable[[float], None] | None) -> Any:
    """llama_model_load_from_file, where Ctrl-C stops it through llama.cpp's progress callback
    (returning false aborts the load)."""
    cancelled = threading.Event()

    @lc.llama_progress_callback
    def on_progress(fraction: float, user_data: Any) -> bool:
        if progress is not None:
            try:
                progress(fraction)
            except Exception:  # a display must never break a load
                pass
        return not cancelled.is_set()

    params.progress_callback = on_progress

    def release(ptr: Any) -> None:
        if ptr:
            lc.llama_model_free(ptr)

    return interruptibly(lambda: lc.llama_model_load_from_file(path, params), cancelled.set, release)


def load(path: str | os.PathLike[str], opts: LoadOptions, progress: Callable[[float], None] | None = None) -> Loaded:
    """A model and a context on it; `progress(fraction)` is told how far the load is.

    The context is made in a thread that ends. llama.cpp's CPU backend computes on OpenMP, whose
    thread team belongs to the thread that first computes (making a context does): a team left in
    the caller's thread beside the one of the thread that decodes (a server's scheduler) makes
    libgomp count more threads than cores, and then its threads barely spin between graph nodes
    (measured: a decode 10-30% slower on 2 cores)."""
    model = LlamaModel(path, opts, progress)
    try:
        ctx = interruptibly(lambda: LlamaContext(model, opts), lambda: None, LlamaContext.close)
    except BaseException:
        model.close()
        raise
    return Loaded(model, ctx, opts)
