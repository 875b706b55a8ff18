"""The GGUF header as bytes: key/value metadata and tensor infos, parsed over `read(offset, size)`.

Headers are parsed here rather than with gguf.GGUFReader: the reader builds a numpy view per
array element and takes ~25 s on Gemma 3's 262k-token vocabulary (measured on the dev box),
where this parser takes a fraction of a second. The `gguf` package still supplies the format's
constants (tensor types and their block sizes); tests check that both agree.

The reader may be a local file or HTTP Range requests: parsing starts from the first few MB and
asks for more until the tensor-info section is complete; tensor data is never read. Every count
and length is checked against what the file can hold before anything is allocated, so a corrupt
or hostile header costs an error message, not gigabytes of memory.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from localrun.errors import BadModel
from localrun.text import safe

Reader = Callable[[int, int], bytes]  # read(offset, size) -> at most `size` bytes from `offset`

FIRST_FETCH = 2 << 20  # most headers fit in 2-8 MB; Gemma 3's (262k-token vocabulary) needs 6.5 MB
MAX_HEADER = 512 << 20  # a header larger than this is not a model we can help with
DEFAULT_ALIGNMENT = 32
MAX_KEY = (1 << 16) - 1  # the GGUF spec bounds key names to 65535 bytes
MAX_TENSOR_NAME = 64  # GGML_MAX_NAME
MAX_DIMS = 4  # GGML_MAX_DIMS
KEEP_ARRAY = 1 << 16  # numeric arrays up to this length are kept (per-layer values); longer: counted

# GGUFValueType -> struct format of a scalar (STRING=8 and ARRAY=9 are handled apart)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_Q = struct.Struct("<Q")


@dataclass
class Tensor:
    name: str
    shape: list[int]
    ggml_type: int
    offset: int  # relative to the data section
    n_elements: int
    n_bytes: int


@dataclass
class ArrayStub:
    """A long array that was counted, not kept (merges, scores of a huge vocabulary)."""

    count: int

    def __len__(self) -> int:
        return self.count


@dataclass
class Parsed:
    fields: dict[str, object]  # scalars and kept arrays; long arrays as ArrayStub
    tensors: list[Tensor]
    data_start: int
    header_end: int
    version: int


class _NeedMore(Exception):
    """The bytes we have end inside the header; at least `needed` bytes are required."""

    def __init__(self, needed: int):
        super().__init__(needed)
        self.needed = needed


class _Cursor:
    def __init__(self, buf: bytes | bytearray, size: int, label: str):
        self.buf = buf
        self.pos = 0
        self.size = size  # the file's size: no length in the header may point past it
        self.label = label

    def corrupt(self, what: str) -> BadModel:
        return BadModel(
            f"{self.label}: corrupt GGUF header ({what})",
            hint="download the file again, or another conversion of the model",
        )

    def room(self, n: int, what: str) -> None:
        """Refuse a length the rest of the file cannot hold, before allocating for it."""
        if n < 0 or self.pos + n > self.size:
            raise BadModel(
                f"{self.label} is truncated: the GGUF header ends past the end of the file "
                f"({what} of {n:,} bytes at offset {self.pos:,}, in {self.size:,} bytes)",
                hint="download it again; if it repeats, the file is corrupt",
            )

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise _NeedMore(end)
        view = memoryview(self.buf)[self.pos : end]
        self.pos = end
        return view

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.take(size))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("Q")
        if limit is not None and n > limit:
            raise self.corrupt(f"{what} of {n:,} bytes, at most {limit:,} allowed")
        self.room(n, what)
        return bytes(self.take(n)).decode("utf-8", errors="replace")


def _string_array(cur: _Cursor, count: int, keep: bool, errors: str = "replace") -> list[str] | ArrayStub:
    """A tight loop: vocabularies have 100k+ strings."""
    buf, pos, end = cur.buf, cur.pos, len(cur.buf)
    unpack = _Q.unpack_from
    out: list[str] = []
    for _ in range(count):
        if pos + 8 > end:
            cur.pos = pos
            raise _NeedMore(pos + 8)
        n = unpack(buf, pos)[0]
        pos += 8
        if pos + n > cur.size:
            cur.pos = pos
            cur.room(n, "a string in an array")
        if pos + n > end:
            raise _NeedMore(pos + n)
        if keep:
            out.append(bytes(buf[pos : pos + n]).decode("utf-8", errors=errors))
        pos += n
    cur.pos = pos
    return out if keep else ArrayStub(count)


def _read_value(cur: _Cursor, vtype: int, key: str):
    if vtype in _SCALAR:
        return cur.unpack(_SCALAR[vtype])
    if vtype == 8:
        return cur.string(f"the value of {safe(key, 60)}")
    if vtype != 9:
        raise cur.corrupt(f"unknown value type {vtype} for {safe(key, 60)}")
    etype, count = cur.unpack("I"), cur.unpack("Q")
    if etype == 8:
        cur.room(8 * count, f"an array of {count:,} strings ({safe(key, 60)})")
        vocabulary = key == "tokenizer.ggml.tokens"
        keep = vocabulary or count <= KEEP_ARRAY  # merges and the like: counted
        # token texts byte for byte (two invalid ones must not both become U+FFFD): validation
        # compares them as llama.cpp does
        return _string_array(cur, count, keep, "surrogateescape" if vocabulary else "replace")
    if etype not in _SCALAR:
        raise cur.corrupt(f"unsupported array type {etype} for {safe(key, 60)}")
    size = struct.calcsize("<" + _SCALAR[etype])
    cur.room(size * count, f"an array of {count:,} values ({safe(key, 60)})")
    raw = cur.take(size * count)
    if count > KEEP_ARRAY:
        return ArrayStub(count)
    return list(struct.unpack_from(f"<{count}{_SCALAR[etype]}", raw))


def _parse(buf: bytes | bytearray, size: int, label: str) -> Parsed:
    """Parse a GGUF header from its first bytes. Raises _NeedMore when they end too early."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cur = _Cursor(buf, size, label)
    if len(buf) >= 4 and bytes(buf[:4]) != b"GGUF":
        raise BadModel(f"{label} is not a GGUF file", hint="localrun reads GGUF models (llama.cpp's format)")
    cur.take(4)
    version = cur.unpack("I")
    if version not in (2, 3):
        raise BadModel(
            f"{label}: unsupported GGUF version {version}", hint="re-convert the model with a recent llama.cpp"
        )
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    # the smallest key/value is 8 + 1 + 4 + 1 bytes, the smallest tensor info 8 + 1 + 4 + 8 + 4 + 8
    if n_kv * 14 > size or n_tensors * 33 > size:
        raise cur.corrupt(f"{n_tensors:,} tensors and {n_kv:,} keys cannot fit in {size:,} bytes")
    fields: dict[str, object] = {}
    for _ in range(n_kv):
        key = cur.string("a key name", MAX_KEY)
        fields[key] = _read_value(cur, cur.unpack("I"), key)
    tensors = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name", MAX_TENSOR_NAME)
        n_dims = cur.unpack("I")
        if n_dims > MAX_DIMS:
            raise cur.corrupt(f"tensor {safe(name, 64)} has {n_dims} dimensions")
        shape = [cur.unpack("Q") for _ in range(n_dims)]
        ggml_type, offset = cur.unpack("I"), cur.unpack("Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise BadModel(
                f"{label}: tensor {safe(name, 64)} has a type this gguf package does not know ({ggml_type})",
                hint="upgrade localrun's dependencies (pip install -U gguf llama-cpp-python)",
            ) from None
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        if shape and shape[0] % block:
            raise cur.corrupt(f"tensor {safe(name, 64)}: a row of {shape[0]} is not a whole number of blocks")
        n_bytes = n_elements // block * type_size  # where the data ends is for validate to check
        tensors.append(Tensor(name, shape, ggml_type, offset, n_elements, n_bytes))
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    alignment = alignment if isinstance(alignment, int) and 0 < alignment <= 1 << 20 else DEFAULT_ALIGNMENT
    data_start = -(-cur.pos // alignment) * alignment
    return Parsed(fields, tensors, data_start, cur.pos, version)


def parse(read: Reader, size: int, label: str) -> Parsed:
    """The header of a GGUF file of `size` bytes, reading as little as it can: more is asked for
    only when the header goes on past what was read."""
    if size < 4:
        raise BadModel(f"{label} is not a GGUF file", hint="localrun reads GGUF models (llama.cpp's format)")
    buf = bytearray(read(0, min(size, FIRST_FETCH)))
    if buf[:4] != b"GGUF":
        raise BadModel(f"{label} is not a GGUF file", hint="localrun reads GGUF models (llama.cpp's format)")
    while True:
        try:
            return _parse(buf, size, label)
        except _NeedMore as more:
            if len(buf) >= size:
                raise BadModel(
                    f"{label} is truncated: the GGUF header ends past the end of the file", hint="download it again"
                ) from None
            want = min(size, max(more.needed + (1 << 20), 2 * len(buf)))
            if want > MAX_HEADER:
                raise BadModel(f"{label}: GGUF header larger than {MAX_HEADER >> 20} MB") from None
            chunk = read(len(buf), want - len(buf))
            if not chunk:
                raise BadModel(f"{label} is truncated: the GGUF header ends past the end of the file") from None
            buf += chunk
