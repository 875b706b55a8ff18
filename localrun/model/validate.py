"""Checks in Python for what would make llama.cpp abort or fail on a file (it kills the process
on some bad input instead of returning an error), remembered per file identity."""

from __future__ import annotations

import math
import re
from pathlib import Path

from localrun.errors import BadModel
from localrun.model.files import shard_paths
from localrun.model.header import HeaderInfo, cached_facts, interpret, parse_local, remember_facts
from localrun.model.parse import Parsed, Tensor
from localrun.text import safe

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: llama.cpp asserts on more
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


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
    _check_data_layout(parsed, shards, label)
    if info.architecture != "clip":  # a vision projector has no language-model hyperparameters
        _check_hparams(info, fields, [t for p in parsed for t in p.tensors], label)
    return info


def _check_vocab(fields: dict[str, object], tokens: list[str], label: str) -> None:
    # llama.cpp reads token texts as C strings: a NUL ends one, and what is left must be unique
    texts = [t.split("\0", 1)[0] for t in tokens]
    if len(set(texts)) != len(texts):
        seen: set[str] = set()
        for i, tok in enumerate(texts):
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


def _bad(label: str, what: str) -> BadModel:
    return BadModel(f"{label} will not load: {what}", hint="download the file again, or another conversion of it")


def _check_data_layout(parsed: list[Parsed], shards: list[Path], label: str) -> None:
    """Tensor data where llama.cpp's GGUF loader expects it: aligned, and no two tensors overlapping."""
    for header, shard in zip(parsed, shards):
        alignment = header.fields.get("general.alignment", 32)
        alignment = alignment if isinstance(alignment, int) and alignment > 0 else 32
        end = 0
        for t in sorted(header.tensors, key=lambda t: t.offset):
            if t.offset % alignment:
                raise _bad(safe(shard.name), f"tensor {safe(t.name)} is not aligned to {alignment} bytes")
            if t.offset < end:
                raise _bad(safe(shard.name), f"tensor {safe(t.name)} overlaps the one before it")
            end = t.offset + t.n_bytes


def _check_hparams(info: HeaderInfo, fields: dict[str, object], tensors: list[Tensor], label: str) -> None:
    """The hyperparameters llama.cpp asserts on (an abort, not an error), and tensor shapes against them."""
    arch = info.architecture
    if not 0 < info.n_layer <= MAX_LAYERS:
        raise _bad(label, f"{info.n_layer} layers (llama.cpp takes 1 to {MAX_LAYERS})")
    declared = fields.get(f"{arch}.block_count")
    blocks = {int(m.group(1)) for t in tensors if (m := _BLOCK_RE.match(t.name))}
    if isinstance(declared, int) and blocks and max(blocks) >= declared:
        raise _bad(label, f"tensors for layer {max(blocks)} in a model of {declared} layers")
    for key, value in fields.items():
        numeric = isinstance(value, (int, float))
        if key.startswith(f"{arch}.") and key.endswith("epsilon") and numeric and not 0 <= value < math.inf:
            raise _bad(label, f"{key} is {value} (must be a finite number >= 0)")
    if info.n_embd <= 0:
        raise _bad(label, f"embedding length {info.n_embd}")
    heads = fields.get(f"{arch}.attention.head_count")
    per_layer = heads if isinstance(heads, list) else [heads] * info.n_layer
    for i, (n_head, n_kv) in enumerate(zip(per_layer, info.n_head_kv)):
        if isinstance(n_head, int) and n_head > 0 and n_kv > 0 and n_head % n_kv:
            raise _bad(label, f"layer {i} has {n_head} attention heads for {n_kv} KV heads (not a multiple)")
    if info.n_expert > MAX_EXPERTS or info.n_expert_used > info.n_expert:
        raise _bad(label, f"{info.n_expert_used} of {info.n_expert} experts used per token")
    if info.n_expert and not info.n_expert_used:
        raise _bad(label, f"{info.n_expert} experts, none used per token")
    by_name = {t.name: t for t in tensors}
    for name in ("token_embd.weight", "output.weight"):
        t = by_name.get(name)
        if t is None or len(t.shape) != 2:
            continue
        if t.shape[0] != info.n_embd or (info.n_vocab and t.shape[1] != info.n_vocab):
            raise _bad(
                label,
                f"{name} is {t.shape[0]} x {t.shape[1]}, the header says "
                f"{info.n_embd} x {info.n_vocab} (embedding x vocabulary)",
            )
