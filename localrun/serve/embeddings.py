"""Embeddings and reranking, as the server's routes ask for them: OpenAI's /v1/embeddings and
/v1/rerank (llama-server's, Jina's and Cohere's shape) here, and any other API's route (Ollama's
/api/embed) through embed() and rank().

A request checks its model out like a chat request (loading it if need be, so it is not unloaded
meanwhile) and runs on the model's embedding worker (serve/embedder.py), off the event loop.
Vectors come back as the model pools them; each API normalises as it defines: OpenAI's are unit
length (L2).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence

import numpy as np

from localrun.errors import LocalrunError
from localrun.inference.embedding import Embedding, Input, InputTooLong, normalized
from localrun.inference.llama.runtime import DecodeAborted
from localrun.serve.errors import ApiError, as_api_error, bad_request
from localrun.serve.host import ModelHost
from localrun.serve.loop import QueueFull
from localrun.serve.protocol import (
    EmbeddingData,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
)
from localrun.serve.registry import Registry


async def embed(registry: Registry, host: ModelHost, inputs: Sequence[Input], truncate: bool) -> list[Embedding]:
    """Each input's pooled vector (not normalised) and token count, from `host`'s model, in order.
    An input longer than the model's embedding context is cut to it with `truncate`, else refused.
    Raises ApiError (OpenAI's statuses; another API translates it into its own error shape)."""
    return await _on_worker(registry, host, lambda embedder: embedder.embed(inputs, truncate=truncate))


async def rank(
    registry: Registry, host: ModelHost, query: str, documents: Sequence[str], truncate: bool
) -> tuple[list[float], int]:
    """A relevance score per document (in their order) and the tokens read: a reranker's own score,
    or for any other model the cosine similarity of embeddings (inference.embedding.Embedder.rank)."""
    return await _on_worker(registry, host, lambda embedder: embedder.rank(query, documents, truncate=truncate))


async def _on_worker(registry: Registry, host: ModelHost, work):
    await registry.acquire(host)
    try:
        worker = host.embeddings
        if worker is None:  # unloaded between checkout and here: cannot be while checked out
            raise ApiError(503, f"{host.id} is not loaded", type="server_error", retry_after=1)
        return await asyncio.wrap_future(worker.submit(work))
    except QueueFull:
        raise ApiError(
            503,
            f"{host.id} is embedding and {worker.queue_limit} more embedding requests are waiting",
            type="server_error",
            code="queue_full",
            retry_after=1,
        ) from None
    except InputTooLong as exc:
        raise ApiError(400, exc.message + f" ({exc.hint})", param="input", code="context_length_exceeded") from None
    except (LocalrunError, DecodeAborted) as exc:
        raise as_api_error(exc) from None
    finally:
        host.checkin()


async def openai_embeddings(registry: Registry, req: EmbeddingRequest) -> EmbeddingList:
    """/v1/embeddings: unit-length vectors, as floats or base64 of their float32 bytes."""
    host = registry.find(req.model)
    inputs: list[Input] = [req.input] if isinstance(req.input, str) else list(req.input)
    if inputs and isinstance(inputs[0], int):  # one input given as token ids
        inputs = [req.input]  # type: ignore[list-item]
    found = await embed(registry, host, inputs, req.truncate)
    vectors = unit_vectors(host, found, req.dimensions)
    data = [EmbeddingData(index=i, embedding=_encoded(v, req.encoding_format)) for i, v in enumerate(vectors)]
    tokens = sum(e.n_tokens for e in found)
    return EmbeddingList(data=data, model=host.id, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


async def rerank(registry: Registry, req: RerankRequest) -> RerankResponse:
    """/v1/rerank: the documents by relevance to the query, most relevant first, top_n of them."""
    host = registry.find(req.model)
    scores, tokens = await rank(registry, host, req.query, req.documents, req.truncate)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n]
    results = [
        RerankResult(
            index=i,
            relevance_score=scores[i],
            document=RerankDocument(text=req.documents[i]) if req.return_documents else None,
        )
        for i in order
    ]
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return RerankResponse(model=host.id, usage=usage, results=results)


def detail(inputs: int, tokens: int, what: str = "input") -> str:
    """What an embedding or rerank request did, for the server's log line."""
    return f"{inputs} {what}{'s' * (inputs != 1)} · {tokens} tok"


def unit_vectors(host: ModelHost, found: Sequence[Embedding], dimensions: int | None = None) -> list[np.ndarray]:
    """The vectors at unit length (L2), as OpenAI's and Ollama's APIs give them; with `dimensions`,
    their first that many components, scaled back to unit length (what both APIs do with it)."""
    width = len(found[0].vector) if found else 0
    if dimensions is not None and dimensions > width and found:
        raise bad_request(
            f"dimensions: {host.id} makes vectors of {width} dimensions, fewer than {dimensions}", param="dimensions"
        )
    return [normalized(e.vector[:dimensions]) for e in found]


def _encoded(unit: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(unit.astype("<f4").tobytes()).decode("ascii")
    return unit.tolist()
