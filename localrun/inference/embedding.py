"""Embeddings and reranking over a llama.cpp embedding context.

The context pools every token's hidden state per sequence, as the model's GGUF says (mean, CLS,
last; rank for a reranker's classifier head) -- mean for a generative model whose GGUF names no
pooling (LlamaContext: runtime._names_no_pooling). Many inputs go through one decode: each its own sequence id,
as many as fit in the batch's tokens and the context's sequences; the context gives one pooled
vector per sequence (LlamaContext.sequence_embedding: llama.cpp's, or for a generative model its
token states averaged without computing the output head), and the cells are cleared for the next
batch.

An input longer than the context (one decode's worth of tokens: a sequence is pooled within one
micro-batch) is refused, or cut to the context when the caller asks. Vectors come back as the
model makes them: normalising is each API's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from localrun.errors import UsageError
from localrun.fit import CELL_PAD
from localrun.inference.llama.runtime import Batch, LlamaContext, LlamaModel, Loaded, LoadOptions, padded_ctx

POOLING_NAMES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
MAX_SEQUENCES = 64  # inputs one decode may hold (llama.cpp allows 256; more barely pays on a CPU)
DEFAULT_TOKENS = 512  # tokens per input (and per decode) when not told: llama-server's micro-batch

Input = str | Sequence[int]


@dataclass(frozen=True)
class Embedding:
    """One input's pooled vector (float32, as the model makes it) and the tokens it was made of."""

    vector: np.ndarray
    n_tokens: int
    truncated: bool = False


class InputTooLong(UsageError):
    """An input has more tokens than one embedding decode holds."""

    def __init__(self, index: int, n_tokens: int, limit: int):
        super().__init__(
            f"input {index} has {n_tokens} tokens, more than the {limit} an embedding can read",
            hint="shorten it, or ask for truncation",
        )
        self.index, self.n_tokens, self.limit = index, n_tokens, limit


def embedding_options(base: LoadOptions, max_tokens: int) -> LoadOptions:
    """The options of an embedding context beside (or instead of) `base`'s generation context:
    `max_tokens` per decode and per input, sequences sharing the cells (cleared after each batch)."""
    n = max(CELL_PAD, padded_ctx(max_tokens))
    return replace(
        base,
        n_ctx=n,
        n_batch=n,
        n_seq_max=MAX_SEQUENCES,
        kv_unified=True,
        n_outputs=n,
        logits_all=False,
        embeddings=True,
        pooling=None,
        type_k="f16",
        type_v="f16",
    )


