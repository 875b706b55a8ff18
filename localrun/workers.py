"""Workers: other machines that lend their devices through ggml's RPC server (`localrun worker`,
or llama.cpp's own `rpc-server`), and this process's view of them.

Before llama.cpp is told about a worker, it is asked here, in Python over a socket with a
timeout, for its protocol version, its devices and their memory: llama.cpp's own client aborts
the process on a worker that is unreachable or speaks another version, and waits without a bound
on one that does not answer. The wire format (ggml-rpc.cpp, protocol 7): a request is one command
byte, its size as a little-endian uint64 and its bytes; a reply is its size and its bytes. The
first request of a connection must be HELLO.

A worker serves one client at a time (it accepts the next connection when the current one
closes), so each worker is asked once per process, before any model uses it: `use` keeps what
it answered for the planner and the loader.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from localrun.errors import NetworkError, UsageError
from localrun.text import human_bytes, safe

PROTO_MAJOR, PROTO_MINOR = 7, 0  # ggml-rpc.h of the llama.cpp that llama-cpp-python 0.3.36 ships
DEFAULT_PORT = 50052
TIMEOUT = 3.0  # seconds for a worker to accept, and to answer each request
CMD_GET_DEVICE_MEMORY, CMD_HELLO, CMD_DEVICE_COUNT = 11, 14, 15
CONN_CAPS = 24  # bytes of transport capabilities in HELLO (zeros: plain TCP)


@dataclass(frozen=True)
class WorkerDevice:
    index: int
    free: int  # bytes
    total: int


@dataclass(frozen=True)
class Worker:
    endpoint: str  # HOST:PORT, as given
    version: str  # the RPC protocol it speaks, e.g. "7.0.0"
    devices: tuple[WorkerDevice, ...] = field(default_factory=tuple)

    @property
    def free(self) -> int:
        return sum(d.free for d in self.devices)

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)

    def device_name(self, index: int) -> str:
        """How a plan names one of its devices: the endpoint, with the index when there are several."""
        return self.endpoint if len(self.devices) == 1 else f"{self.endpoint}#{index}"

    def describe(self) -> str:
        parts = [f"{human_bytes(d.free)} free of {human_bytes(d.total)}" for d in self.devices]
        return f"{len(self.devices)} device{'s' * (len(self.devices) != 1)}: " + "; ".join(parts)


def parse_endpoints(text: str) -> tuple[str, ...]:
    """`HOST:PORT[,HOST:PORT...]` as endpoints; a usage error naming the one that is not one."""
    endpoints = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--rpc {safe(item)}: not HOST:PORT", hint=f"e.g. --rpc 10.0.0.2:{DEFAULT_PORT}")
        if host.startswith("[") and host.endswith("]"):
            raise UsageError(f"--rpc {safe(item)}: llama.cpp's RPC client takes IPv4 addresses and host names")
        if item not in endpoints:
            endpoints.append(item)
    if not endpoints:
        raise UsageError("--rpc names no worker", hint=f"e.g. --rpc 10.0.0.2:{DEFAULT_PORT}")
    if len(endpoints) > 16:  # GGML_RPC_MAX_SERVERS
        raise UsageError(f"--rpc names {len(endpoints)} workers; llama.cpp takes at most 16")
    return tuple(endpoints)


def _fail(endpoint: str, what: str, hint: str | None = None) -> NetworkError:
    return NetworkError(f"worker {safe(endpoint)} {what}", hint=hint)


_START_HINT = "start it there with `localrun worker --host 0.0.0.0` (or check HOST:PORT)"


def _recv(sock: socket.socket, size: int, endpoint: str) -> bytes:
    data = bytearray()
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except TimeoutError:
            raise _fail(
                endpoint,
                f"accepted the connection but did not answer within {TIMEOUT:.0f} s",
                "a worker serves one client at a time: is another client using it?",
            ) from None
        except OSError as exc:
            raise _fail(endpoint, f"closed the connection ({exc.strerror or exc})") from None
        if not chunk:
            raise _fail(
                endpoint,
                "closed the connection without answering",
                f"is it a localrun worker or llama.cpp rpc-server of protocol {PROTO_MAJOR}.x?",
            )
        data += chunk
    return bytes(data)


def _request(sock: socket.socket, endpoint: str, cmd: int, payload: bytes, reply: int) -> bytes:
    try:
        sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
    except OSError as exc:
        raise _fail(endpoint, f"closed the connection ({exc.strerror or exc})") from None
    (size,) = struct.unpack("<Q", _recv(sock, 8, endpoint))
    if size != reply:
        raise _fail(endpoint, f"answered {size} bytes where the protocol has {reply}: not an RPC worker")
    return _recv(sock, reply, endpoint)


def _connect(endpoint: str) -> socket.socket:
    host, _, port = endpoint.rpartition(":")
    try:
        return socket.create_connection((host, int(port)), timeout=TIMEOUT)
    except ConnectionRefusedError:
        raise _fail(endpoint, "refused the connection: no worker listens there", _START_HINT) from None
    except socket.gaierror:
        raise _fail(endpoint, f"is unknown: no address for {safe(host)}") from None
    except TimeoutError:
        raise _fail(
            endpoint, f"did not accept a connection within {TIMEOUT:.0f} s", "is the host up, and the port open?"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            raise _fail(endpoint, "cannot be reached: no route to the host") from None
        raise _fail(endpoint, f"cannot be reached: {exc.strerror or exc}") from None


def probe(endpoint: str) -> Worker:
    """Ask a worker for its protocol version, its devices and their memory (bounded by TIMEOUT)."""
    with _connect(endpoint) as sock:
        sock.settimeout(TIMEOUT)
        hello = _request(sock, endpoint, CMD_HELLO, bytes(CONN_CAPS), 4 + CONN_CAPS)
        major, minor, patch = hello[0], hello[1], hello[2]
        version = f"{major}.{minor}.{patch}"
        if major != PROTO_MAJOR or minor > PROTO_MINOR:
            raise _fail(
                endpoint,
                f"speaks RPC protocol {version}; this llama.cpp speaks {PROTO_MAJOR}.{PROTO_MINOR}",
                "install the same llama-cpp-python (or llama.cpp) version on both machines",
            )
        (count,) = struct.unpack("<I", _request(sock, endpoint, CMD_DEVICE_COUNT, b"", 4))
        devices = []
        for index in range(min(count, 64)):
            reply = _request(sock, endpoint, CMD_GET_DEVICE_MEMORY, struct.pack("<I", index), 16)
            free, total = struct.unpack("<QQ", reply)
            devices.append(WorkerDevice(index, free, total))
    if not devices:
        raise _fail(endpoint, "has no device to lend")
    return Worker(endpoint, version, tuple(devices))


def probe_all(endpoints: Iterable[str]) -> tuple[Worker, ...]:
    """Every worker asked at once; the first failure (in the order given) is raised."""
    endpoints = list(endpoints)
    results: list[Worker | NetworkError | None] = [None] * len(endpoints)

    def ask(i: int) -> None:
        try:
            results[i] = probe(endpoints[i])
        except NetworkError as exc:
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(len(endpoints))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for result in results:
        if isinstance(result, NetworkError):
            raise result
    return tuple(r for r in results if isinstance(r, Worker))


def gone(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether nothing listens at `endpoint` any more: the connection is refused (a dead worker's
    port) or has no route. One that accepts, or does not answer in time, may be a live worker busy
    with a client (it accepts the next connection only when the current one closes)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return False
    except TimeoutError:
        return False
    except OSError:
        return True


_in_use: tuple[Worker, ...] = ()


def use(endpoints: Iterable[str]) -> tuple[Worker, ...]:
    """Probe the workers this process will split models across, and keep what they answered."""
    global _in_use
    _in_use = probe_all(endpoints)
    return _in_use


def in_use() -> tuple[Worker, ...]:
    """The workers `use` probed (none unless --rpc or LOCALRUN_RPC named some)."""
    return _in_use
