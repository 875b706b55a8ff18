"""llama.cpp's RPC backend through ggml's C API (ctypes): lend this machine's devices to other
machines (`localrun worker`), and use theirs (`--rpc`).

llama-cpp-python binds llama.h only; the backend registry (ggml-backend.h) and the RPC backend's
entry points (ggml-rpc.h, reached through the registry's proc addresses, as llama.cpp's own
tools do) are declared here. They exist when llama-cpp-python was built with -DGGML_RPC=ON.

llama.cpp's RPC client has no way to report a lost worker: it aborts the process (GGML_ABORT:
"Remote RPC server crashed or returned malformed response"). Workers are therefore probed in
Python first (localrun.workers), and `guard_abort` turns the abort of one lost mid-reply into
one line naming it and exit 5, instead of SIGABRT.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from localrun import workers
from localrun.errors import ExitCode, UsageError
from localrun.inference.llama.build import llama
from localrun.text import safe


def rebuild_command() -> str:
    """How to rebuild the installed llama-cpp-python with the RPC backend: the same version, from
    source (--no-binary), never from pip's cache (a wheel cached without RPC would come back)."""
    try:
        from importlib.metadata import version

        pinned = f"llama-cpp-python=={version('llama-cpp-python')}"
    except Exception:  # not installed as a distribution: name it without a version
        pinned = "llama-cpp-python"
    return (
        'CMAKE_ARGS="-DGGML_RPC=ON" pip install --force-reinstall --no-deps --no-cache-dir '
        f"--no-binary llama-cpp-python {pinned}"
    )


DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "iGPU", 3: "ACCEL", 4: "META"}  # enum ggml_backend_dev_type


@dataclass(frozen=True)
class Device:
    """A device of this machine that llama.cpp's backends see."""

    name: str  # ggml's: CPU, CUDA0, Metal, ...
    description: str
    kind: str  # CPU, GPU, iGPU, ACCEL
    free: int
    total: int


@functools.cache
def ggml() -> ctypes.CDLL:
    """libggml (the registry) and libggml-base (devices, tensors), as llama_cpp loaded them, declared."""
    import llama_cpp

    llama()
    folder = Path(llama_cpp.__file__).parent / "lib"
    libs = []
    for stem in ("ggml", "ggml-base"):
        found = sorted(folder.glob(f"lib{stem}.so*")) + sorted(folder.glob(f"lib{stem}*.dylib"))
        found += sorted(folder.glob(f"{stem}.dll"))
        if found:
            libs.append(ctypes.CDLL(str(found[0]), mode=getattr(ctypes, "RTLD_GLOBAL", 0)))

    class Both:  # a symbol from whichever library defines it
        def __getattr__(self, name: str):
            for lib in libs:
                try:
                    return getattr(lib, name)
                except AttributeError:
                    continue
            raise AttributeError(name)

    g = Both()
    p, s = ctypes.c_void_p, ctypes.c_size_t
    for name, res, args in (
        ("ggml_backend_reg_by_name", p, [ctypes.c_char_p]),
        ("ggml_backend_register", None, [p]),
        ("ggml_backend_reg_get_proc_address", p, [p, ctypes.c_char_p]),
        ("ggml_backend_reg_name", ctypes.c_char_p, [p]),
        ("ggml_backend_reg_dev_count", s, [p]),
        ("ggml_backend_reg_dev_get", p, [p, s]),
        ("ggml_backend_dev_count", s, []),
        ("ggml_backend_dev_get", p, [s]),
        ("ggml_backend_dev_by_name", p, [ctypes.c_char_p]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [p]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [p]),
        ("ggml_backend_dev_type", ctypes.c_int, [p]),
        ("ggml_backend_dev_backend_reg", p, [p]),
        ("ggml_backend_dev_memory", None, [p, ctypes.POINTER(s), ctypes.POINTER(s)]),
        ("ggml_set_abort_callback", p, [p]),
        ("ggml_backend_dev_by_type", p, [ctypes.c_int]),
        ("ggml_backend_dev_buffer_type", p, [p]),
        ("ggml_get_name", ctypes.c_char_p, [p]),
    ):
        fn = getattr(g, name)
        fn.restype, fn.argtypes = res, args
    return g  # type: ignore[return-value]


def supported() -> bool:
    """Whether this llama-cpp-python was built with the RPC backend."""
    return bool(llama().llama_supports_rpc())


def require() -> None:
    """Raise, with how to rebuild, when this build has no RPC backend."""
    if not supported():
        raise UsageError(
            "this llama-cpp-python was built without llama.cpp's RPC backend",
            hint=f"rebuild it with the RPC backend: {rebuild_command()}",
        )


def _rpc_proc(name: str) -> int:
    g = ggml()
    reg = g.ggml_backend_reg_by_name(b"RPC")
    address = g.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not address:
        raise UsageError(f"this llama.cpp build has no {name}", hint=f"rebuild it: {rebuild_command()}")
    return address


