"""What a GGUF header says: hyperparameters, tensor bytes per layer, template, licence.

Headers are parsed here rather than with gguf.GGUFReader: the reader builds a numpy view per
array element and takes ~25 s on Gemma 3's 262k-token vocabulary (measured on the dev box),
where this parser takes a fraction of a second. The `gguf` package still supplies the format's
constants (value types, tensor types and their block sizes); tests check that both agree.

A header is read from a local file, or from the Hub with HTTP Range requests: the first few MB,
growing until the tensor-info section is complete — the tensor data is never downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from localrun.errors import BadModel, NetworkError, NotFound
from localrun.quants import FTYPE_NAMES

FIRST_FETCH = 2 << 20  # most headers fit in 2-8 MB; Gemma 3's (262k-token vocabulary) needs 6.5 MB
MAX_HEADER = 512 << 20  # a header larger than this is not a model we can help with
DEFAULT_ALIGNMENT = 32
_CACHE_VERSION = 1  # bump when HeaderInfo or validation changes
# llama.cpp's split naming: `name-00001-of-00003.gguf` (gguf-split, convert_hf_to_gguf --split-*)
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)


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


# -- parsing -------------------------------------------------------------------------------------

class _NeedMore(Exception):
    """The bytes we have end inside the header; at least `needed` bytes are required."""

    def __init__(self, needed: int):
        super().__init__(needed)
        self.needed = needed


# GGUFValueType -> struct format of a scalar (STRING=8 and ARRAY=9 are handled apart)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_KEEP_ARRAY = 1 << 16  # numeric arrays up to this length are kept (per-layer values); longer: counted


@dataclass
class _Tensor:
    name: str
    shape: list[int]
    ggml_type: int
    offset: int  # relative to the data section
    n_elements: int
    n_bytes: int


@dataclass
class _Parsed:
    fields: dict[str, object]  # scalars and kept arrays; long arrays as _ArrayStub
    tensors: list[_Tensor]
    data_start: int
    header_end: int
    version: int


@dataclass
class _ArrayStub:
    count: int

    def __len__(self) -> int:
        return self.count


class _Cursor:
    def __init__(self, buf: bytes | memoryview, known_size: int | None):
        self.buf = buf
        self.pos = 0
        self.known_size = known_size

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise _NeedMore(end)
        view = memoryview(self.buf)[self.pos:end]
        self.pos = end
        return view

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if self.known_size is not None and n > self.known_size:
            raise BadModel("corrupt GGUF header: a string longer than the file")
        return bytes(self.take(n)).decode("utf-8", errors="replace")


def _string_array(cur: _Cursor, count: int, keep: bool) -> list[str] | _ArrayStub:
    """A tight loop: vocabularies have 100k+ strings."""
    buf, pos, end = cur.buf, cur.pos, len(cur.buf)
    unpack = struct.Struct("<Q").unpack_from
    out: list[str] = []
    for _ in range(count):
        if pos + 8 > end:
            raise _NeedMore(pos + 8)
        n = unpack(buf, pos)[0]
        pos += 8
        if pos + n > end:
            raise _NeedMore(pos + n)
        if keep:
            out.append(bytes(buf[pos:pos + n]).decode("utf-8", errors="replace"))
        pos += n
    cur.pos = pos
    return out if keep else _ArrayStub(count)


def _read_value(cur: _Cursor, vtype: int, key: str):
    if vtype in _SCALAR:
        return cur.unpack(_SCALAR[vtype])
    if vtype == 8:
        return cur.string()
    if vtype != 9:
        raise BadModel(f"corrupt GGUF header: unknown value type {vtype} for {key}")
    etype, count = cur.unpack("I"), cur.unpack("Q")
    if etype == 8:
        keep = key == "tokenizer.ggml.tokens" or count <= _KEEP_ARRAY  # merges and the like: counted
        return _string_array(cur, count, keep)
    if etype not in _SCALAR:
        raise BadModel(f"corrupt GGUF header: unsupported array type {etype} for {key}")
    size = struct.calcsize("<" + _SCALAR[etype])
    raw = cur.take(size * count)
    if count > _KEEP_ARRAY:
        return _ArrayStub(count)
    return list(struct.unpack_from(f"<{count}{_SCALAR[etype]}", raw))


def _parse(buf: bytes | memoryview, file_size: int | None, label: str) -> _Parsed:
    """Parse a GGUF header from its first bytes. Raises _NeedMore when they end too early."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(buf, file_size)
    if len(buf) >= 4 and bytes(buf[:4]) != b"GGUF":
        raise BadModel(f"{label} is not a GGUF file", hint="localrun reads GGUF models (llama.cpp's format)")
    cur.take(4)
    version = cur.unpack("I")
    if version not in (2, 3):
        raise BadModel(f"{label}: unsupported GGUF version {version}", hint="re-convert the model with a recent llama.cpp")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise BadModel(f"{label}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
    fields: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string()
        fields[key] = _read_value(cur, cur.unpack("I"), key)
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("I")
        if n_dims > 8:
            raise BadModel(f"{label}: corrupt GGUF header (tensor {name} has {n_dims} dimensions)")
        shape = [cur.unpack("Q") for _ in range(n_dims)]
        ggml_type, offset = cur.unpack("I"), cur.unpack("Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise BadModel(f"{label}: tensor {name} has a type this gguf package does not know ({ggml_type})",
                           hint="upgrade localrun's dependencies (pip install -U gguf llama-cpp-python)") from None
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        tensors.append(_Tensor(name, shape, ggml_type, offset, n_elements, n_elements // block * type_size))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    alignment = alignment if isinstance(alignment, int) and alignment > 0 else DEFAULT_ALIGNMENT
    data_start = -(-cur.pos // alignment) * alignment
    return _Parsed(fields, tensors, data_start, cur.pos, version)


def _parse_growing(read: Callable[[int, int], bytes], size: int, label: str) -> _Parsed:
    """Parse with as few bytes as possible: read(start, end) more until the header is complete."""
    buf = bytearray(read(0, min(size, FIRST_FETCH)))
    while True:
        try:
            return _parse(buf, size, label)
        except _NeedMore as more:
            if len(buf) >= size:
                raise BadModel(f"{label} is truncated: the GGUF header ends past the end of the file",
                               hint="download it again") from None
            want = min(size, max(more.needed + (1 << 20), 2 * len(buf)))
            if want > MAX_HEADER:
                raise BadModel(f"{label}: GGUF header larger than {MAX_HEADER >> 20} MB") from None
            chunk = read(len(buf), want)
            if not chunk:
                raise BadModel(f"{label} is truncated: the GGUF header ends past the end of the file") from None
            buf += chunk


# -- local files ----------------------------------------------------------------------------------

def shard_paths(path: str | Path) -> list[Path]:
    """All shards of a split model given any shard (`name-0000i-of-0000N.gguf`), else [path]."""
    path = Path(path)
    m = SHARD_RE.match(path.name)
    if not m:
        return [path]
    rest = path.name[m.end("index"):]  # "-of-0000N.gguf", as the file spells it
    return [path.with_name(f"{m['stem']}-{i:05d}{rest}") for i in range(1, int(m["total"]) + 1)]


def _parse_local(path: Path) -> tuple[_Parsed, int]:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            def read(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(end - start)

            if size < 4 or read(0, 4) != b"GGUF":
                raise BadModel(f"{path.name} is not a GGUF file", hint="localrun reads GGUF models (llama.cpp's format)")
            return _parse_growing(read, size, path.name), size
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist", hint="check the path; a split model needs all its shards") from None
    except IsADirectoryError:
        raise BadModel(f"{path} is a directory, not a GGUF file") from None


def read_header(path: str | Path) -> HeaderInfo:
    """The header of a local model; a split model's shard reads every shard next to it."""
    key = _cache_key(path)
    cached = _cache_get(key) if key else None
    if cached and cached.get("header"):
        return HeaderInfo(**cached["header"])
    shards = shard_paths(path)
    parsed = [_parse_local(p) for p in shards]
    header = _header([p for p, _ in parsed], [s for _, s in parsed], Path(path).name)
    if key:
        _cache_put(key, header=header.to_dict())
    return header


# -- a cache of parsed headers and validation verdicts ------------------------------------------
# Parsing a large vocabulary takes most of a second, and every command that loads a model both
# validates and plans it. A file's facts are kept, keyed by its real path, size and mtime (HF
# cache blobs never change in place), in $LOCALRUN_HOME/headers/.

def _cache_key(path: str | Path) -> str | None:
    try:
        ident = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shard_paths(path)]
    except OSError:
        return None  # missing shards: let the parser report it
    return hashlib.sha256(json.dumps([_CACHE_VERSION, ident]).encode()).hexdigest()[:32]


def _cache_file(key: str) -> Path:
    from localrun import paths

    return paths.home() / "headers" / f"{key}.json"


def _cache_get(key: str) -> dict | None:
    try:
        return json.loads(_cache_file(key).read_text())
    except (OSError, ValueError):
        return None


def _cache_put(key: str, **entry: object) -> None:
    target = _cache_file(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        merged = {**(_cache_get(key) or {}), **entry}
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged))
        tmp.replace(target)
    except OSError:
        pass  # a read-only home only costs speed


# -- remote files ---------------------------------------------------------------------------------

def _remote_reader(repo_id: str, filename: str, revision: str | None, size: int | None):
    """A read(start, end) over HTTP Range requests, and the file size the server reports."""
    import httpx
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    from localrun import hub

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=hub.endpoint())
    headers = build_hf_headers(token=hub.token(), library_name="localrun")
    state = {"size": size}

    def read(start: int, end: int) -> bytes:
        if state["size"] is not None:
            end = min(end, state["size"])
            if start >= end:
                return b""
        want = end - start
        try:
            with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={start}-{end - 1}"},
                                      timeout=30.0) as r:
                if r.status_code == 416:
                    return b""
                hf_raise_for_status(r)
                total = r.headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit():
                    state["size"] = int(total)
                skip = start if r.status_code == 200 else 0  # server ignored Range: skip, then stop early
                out = bytearray()
                for chunk in r.iter_bytes():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    out += chunk
                    if len(out) >= want:
                        break
                if r.status_code == 200 and state["size"] is None:
                    length = r.headers.get("Content-Length", "")
                    state["size"] = int(length) if length.isdigit() else None
                return bytes(out[:want])
        except Exception as exc:
            translated = hub.translate_hub_error(exc)
            if isinstance(translated, NotFound):  # name what was not found
                what = filename if isinstance(exc, hf_errors.EntryNotFoundError) else None
                translated = NotFound(f"{what} not found in {repo_id}" if what
                                      else translated.message.replace("the repo", repo_id), hint=translated.hint)
            if translated is not None:
                raise translated from exc
            if isinstance(exc, httpx.HTTPError):
                raise NetworkError(f"cannot read the header of {filename}: {type(exc).__name__}",
                                   hint="check your connection or HF_ENDPOINT") from exc
            raise

    return read, state


def _parse_remote(repo_id: str, filename: str, revision: str | None, size: int | None) -> tuple[_Parsed, int]:
    read, state = _remote_reader(repo_id, filename, revision, size)
    first = read(0, FIRST_FETCH)
    label = filename.rsplit("/", 1)[-1]
    if first[:4] != b"GGUF":
        raise BadModel(f"{label} in {repo_id} is not a GGUF file", hint="pick another file or quant of the repo")
    total = state["size"] if state["size"] is not None else len(first)

    def cached_read(start: int, end: int) -> bytes:
        if start == 0 and end <= len(first):
            return first[:end]
        return read(start, end)

    return _parse_growing(cached_read, total, label), total


def read_remote_header(repo_id: str, filenames: list[str], *, revision: str | None = None,
                       sizes: list[int] | None = None) -> HeaderInfo:
    """The header of a model on the Hub, read with HTTP Range requests (every shard of a split)."""
    parsed = [_parse_remote(repo_id, name, revision, sizes[i] if sizes else None)
              for i, name in enumerate(filenames)]
    return _header([p for p, _ in parsed], [s for _, s in parsed], filenames[0].rsplit("/", 1)[-1])


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
_SWA_ARRAY_ARCHS = {"gemma4", "gemma4-assistant", "granite-swa", "step35", "mimo2", "maple", "spark2-5",
                    "dots3note", "dflash"}


def _swa_layers(arch: str, fields: dict[str, object], n_layer: int) -> tuple[int | None, list[bool]]:
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
    if isinstance(value, (list, _ArrayStub)):
        return f"[{len(value)} items]"
    return value


def _header(shards: list[_Parsed], sizes: list[int], label: str) -> HeaderInfo:
    fields: dict[str, object] = {}
    for parsed in shards:  # the first shard holds the metadata; later ones only split.*
        for key, value in parsed.fields.items():
            fields.setdefault(key, value)
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise BadModel(f"{label}: the GGUF header has no general.architecture")
    count = fields.get("split.count")
    if isinstance(count, int) and count > 1 and count != len(shards):
        raise BadModel(f"{label} is one of {count} shards, {len(shards)} found",
                       hint="keep every shard `-0000i-of-0000N.gguf` in the same folder")

    def key(name: str, default: object = None) -> object:
        return fields.get(f"{arch}.{name}", default)

    layer_re = re.compile(r"^blk\.(\d+)\.")
    tensors = [t for parsed in shards for t in parsed.tensors]
    n_layer_key = key("block_count")
    n_layer = n_layer_key if isinstance(n_layer_key, int) else 0
    blocks = [int(m.group(1)) for t in tensors if (m := layer_re.match(t.name))]
    n_layer = max(n_layer, max(blocks) + 1 if blocks else 0)
    layer_bytes = [0] * n_layer
    embd_bytes = output_bytes = other_bytes = 0
    has_output = False
    matmul_bytes: dict[str, int] = {}
    for t in tensors:
        if m := layer_re.match(t.name):
            layer_bytes[int(m.group(1))] += t.n_bytes
            if len(t.shape) >= 2:
                type_name = _type_name(t.ggml_type)
                matmul_bytes[type_name] = matmul_bytes.get(type_name, 0) + t.n_bytes
        elif t.name.startswith("token_embd"):
            embd_bytes += t.n_bytes
        elif t.name.startswith("output"):
            output_bytes += t.n_bytes
            has_output = has_output or t.name.startswith("output.")
        else:
            other_bytes += t.n_bytes

    n_embd = int(key("embedding_length", 0) or 0)
    head_count = key("attention.head_count", 0)
    n_head_layers = _per_layer(head_count, n_layer, 0)
    n_head = max(n_head_layers, default=0)
    n_head_kv = _per_layer(key("attention.head_count_kv"), n_layer, n_head)
    head_dim = n_embd // n_head if n_head else 0
    tokens = fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if isinstance(tokens, (list, _ArrayStub)) else int(key("vocab_size", 0) or 0)
    if not n_vocab:
        embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
        n_vocab = embd.shape[1] if embd is not None and len(embd.shape) > 1 else 0
    window, swa = _swa_layers(arch, fields, n_layer)
    file_type = fields.get("general.file_type")
    template = fields.get("tokenizer.chat_template")
    ff = key("feed_forward_length", 0)
    return HeaderInfo(
        architecture=arch,
        name=fields.get("general.name") if isinstance(fields.get("general.name"), str) else None,
        file_type=FTYPE_NAMES.get(file_type) if isinstance(file_type, int) else None,
        n_params=sum(t.n_elements for t in tensors),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=int(key("attention.key_length", 0) or head_dim),
        value_length=int(key("attention.value_length", 0) or head_dim),
        n_ctx_train=int(key("context_length", 0) or 0),
        sliding_window=window,
        swa_layers=swa,
        n_expert=int(key("expert_count", 0) or 0),
        n_expert_used=int(key("expert_used_count", 0) or 0),
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
        n_ff=max(_per_layer(ff, n_layer, 0), default=0),
        n_ff_expert=max(_per_layer(key("expert_feed_forward_length", 0), n_layer, 0), default=0),
        matmul_bytes=matmul_bytes,
    )


def _type_name(ggml_type: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(ggml_type).name


# -- validation -----------------------------------------------------------------------------------

def validate(path: str | Path) -> None:
    """Raise BadModel for what would make llama.cpp abort or fail on this file, checked in Python."""
    key = _cache_key(path)
    if key and (_cache_get(key) or {}).get("valid"):
        return
    header = _validate(path)
    if key:
        _cache_put(key, valid=True, header=header.to_dict())


def _validate(path: str | Path) -> HeaderInfo:
    shards = shard_paths(path)
    label = Path(path).name
    parsed, sizes = [], []
    for shard in shards:
        header, size = _parse_local(shard)
        sizes.append(size)
        for t in header.tensors:
            if header.data_start + t.offset + t.n_bytes > size:
                raise BadModel(f"{shard.name} is truncated: tensor {t.name} ends past the end of the file",
                               hint="download it again")
        parsed.append(header)
    info = _header(parsed, sizes, label)
    fields = parsed[0].fields
    tokens = fields.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        _check_vocab(fields, tokens, label)
    elif fields.get("tokenizer.ggml.model") not in ("none", "no_vocab") and info.architecture != "clip":
        raise BadModel(f"{label} has no tokenizer vocabulary (tokenizer.ggml.tokens)",
                       hint="re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    return info


def _check_vocab(fields: dict[str, object], tokens: list[str], label: str) -> None:
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        for i, tok in enumerate(tokens):
            if tok in seen:
                raise BadModel(f"{label} has a corrupt vocabulary: token {tok!r} (id {i}) appears twice "
                               "(llama.cpp would abort on it)", hint="download the model again, or another conversion of it")
            seen.add(tok)
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        values = fields.get(key)
        if values is not None and len(values) < len(tokens):  # type: ignore[arg-type]
            raise BadModel(f"{label} has a corrupt vocabulary: {key} has {len(values)} entries for "  # type: ignore[arg-type]
                           f"{len(tokens)} tokens")
    for key in ("bos", "eos", "unknown", "padding", "eot"):
        token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and token_id >= len(tokens):
            raise BadModel(f"{label} has a corrupt vocabulary: the {key} token id {token_id} is out of range "
                           f"({len(tokens)} tokens)")
