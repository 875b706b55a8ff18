"""What this machine has: CPU and its features, RAM, GPUs. One model of the machine, used by
the hardware report and by the memory planner."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field, replace

import psutil

from localrun.workers import Worker

# CPU flags llama.cpp's CPU backend has kernels for (names as in /proc/cpuinfo).
LLAMA_CPU_FLAGS = (
    "sse3", "ssse3", "avx", "avx2", "f16c", "fma", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512_vbmi", "avx512_vnni", "avx512_bf16",
    "amx_tile", "amx_int8", "amx_bf16", "neon", "sve", "dotprod", "i8mm",
)  # fmt: skip


@dataclass
class CPU:
    model: str = "unknown"
    arch: str = ""
    physical_cores: int | None = None
    logical_cores: int | None = None
    features: list[str] = field(default_factory=list)

    @property
    def has_amx(self) -> bool:
        return "amx_tile" in self.features or "amx_int8" in self.features


@dataclass
class GPU:
    name: str
    total: int  # bytes
    free: int  # bytes
    unified: bool = False  # shares system RAM (Apple silicon): RAM and VRAM are one pool
    backend: str = ""  # "cuda", "metal", ...


@dataclass
class Machine:
    """RAM, GPUs and CPU, plus what the installed llama.cpp build may use here (the self-test's
    verdict on extra buffer types): everything the planner needs to know about where it runs."""

    ram_total: int
    ram_available: int
    gpus: list[GPU] = field(default_factory=list)
    cpu: CPU = field(default_factory=CPU)
    os: str = ""
    extra_bufts: bool = True  # False when the self-test disabled repacking on this build
    workers: tuple[Worker, ...] = ()  # other machines lending their devices (--rpc), as they answered

    @property
    def unified(self) -> bool:
        return any(g.unified for g in self.gpus)

    def with_extra_bufts(self, extra_bufts: bool) -> Machine:
        return replace(self, extra_bufts=extra_bufts)

    def with_workers(self, workers: tuple[Worker, ...]) -> Machine:
        return replace(self, workers=workers)

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


def cpu_info() -> CPU:
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
    return CPU(
        model=model,
        arch=platform.machine(),
        physical_cores=psutil.cpu_count(logical=False),
        logical_cores=psutil.cpu_count(logical=True),
        features=wanted,
    )


def _nvidia_gpus() -> list[GPU]:
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
            gpus.append(
                GPU(name if isinstance(name, str) else name.decode(), int(mem.total), int(mem.free), backend="cuda")
            )
    finally:
        pynvml.nvmlShutdown()
    return gpus


def nvml_available() -> bool:
    """Whether nvidia-ml-py is installed (without it NVIDIA GPUs cannot be seen)."""
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return False
    return True


def nvidia_driver_present() -> bool:
    """An NVIDIA driver is loaded: worth suggesting nvidia-ml-py when it is missing."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def _apple_gpu(ram_total: int, ram_available: int) -> list[GPU]:
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return []
    # Metal may wire about 2/3 (≤36 GiB RAM) to 3/4 of unified memory for the GPU by default.
    share = 0.75 if ram_total > 36 * 2**30 else 2 / 3
    return [
        GPU(
            "Apple GPU (Metal)",
            int(ram_total * share),
            int(min(ram_available, ram_total * share)),
            unified=True,
            backend="metal",
        )
    ]


def detect() -> Machine:
    """This machine as it is now (RAM available changes; call again for a fresh figure)."""
    vm = psutil.virtual_memory()
    return Machine(
        ram_total=int(vm.total),
        ram_available=int(vm.available),
        gpus=_nvidia_gpus() + _apple_gpu(vm.total, vm.available),
        cpu=cpu_info(),
        os=f"{platform.system()} {platform.release()}",
    )


def default_threads() -> int:
    """llama.cpp is fastest with one thread per physical core."""
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
