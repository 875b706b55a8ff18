"""llama-server's /tokenize and /detokenize over a served model's vocabulary. Token ids a client
sends are checked against the vocabulary before llama.cpp reads them: an id beyond it would be
read out of the vocabulary's bounds."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from localrun.inference.llama.runtime import LlamaModel
from localrun.serve.errors import bad_request
from localrun.serve.protocol import Detokenized, DetokenizeRequest, Tokenized, TokenizeRequest, TokenPiece
from localrun.serve.registry import Registry


@contextlib.asynccontextmanager
async def vocabulary(registry: Registry, name: str | None) -> AsyncIterator[LlamaModel]:
    """The vocabulary of the model `name` (None: the first served), loaded if it is not, and kept
    loaded while it is used."""
    host = registry.hosts[0] if name is None and registry.hosts else registry.find(name or "")
    async with registry.holding(host):
        assert host.engine is not None
        yield host.engine.model


def tokenize(model: LlamaModel, req: TokenizeRequest) -> Tokenized:
    tokens = model.tokenize(req.content, add_special=req.add_special, parse_special=req.parse_special)
    if not req.with_pieces:
        return Tokenized(tokens=tokens)
    return Tokenized(tokens=[TokenPiece(id=t, piece=_shown(model.piece(t, special=True))) for t in tokens])


def detokenize(model: LlamaModel, req: DetokenizeRequest) -> Detokenized:
    """The tokens' text, special tokens written out (as llama-server's); 400 for an id not in the vocabulary."""
    n_vocab = model.n_vocab
    for i, token in enumerate(req.tokens):
        if not 0 <= token < n_vocab:
            raise bad_request(
                f"tokens[{i}]: {str(token)[:24]} is not a token id of this model (0 to {n_vocab - 1})", param="tokens"
            )
    text = b"".join(model.piece(token, special=True) for token in req.tokens)
    return Detokenized(content=text.decode("utf-8", errors="replace"))


def _shown(piece: bytes) -> str | list[int]:
    """A piece as llama-server shows it: its text, or its bytes when they are not whole UTF-8."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)
