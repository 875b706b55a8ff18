"""What a GGUF header says: hyperparameters, tensor bytes per layer, template, licence.

`interpret` turns parsed headers (local or remote, every shard of a split) into a HeaderInfo.
Local headers are cached: parsing a large vocabulary takes most of a second and every command
that loads a model validates and plans it. A file's facts are kept in $LOCALRUN_HOME/headers/,
keyed by its real path, size and mtime (HF cache blobs never change in place).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from localrun import paths
from localrun.errors import BadModel, NotFound
from localrun.model.files import shard_paths
from localrun.model.parse import ArrayStub, Parsed, parse
from localrun.model.quants import FTYPE_NAMES
from localrun.text import safe

CACHE_VERSION = 4  # bump when HeaderInfo or validation changes
MAX_LAYERS = 10_000  # far beyond any real model; a bigger count is a corrupt header


@dataclass
class HeaderInfo:
    architecture: str
    name: str | None
    file_type: str | None  # quant name via quants.FTYPE_NAMES
    n_params: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: list[int]  # per layer
    key_length: int
    value_length: int
    n_ctx_train: int
    sliding_window: int | None
    swa_layers: list[bool]  # which layers use the sliding window
    n_expert: int
    n_expert_used: int
    n_vocab: int
    layer_bytes: list[int]  # tensor data bytes of blk.N.*
    embd_bytes: int  # token_embd.*
    output_bytes: int  # output.* and output_norm.*
    other_bytes: int
    tensor_bytes: int
    file_size: int
    n_shards: int
    chat_template: str | None
    license: str | None
    metadata: dict[str, object] = field(default_factory=dict)  # scalars; arrays as "[N items]"
    output_tied: bool = False  # no output.weight: llama.cpp reuses token_embd for the output layer
    n_ff: int = 0
    n_ff_expert: int = 0  # feed-forward width of one expert (MoE)
    matmul_bytes: dict[str, int] = field(default_factory=dict)  # blk.* matrices, bytes per ggml type

    def to_dict(self) -> dict:
        return asdict(self)


# -- interpretation -------------------------------------------------------------------------------

# Interleaved sliding-window attention as llama.cpp 0.3.36 sets it up per architecture
# (src/models/*.cpp: load_swa_pattern(n, dense_first)): (period, dense_first, default window,
# needs a window key > 0). A `{arch}.attention.sliding_window_pattern` key overrides the period
# (int) or gives the layers directly (array).
_SWA_RULES: dict[str, tuple[int, bool, int | None, bool]] = {
    "gemma2": (2, False, 4096, False),
    "exaone4": (4, False, 4096, False),  # only the 64-layer (32B) model
    "gemma3": (6, False, None, True),
    "gemma3n": (5, False, None, False),
    "gemma-embedding": (6, False, None, False),
    "cohere2": (4, False, None, False),
    "cohere2moe": (4, True, None, False),
    "afmoe": (4, False, None, True),
    "exaone-moe": (4, False, 128, False),
    "llama4": (4, False, 8192, False),
    "olmo2": (4, False, None, True),
    "mellum": (4, False, None, True),
    "plamo3": (8, False, None, True),
    "gpt-oss": (2, False, None, False),
    "muse-glimmer": (4, False, None, False),
    "laguna": (4, True, None, True),
    "smallthinker": (4, True, 4096, True),
    "modern-bert": (3, True, None, True),
}
# architectures that read the per-layer pattern array only
_SWA_ARRAY_ARCHS = {
    "gemma4",
    "gemma4-assistant",
    "granite-swa",
    "step35",
    "mimo2",
    "maple",
    "spark2-5",
    "dots3note",
    "dflash",
}


def swa_layers(arch: str, fields: dict[str, object], n_layer: int) -> tuple[int | None, list[bool]]:
    """The sliding window and which layers use it, as llama.cpp decides for this architecture."""
    window_key = fields.get(f"{arch}.attention.sliding_window")
    window = window_key if isinstance(window_key, int) and window_key > 0 else None
    pattern = fields.get(f"{arch}.attention.sliding_window_pattern")
    none = [False] * n_layer
    if isinstance(pattern, list):  # explicit per-layer flags
        flags = [bool(x) for x in pattern][:n_layer]
        flags += [False] * (n_layer - len(flags))
        return (window, flags) if window and (arch in _SWA_ARRAY_ARCHS or arch in _SWA_RULES) else (window, none)
    rule = _SWA_RULES.get(arch)
    if rule is None:
        return window, none
    period, dense_first, default_window, needs_key = rule
    if arch == "exaone4" and n_layer != 64:
        return window, none
    if arch == "llama4" and window_key == 0:
        return None, none
    if needs_key and window is None:
        return None, none
    window = window or default_window
    if window is None:
        return None, none
    if isinstance(pattern, int):
        period = pattern
    if dense_first:
        flags = [period == 0 or i % period != 0 for i in range(n_layer)]
    else:
        flags = [period == 0 or i % period < period - 1 for i in range(n_layer)]
    return window, flags


def _per_layer(value: object, n_layer: int, default: int) -> list[int]:
    if isinstance(value, list) and value:
        values = [int(v) for v in value[:n_layer]]
        return values + [values[-1]] * (n_layer - len(values))
    if isinstance(value, int):
        return [value] * n_layer
    return [default] * n_layer


def _summary(value: object) -> object:
    if isinstance(value, (list, ArrayStub)):
        return f"[{len(value)} items]"
    return value


_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def interpret(shards: list[Parsed], sizes: list[int], label: str) -> HeaderInfo:
    """The model's facts from the parsed header of each shard (the first holds the metadata)."""
    from gguf import GGMLQuantizationType

    fields: dict[str, object] = {}
    for parsed in shards:  # later shards only add split.*
        for key, value in parsed.fields.items():
            fields.setdefault(key, value)
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise BadModel(f"{label}: the GGUF header has no general.architecture")
    count = fields.get("split.count")
    if isinstance(count, int) and count > 1 and count != len(shards):
        raise BadModel(
            f"{label} is one of {count} shards, {len(shards)} found",
            hint="keep every shard `-0000i-of-0000N.gguf` in the same folder",
        )

    def key(name: str, default: object = None) -> object:
        return fields.get(f"{arch}.{name}", default)

    tensors = [t for parsed in shards for t in parsed.tensors]
    n_layer_key = key("block_count")
    n_layer = n_layer_key if isinstance(n_layer_key, int) else 0
    blocks = [int(m.group(1)) for t in tensors if (m := _LAYER_RE.match(t.name))]
    n_layer = max(n_layer, max(blocks) + 1 if blocks else 0)
    if n_layer > MAX_LAYERS:  # before any list of n_layer items is made
        raise BadModel(
            f"{label}: corrupt GGUF header ({n_layer:,} layers)",
            hint="download the file again, or another conversion of the model",
        )
    layer_bytes = [0] * n_layer
    embd_bytes = output_bytes = other_bytes = 0
    has_output = False
    matmul_bytes: dict[str, int] = {}
    for t in tensors:
        if m := _LAYER_RE.match(t.name):
            layer_bytes[int(m.group(1))] += t.n_bytes
            if len(t.shape) >= 2:
                type_name = GGMLQuantizationType(t.ggml_type).name
                matmul_bytes[type_name] = matmul_bytes.get(type_name, 0) + t.n_bytes
        elif t.name.startswith("token_embd"):
            embd_bytes += t.n_bytes
        elif t.name.startswith("output"):
            output_bytes += t.n_bytes
            has_output = has_output or t.name.startswith("output.")
        else:
            other_bytes += t.n_bytes

    n_embd = _int(key("embedding_length", 0))
    n_head_layers = _per_layer(key("attention.head_count", 0), n_layer, 0)
    n_head = max(n_head_layers, default=0)
    n_head_kv = _per_layer(key("attention.head_count_kv"), n_layer, n_head)
    head_dim = n_embd // n_head if n_head else 0
    tokens = fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if isinstance(tokens, (list, ArrayStub)) else _int(key("vocab_size", 0))
    if not n_vocab:
        embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
        n_vocab = embd.shape[1] if embd is not None and len(embd.shape) > 1 else 0
    window, swa = swa_layers(arch, fields, n_layer)
    file_type = fields.get("general.file_type")
    template = fields.get("tokenizer.chat_template")
    return HeaderInfo(
        architecture=arch,
        name=fields.get("general.name") if isinstance(fields.get("general.name"), str) else None,
        file_type=FTYPE_NAMES.get(file_type) if isinstance(file_type, int) else None,
        n_params=sum(t.n_elements for t in tensors),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=_int(key("attention.key_length", 0)) or head_dim,
        value_length=_int(key("attention.value_length", 0)) or head_dim,
        n_ctx_train=_int(key("context_length", 0)),
        sliding_window=window,
        swa_layers=swa,
        n_expert=_int(key("expert_count", 0)),
        n_expert_used=_int(key("expert_used_count", 0)),
        n_vocab=n_vocab,
        layer_bytes=layer_bytes,
        embd_bytes=embd_bytes,
        output_bytes=output_bytes,
        other_bytes=other_bytes,
        tensor_bytes=sum(t.n_bytes for t in tensors),
        file_size=sum(sizes),
        n_shards=len(shards),
        chat_template=template if isinstance(template, str) else None,
        license=fields.get("general.license") if isinstance(fields.get("general.license"), str) else None,
        metadata={k: _summary(v) for k, v in fields.items() if k != "tokenizer.chat_template"},
        output_tied=not has_output,
        n_ff=max(_per_layer(key("feed_forward_length", 0), n_layer, 0), default=0),
        n_ff_expert=max(_per_layer(key("expert_feed_forward_length", 0), n_layer, 0), default=0),
        matmul_bytes=matmul_bytes,
    )