def local_devices() -> list[Device]:
    """This machine's devices (workers' devices left out), with their memory now."""
    g = ggml()
    found = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        reg = g.ggml_backend_dev_backend_reg(dev)
        if reg and (g.ggml_backend_reg_name(reg) or b"") == b"RPC":
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(
            Device(
                (g.ggml_backend_dev_name(dev) or b"?").decode(errors="replace"),
                (g.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                DEVICE_TYPES.get(g.ggml_backend_dev_type(dev), "?"),
                free.value,
                total.value,
            )
        )
    return found


def lent_devices(names: Sequence[str] = ()) -> list[Device]:
    """The devices a worker lends: those named, else every GPU and accelerator, else the CPU (as
    llama.cpp's rpc-server chooses)."""
    devices = local_devices()
    if names:
        by_name = {d.name.lower(): d for d in devices}
        missing = [n for n in names if n.lower() not in by_name]
        if missing:
            raise UsageError(
                f"no device named {safe(missing[0])} here", hint="devices: " + ", ".join(d.name for d in devices)
            )
        return [by_name[n.lower()] for n in names]
    return [d for d in devices if d.kind not in ("CPU", "ACCEL")] or [d for d in devices if d.kind == "CPU"][:1]


def serve(endpoint: str, devices: Sequence[Device], threads: int, cache_dir: str | None) -> None:
    """Serve `devices` at `endpoint` (HOST:PORT) with ggml's RPC server. Blocks for good: call it
    in a thread of a process that ends by signal (localrun.commands.worker)."""
    require()
    g = ggml()
    handles = (ctypes.c_void_p * len(devices))(*(g.ggml_backend_dev_by_name(d.name.encode()) for d in devices))
    start = ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)
    )(_rpc_proc("ggml_backend_rpc_start_server"))
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, len(devices), handles)


_registered: dict[str, int] = {}


def add_servers(endpoints: Iterable[str]) -> None:
    """Register the workers' devices with llama.cpp (once per endpoint and process): a model
    loaded after this may put layers on them. Probe them first (localrun.workers): llama.cpp
    aborts on one it cannot reach."""
    endpoints = [e for e in endpoints if e not in _registered]
    if not endpoints:
        return
    require()
    g = ggml()
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(_rpc_proc("ggml_backend_rpc_add_server"))
    guard_abort()
    for endpoint in endpoints:
        reg = add(endpoint.encode())
        if not reg:
            raise UsageError(f"worker {safe(endpoint)} lends no device")
        g.ggml_backend_register(reg)
        _registered[endpoint] = reg


def model_devices(endpoints: Sequence[str], count: int) -> tuple[ctypes.Array, int]:
    """The `count` devices a split model is loaded on, as llama_model_params.devices takes them
    (a NULL-terminated array): the workers' devices in the order given, then this machine's GPUs
    (the order fit.Plan.tensor_split counts layers in); and how many of them are GPUs here.
    (llama.cpp's own choice, when none are given, leaves out workers registered at run time.)"""
    add_servers(endpoints)
    g = ggml()
    chosen = []
    for endpoint in endpoints:
        reg = _registered[endpoint]
        chosen += [g.ggml_backend_reg_dev_get(reg, i) for i in range(g.ggml_backend_reg_dev_count(reg))]
    remote = len(chosen)
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        gpu = DEVICE_TYPES.get(g.ggml_backend_dev_type(dev)) == "GPU"
        if len(chosen) < count and gpu and g.ggml_backend_reg_name(g.ggml_backend_dev_backend_reg(dev)) != b"RPC":
            chosen.append(dev)
    return (ctypes.c_void_p * (len(chosen) + 1))(*chosen, None), len(chosen) - remote


class _BuftOverride(ctypes.Structure):  # llama.h's llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


OUTPUT_TENSORS = rb"^(output|token_embd)\."  # the output layer's (token_embd: a tied output's copy)


def output_here() -> ctypes.Array:
    """llama_model_params.tensor_buft_overrides that keep the output layer in this machine's RAM:
    llama.cpp would put it on the last worker, which then sends every token's logits back (1 MiB
    a token for a 262k vocabulary) instead of one row of activations."""
    g = ggml()
    cpu = g.ggml_backend_dev_buffer_type(g.ggml_backend_dev_by_type(0))
    return (_BuftOverride * 2)(_BuftOverride(OUTPUT_TENSORS, cpu), _BuftOverride(None, None))


_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


@_ABORT_CALLBACK
def _on_abort(message: bytes | None) -> None:
    """ggml's abort hook: a lost worker becomes one line and exit 5; any other abort goes on to
    abort() as before. It runs on llama.cpp's thread, just before the process would die."""
    text = (message or b"").decode(errors="replace")
    if "RPC" not in text and "Failed to connect" not in text:
        os.write(2, (text + "\n").encode(errors="replace"))  # what ggml prints when no hook is set
        return
    lost: list[str] = []
    for _ in range(8):  # a worker that just died may still accept for a moment while its process ends
        lost = [e for e in _registered if workers.gone(e)]
        if lost:
            break
        time.sleep(0.25)
    lost = lost or list(_registered)
    names = " or ".join(lost)
    line = f"error: worker {names} stopped answering: the model cannot go on without its layers\n"
    hint = "hint: start the worker again (`localrun worker`), then run again\n"
    try:
        sys.stdout.flush()
    except Exception:  # a closed stdout must not stop the line below
        pass
    os.write(2, (line + hint).encode(errors="replace"))
    os._exit(ExitCode.NETWORK)


def guard_abort() -> None:
    """Install the hook that turns llama.cpp's abort on a lost worker into a clean exit."""
    ggml().ggml_set_abort_callback(ctypes.cast(_on_abort, ctypes.c_void_p))
