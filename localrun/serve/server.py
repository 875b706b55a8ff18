"""Serving the app: uvicorn on a socket bound here (so a --port 0 server knows its port before it
says its URL), and signals that end the server cleanly -- exit 0, streams ended first."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import signal
import socket
import threading
from collections.abc import Callable, Generator

import uvicorn
from fastapi import FastAPI

from localrun.errors import UsageError

GRACE = 10.0  # seconds uvicorn waits for connections to finish after the streams were ended


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: any free port); UsageError when taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"cannot bind to {host!r}: {exc.strerror}", hint="use an IP address or localhost") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} is in use on {host}", hint="pick another with --port (0: any free port)"
            ) from None
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)  # a client that connects once the URL is printed waits in the backlog, not refused
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    """The URL a client on this machine uses: a wildcard address is reached through loopback."""
    port = sock.getsockname()[1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if ip.is_unspecified:
        ip = ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    return f"http://[{ip}]:{port}" if ip.version == 6 else f"http://{ip}:{port}"


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


class _Server(uvicorn.Server):
    """uvicorn's server, told about the first Ctrl-C/SIGTERM (to end the streams in flight, which
    uvicorn would otherwise wait for), and not re-raising the signal once stopped: a server stopped
    as asked exits 0."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]):
        super().__init__(config)
        self._on_stop = on_stop

    def handle_exit(self, sig: int, frame: object) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        if first:  # out of the signal handler: ending the streams waits for each scheduler's step
            threading.Thread(target=self._on_stop, name="localrun-stop", daemon=True).start()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(app: FastAPI, sock: socket.socket, on_stop: Callable[[], None]) -> None:
    """Serve until Ctrl-C or SIGTERM; on_stop() is called (in a thread) at the first of them."""
    config = uvicorn.Config(
        app,
        log_config=None,  # no logging set-up of uvicorn's: the command says what happens, on stderr
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACE,
        ws="none",
    )
    _Server(config, on_stop).run(sockets=[sock])