def _int(value: object) -> int:
    """A metadata value that should be a count: anything else (a float, a string) counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# -- local files ----------------------------------------------------------------------------------


def parse_local(path: Path) -> tuple[Parsed, int]:
    """The parsed header of one local file and its size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:

            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            return parse(read, size, safe(path.name)), size
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist", hint="check the path; a split model needs all its shards") from None
    except IsADirectoryError:
        raise BadModel(f"{path} is a directory, not a GGUF file") from None


def read_header(path: str | Path) -> HeaderInfo:
    """The header of a local model; a split model's shard reads every shard next to it."""
    facts = cached_facts(path)
    if facts.get("header"):
        return HeaderInfo(**facts["header"])
    parsed = [parse_local(p) for p in shard_paths(path)]
    header = interpret([p for p, _ in parsed], [s for _, s in parsed], safe(Path(path).name))
    remember_facts(path, header=header.to_dict())
    return header


def _content_file(shas: list[str]) -> Path:
    key = hashlib.sha256(json.dumps([CACHE_VERSION, "content", shas]).encode()).hexdigest()[:32]
    return paths.home() / "headers" / f"{key}.json"


def known_header(shas: list[str | None]) -> HeaderInfo | None:
    """The header read before of a model whose shards have these sha256s (a Hub file's LFS oid):
    pull, search and a second search share what any of them read."""
    if not shas or not all(shas):
        return None
    data = paths.read_json(_content_file(shas))  # type: ignore[arg-type]
    if not isinstance(data, dict) or not isinstance(data.get("header"), dict):
        return None
    try:
        return HeaderInfo(**data["header"])
    except TypeError:  # written by another version
        return None


def keep_header(shas: list[str | None], header: HeaderInfo) -> None:
    """Keep a header by its content (see known_header); a read-only or full home only costs speed."""
    if shas and all(shas):
        paths.write_json_quietly(_content_file(shas), {"header": header.to_dict()})  # type: ignore[arg-type]


def _cache_file(path: str | Path) -> Path | None:
    try:
        ident = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shard_paths(path)]
    except OSError:
        return None  # missing shards: let the parser report it
    key = hashlib.sha256(json.dumps([CACHE_VERSION, ident]).encode()).hexdigest()[:32]
    return paths.home() / "headers" / f"{key}.json"


def cached_facts(path: str | Path) -> dict:
    """What was learnt about this file before (header, verdicts), keyed by its identity; {} if nothing."""
    target = _cache_file(path)
    data = paths.read_json(target) if target else None
    return data if isinstance(data, dict) else {}


def remember_facts(path: str | Path, **facts: object) -> None:
    """Add to what is known about this file. A read-only or full home only costs speed."""
    target = _cache_file(path)
    if target is not None:
        paths.write_json_quietly(target, {**cached_facts(path), **facts})
