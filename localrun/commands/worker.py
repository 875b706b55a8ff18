"""`localrun worker`: lend this machine's devices to localrun (or llama.cpp) on other machines,
through ggml's RPC server, until Ctrl-C or SIGTERM.

The server is llama.cpp's own (`ggml_backend_rpc_start_server`, in the library llama-cpp-python
ships). It blocks in C for good, so it runs in a thread of its own while the main thread waits
for a signal; on one the worker unregisters itself and exits 0 (the process ends the thread).
It serves one client at a time, as llama.cpp's rpc-server does.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from dataclasses import asdict, dataclass

import psutil

from localrun import workers
from localrun.errors import LocalrunError, UsageError
from localrun.hardware import default_threads
from localrun.inference.llama import rpc
from localrun.output import Output
from localrun.serve import state
from localrun.serve.server import is_loopback
from localrun.text import human_bytes, safe
from localrun.workers import DEFAULT_PORT, Worker

EXPOSED = (
    "the worker listens beyond this machine: RPC has no authentication and no encryption, and anyone "
    "who reaches {endpoint} can use its memory and devices; keep it on a private network or reach it "
    "through an SSH tunnel"
)


@dataclass
class WorkerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    threads: int | None = None
    cache: str | None = None  # a folder where the server keeps tensors it was sent (large ones, by hash)
    devices: tuple[str, ...] = ()  # ggml device names; none: every GPU, else the CPU
    verbose: bool = False


def use_workers(given: str | None, out: Output, *, need_build: bool = True) -> tuple[Worker, ...]:
    """--rpc (or LOCALRUN_RPC) on a command that plans or loads a model: ask each worker once,
    before any plan, what it lends (said on stderr); the planner and the loader then use them.
    `need_build`: refuse a llama.cpp built without the RPC backend (hw lists workers whatever
    the build)."""
    if not given:
        return ()
    endpoints = workers.parse_endpoints(given)
    if need_build:
        rpc.require()
    found = workers.use(endpoints)
    for worker in found:
        out.info(f"worker {worker.endpoint}: {worker.describe()}")
    return found


def _check_port(host: str, port: int) -> None:
    """Bind once in Python first: a port in use is one line, not a message from C and a thread
    that ends."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise LocalrunError(
            f"cannot listen on {safe(host)}:{port}: {exc.strerror or exc}",
            hint="another worker (or program) uses that port? choose another with --port",
        ) from None


def run_worker(settings: WorkerSettings, out: Output) -> int:
    """Serve until a signal; the exit code."""
    rpc.require()
    if ":" in settings.host:
        raise UsageError("--host: llama.cpp's RPC server listens on IPv4 addresses", hint="e.g. 0.0.0.0")
    devices = rpc.lent_devices(settings.devices)
    endpoint = f"{settings.host}:{settings.port}"
    _check_port(settings.host, settings.port)
    if settings.cache:
        os.makedirs(settings.cache, exist_ok=True)
    threads = settings.threads or default_threads()
    if not is_loopback(settings.host):
        out.warn(EXPOSED.format(endpoint=endpoint))
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    if out.json:
        out.json_line({"endpoint": endpoint, "devices": [asdict(d) for d in devices]})
    else:
        out.text(f"{endpoint}\n")  # the one line of data: what another machine passes to --rpc
    for d in devices:
        # ggml says a CPU has all its RAM free; what is available now is more use to whoever reads this
        free = psutil.virtual_memory().available if d.kind == "CPU" else d.free
        out.info(f"lending {d.name} ({safe(d.description)}): {human_bytes(free)} free of {human_bytes(d.total)}")
    out.info(f"use it from another machine with --rpc {endpoint}; Ctrl-C stops it")
    sys.stdout.flush()
    # llama.cpp's server prints its own lines on stdout: they go to stderr with --verbose, else nowhere
    quiet = os.open(os.devnull, os.O_WRONLY) if not settings.verbose else sys.stderr.fileno()
    os.dup2(quiet, sys.stdout.fileno())
    failed: list[BaseException] = []

    def lend() -> None:
        try:
            rpc.serve(endpoint, devices, threads, settings.cache)
        except BaseException as exc:  # reported by the main thread
            failed.append(exc)
        stopping.set()

    record = state.register(
        f"rpc://{endpoint}", [], kind="worker", lends=[f"{d.name} {human_bytes(d.total)}" for d in devices]
    )
    try:
        server = threading.Thread(target=lend, name="rpc-server", daemon=True)
        server.start()
        while not stopping.wait(0.5):
            pass
    finally:
        state.unregister(record)
    if server.is_alive():  # stopped by a signal: the C call never returns, the process ends it
        out.info("worker stopped")
        return 0
    if failed and isinstance(failed[0], LocalrunError):
        raise failed[0]
    raise LocalrunError(f"the RPC server at {endpoint} stopped", hint="run with --verbose for llama.cpp's reason")