class Embedder:
    """Embeds texts (or token ids) and ranks documents with one embedding context. Not thread-safe:
    one thread at a time (llama.cpp contexts are not); the model may be shared with others."""

    def __init__(self, model: LlamaModel, ctx: LlamaContext, max_tokens: int, *, owns_model: bool = False):
        self.model, self.ctx = model, ctx
        self._owns_model = owns_model
        self.max_tokens = min(max_tokens, ctx.n_batch)  # per input and per decode (the context is padded)
        self.n_seq = max(1, min(ctx.n_seq_max, MAX_SEQUENCES))
        self.pooling = POOLING_NAMES.get(ctx.pooling, str(ctx.pooling))
        own = model.pooling_type()
        self.pooling_from_model = own is not None and own == ctx.pooling  # else chosen for a generative model
        self.is_reranker = ctx.ranks
        self.dimensions = model.n_embd_out
        self._batch = Batch(self.max_tokens)  # one sequence id per token

    @classmethod
    def beside(cls, model: LlamaModel, opts: LoadOptions, max_tokens: int = DEFAULT_TOKENS) -> Embedder:
        """An embedder with its own context on an already loaded model (a server's, beside the
        slots' context). Make it in the thread that will use it (see runtime.load on OpenMP)."""
        tokens = min(max_tokens, model.n_ctx_train or max_tokens)
        return cls(model, LlamaContext(model, embedding_options(opts, tokens)), tokens)

    @classmethod
    def of(cls, loaded: Loaded, max_tokens: int) -> Embedder:
        """An embedder over a model loaded with embedding_options (it owns both, and closes them)."""
        return cls(loaded.model, loaded.ctx, max_tokens, owns_model=True)

    def describe_pooling(self) -> str:
        """How vectors are pooled, and whence that choice: for the log and the command's notes."""
        if self.pooling_from_model:
            return f"pooling {self.pooling} (from the model's GGUF)"
        gloss = ": every token's state averaged" if self.pooling == "mean" else ""
        return f"pooling {self.pooling} (the model's GGUF names none{gloss})"

    # -- tokens --------------------------------------------------------------------------------
    def tokens(self, inputs: Sequence[Input], truncate: bool) -> list[tuple[list[int], bool]]:
        """Each input's tokens and whether it was cut: a text tokenized with the BOS/EOS the model
        adds (markup such as `<s>` in it stays text), token ids checked against the vocabulary."""
        out: list[tuple[list[int], bool]] = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                toks = self.model.tokenize(item, add_special=True, parse_special=False)
            else:
                toks = [int(t) for t in item]
                bad = next((t for t in toks if not 0 <= t < self.model.n_vocab), None)
                if bad is not None:
                    raise UsageError(
                        f"input {i} holds token {bad}, not in the vocabulary (0..{self.model.n_vocab - 1})"
                    )
            out.append(self._fitted(i, toks, truncate))
        return out

    def _fitted(self, index: int, toks: list[int], truncate: bool) -> tuple[list[int], bool]:
        if not toks:
            raise UsageError(f"input {index} is empty: it has no tokens to embed")
        if len(toks) <= self.max_tokens:
            return toks, False
        if not truncate:
            raise InputTooLong(index, len(toks), self.max_tokens)
        return toks[: self.max_tokens], True

    # -- computing -----------------------------------------------------------------------------
    def embed(self, inputs: Sequence[Input], *, truncate: bool = False) -> list[Embedding]:
        """One pooled vector per input, in order, computed in as few decodes as fit."""
        if self.is_reranker:
            raise UsageError("this model is a reranker (rank pooling): it scores pairs, it makes no embeddings")
        prepared = self.tokens(inputs, truncate)
        vectors = self._pooled([toks for toks, _ in prepared])
        return [Embedding(v, len(toks), cut) for v, (toks, cut) in zip(vectors, prepared)]

    def rank(self, query: str, documents: Sequence[str], *, truncate: bool = False) -> tuple[list[float], int]:
        """A relevance score per document, and the tokens read. A reranker (rank pooling) scores
        each (query, document) pair with its classifier head, as llama-server builds the pair;
        any other model: the cosine similarity of the query's and each document's embeddings."""
        if not self.is_reranker:
            found = self.embed([query, *documents], truncate=truncate)
            q = _unit(found[0].vector)
            return [float(np.dot(q, _unit(e.vector))) for e in found[1:]], sum(e.n_tokens for e in found)
        pairs = [self._fitted(i, self.model.rerank_pair(query, doc), truncate)[0] for i, doc in enumerate(documents)]
        scores = self._pooled(pairs)
        return [float(s[0]) for s in scores], sum(len(p) for p in pairs)

    def _pooled(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """The pooled output of each token sequence (each fits one decode), packed into decodes."""
        results: list[np.ndarray] = []
        start = 0
        while start < len(sequences):
            end, total = start, 0
            while end < len(sequences) and end - start < self.n_seq and total + len(sequences[end]) <= self.max_tokens:
                total += len(sequences[end])
                end += 1
            results += self._decode(sequences[start:end])
            start = end
        return results

    def _decode(self, group: list[list[int]]) -> list[np.ndarray]:
        batch, ctx = self._batch, self.ctx
        batch.clear()
        for seq, toks in enumerate(group):
            for pos, tok in enumerate(toks):
                batch.add(tok, pos, seq, logits=True)  # pooling reads every token's state
        try:
            ctx.decode_batch(batch)
            return [ctx.sequence_embedding(seq) for seq in range(len(group))]
        finally:
            ctx.reset()

    def close(self) -> None:
        self.ctx.close()
        if self._owns_model:
            self.model.close()
        self._batch.close()


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def normalized(vector: np.ndarray) -> np.ndarray:
    """The vector scaled to unit L2 length (a zero vector stays zero)."""
    return _unit(vector.astype(np.float32, copy=False))
