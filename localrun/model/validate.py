"""Checks in Python for what would make llama.cpp abort or fail on a file (it kills the process
on some bad input instead of returning an error), remembered per file identity."""

from __future__ import annotations

from pathlib import Path

from localrun.errors import BadModel
from localrun.model.files import shard_paths
from localrun.model.header import HeaderInfo, cached_facts, interpret, parse_local, remember_facts
from localrun.text import safe


def validate(path: str | Path) -> HeaderInfo:
    """The model's header, once it passed every check; BadModel says what is wrong."""
    facts = cached_facts(path)
    if facts.get("valid") and facts.get("header"):
        return HeaderInfo(**facts["header"])
    header = _validate(path)
    remember_facts(path, valid=True, header=header.to_dict())
    return header


def problem(path: str | Path) -> str | None:
    """Why loading this file would fail, or None: what `show` reports."""
    try:
        validate(path)
    except BadModel as exc:
        return exc.message
    return None


def _validate(path: str | Path) -> HeaderInfo:
    shards = shard_paths(path)
    label = safe(Path(path).name)
    parsed, sizes = [], []
    for shard in shards:
        header, size = parse_local(shard)
        sizes.append(size)
        for t in header.tensors:
            if header.data_start + t.offset + t.n_bytes > size:
                raise BadModel(
                    f"{safe(shard.name)} is truncated: tensor {safe(t.name)} ends past the end of the file",
                    hint="download it again",
                )
        parsed.append(header)
    info = interpret(parsed, sizes, label)
    fields = parsed[0].fields
    tokens = fields.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        _check_vocab(fields, tokens, label)
    elif fields.get("tokenizer.ggml.model") not in ("none", "no_vocab") and info.architecture != "clip":
        raise BadModel(
            f"{label} has no tokenizer vocabulary (tokenizer.ggml.tokens)",
            hint="re-convert the model with llama.cpp's convert_hf_to_gguf.py",
        )
    return info


def _check_vocab(fields: dict[str, object], tokens: list[str], label: str) -> None:
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        for i, tok in enumerate(tokens):
            if tok in seen:
                raise BadModel(
                    f"{label} has a corrupt vocabulary: token {safe(repr(tok), 40)} (id {i}) appears twice "
                    "(llama.cpp would abort on it)",
                    hint="download the model again, or another conversion of it",
                )
            seen.add(tok)
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        values = fields.get(key)
        if values is not None and len(values) < len(tokens):  # type: ignore[arg-type]
            raise BadModel(
                f"{label} has a corrupt vocabulary: {key} has {len(values)} entries for "  # type: ignore[arg-type]
                f"{len(tokens)} tokens"
            )
    for key in ("bos", "eos", "unknown", "padding", "eot"):
        token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and token_id >= len(tokens):
            raise BadModel(
                f"{label} has a corrupt vocabulary: the {key} token id {token_id} is out of range "
                f"({len(tokens)} tokens)"
            )
