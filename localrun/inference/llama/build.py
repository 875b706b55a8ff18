"""The installed llama.cpp build: imported once with its log captured, what it can do, its quantizer."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from localrun.hardware import cpu_info
from localrun.inference.llama.log import install as install_log
from localrun.model.quants import FTYPE_NAMES

_backend_ready = False


def llama():
    """Import llama_cpp once, with its logs captured; everything imports it lazily through this
    (it loads a shared library and numpy: `localrun --help` must not pay for it)."""
    global _backend_ready
    import llama_cpp

    if not _backend_ready:
        install_log()
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return llama_cpp


def quantize(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], quant: str, threads: int = 2, requantize: bool = False
) -> Path:
    """Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize); `requantize`
    allows an already quantized source (e.g. a lower-precision variant of a real Q4_K_M)."""
    lc = llama()
    ftypes = {name: ftype for ftype, name in FTYPE_NAMES.items()}
    dst = Path(dst)
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftypes[quant.upper()]
    params.nthread = threads
    params.allow_requantize = requantize
    tmp = dst.with_name(dst.name + ".tmp")
    rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)  # its log stays captured
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {quant}")
    tmp.replace(dst)
    return dst


@dataclass
class BuildInfo:
    """What the installed llama-cpp-python / llama.cpp build can do."""

    version: str
    gpu_offload: bool
    system_info: str
    backends: list[str] = field(default_factory=list)

    @property
    def has_amx(self) -> bool:
        return bool(re.search(r"AMX_INT8 = 1", self.system_info))


def build_info() -> BuildInfo:
    """Ask the installed llama.cpp what it was built with (imports llama_cpp: call lazily)."""
    lc = llama()
    system_info = lc.llama_print_system_info().decode("utf-8", errors="replace").strip()
    try:
        backends = [
            lc.ggml_backend_reg_name(lc.ggml_backend_reg_get(i)).decode() for i in range(lc.ggml_backend_reg_count())
        ]
    except AttributeError:  # older bindings do not expose the backend registry
        backends = [m.group(1) for m in re.finditer(r"(\w+) : ", system_info)]
    from localrun.inference.llama.rpc import local_devices  # it reaches ggml through this module

    return BuildInfo(
        version=getattr(lc, "__version__", "unknown"),
        # a GPU here: llama_supports_gpu_offload() also says yes for a build with the RPC backend
        gpu_offload=any(d.kind in ("GPU", "iGPU") for d in local_devices()),
        system_info=system_info,
        backends=backends,
    )


@functools.cache  # neither the build nor the CPU changes while a process runs
def build_key() -> str:
    """Identifies a llama.cpp build on a CPU: a verdict holds as long as neither changes."""
    build, cpu = build_info(), cpu_info()
    raw = json.dumps([build.version, build.system_info, cpu.model, cpu.features, sys.executable])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]
