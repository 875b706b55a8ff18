"""What this machine has: CPU and its features, RAM, GPUs, and what the llama.cpp build supports."""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field

import psutil

# CPU flags llama.cpp's CPU backend has kernels for (names as in /proc/cpuinfo).
LLAMA_CPU_FLAGS = (
    "sse3", "ssse3", "avx", "avx2", "f16c", "fma", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512_vbmi", "avx512_vnni", "avx512_bf16",
    "amx_tile", "amx_int8", "amx_bf16", "neon", "sve", "dotprod", "i8mm",
)


@dataclass
class CPUInfo:
    model: str
    arch: str
    physical_cores: int | None
    logical_cores: int | None
    features: list[str]

    @property
    def has_amx(self) -> bool:
        return "amx_tile" in self.features or "amx_int8" in self.features


@dataclass
class GPUInfo:
    name: str
    backend: str  # "cuda", "metal", ...
    total_bytes: int
    free_bytes: int
    unified: bool = False  # shares system RAM (Apple silicon)


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


@dataclass
class MachineInfo:
    os: str
    cpu: CPUInfo
    ram_total: int
    ram_available: int
    gpus: list[GPUInfo]

    @property
    def unified_memory(self) -> bool:
        return any(g.unified for g in self.gpus)

    def to_dict(self) -> dict:
        return asdict(self)


def _cpuinfo_linux() -> tuple[str, list[str]]:
    model, flags = "", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def cpu_info() -> CPUInfo:
    model, flags = ("", [])
    if platform.system() == "Linux":
        model, flags = _cpuinfo_linux()
    if platform.machine() in ("arm64", "aarch64") and not flags:
        flags = ["neon"]
    model = model or platform.processor() or platform.machine()
    present = set(flags) | ({"sse3"} if "pni" in flags else set())  # Linux calls SSE3 "pni"
    wanted = [f for f in LLAMA_CPU_FLAGS if f in present]
    if "asimddp" in flags:
        wanted.append("dotprod")
    return CPUInfo(
        model=model,
        arch=platform.machine(),
        physical_cores=psutil.cpu_count(logical=False),
        logical_cores=psutil.cpu_count(logical=True),
        features=wanted,
    )


def _nvidia_gpus() -> list[GPUInfo]:
    try:
        import pynvml  # from nvidia-ml-py, optional
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no device: NVML raises its own error types
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GPUInfo(name=name if isinstance(name, str) else name.decode(),
                                backend="cuda", total_bytes=int(mem.total), free_bytes=int(mem.free)))
    finally:
        pynvml.nvmlShutdown()
    return gpus


def _apple_gpu(ram_total: int, ram_available: int) -> list[GPUInfo]:
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return []
    # Metal may wire about 2/3 (≤36 GiB RAM) to 3/4 of unified memory for the GPU by default.
    share = 0.75 if ram_total > 36 * 2**30 else 2 / 3
    return [GPUInfo(name="Apple GPU (Metal)", backend="metal", total_bytes=int(ram_total * share),
                    free_bytes=int(min(ram_available, ram_total * share)), unified=True)]


def machine_info() -> MachineInfo:
    vm = psutil.virtual_memory()
    gpus = _nvidia_gpus() + _apple_gpu(vm.total, vm.available)
    return MachineInfo(
        os=f"{platform.system()} {platform.release()}",
        cpu=cpu_info(),
        ram_total=int(vm.total),
        ram_available=int(vm.available),
        gpus=gpus,
    )


def build_info() -> BuildInfo:
    """Ask the installed llama.cpp what it was built with. Imports llama_cpp (slow): call lazily."""
    import llama_cpp

    from localrun.llama_log import install

    install()
    system_info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    backends = []
    try:
        for i in range(llama_cpp.ggml_backend_reg_count()):
            backends.append(llama_cpp.ggml_backend_reg_name(llama_cpp.ggml_backend_reg_get(i)).decode())
    except AttributeError:  # older bindings do not expose the backend registry
        backends = [m.group(1) for m in re.finditer(r"(\w+) : ", system_info)]
    return BuildInfo(
        version=getattr(llama_cpp, "__version__", "unknown"),
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        system_info=system_info,
        backends=backends,
    )


def default_threads() -> int:
    """llama.cpp is fastest with one thread per physical core."""
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
