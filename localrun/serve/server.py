"""Serving the app: uvicorn on a socket bound here (so a --port 0 server knows its port before it
says its URL), signals that end the server cleanly -- exit 0, streams ended first -- and bounds on
connections.

uvicorn closes a keep-alive connection idle after a response, but waits forever for a first
request, or for the rest of request headers sent a byte at a time (slowloris). Here a connection
with no request in progress (from its opening to its request's last header, and between requests)
is closed after `Limits.idle` seconds, and beyond `Limits.connections` open at once a new one is
answered 503 and closed: idle or trickling connections cannot hold the server's sockets. A body
sent too slowly is middleware.BodyLimit's (408)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import math
import signal
import socket
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from localrun.errors import UsageError
from localrun.serve.errors import ApiError

GRACE = 10.0  # seconds uvicorn waits for connections to finish after the streams were ended


@dataclass
class Limits:
    idle: float = 10.0  # seconds a connection may stay open with no request in progress
    connections: int = 512  # open at once; beyond, a new connection is answered 503 and closed


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


class _Connections:
    """The open connections by their peer's address, each with its deadline, and the ASGI app that
    tells a connection when a request is in progress on it (uvicorn names the peer in the scope)."""

    def __init__(self, app: ASGIApp, limits: Limits, notify: Callable[[str], None]):
        self.app, self.limits, self.notify = app, limits, notify
        self.open: dict[tuple[str, int], _Watched] = {}
        self.full = False  # said on the log once each time the limit is reached

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        connection = self.open.get((str(client[0]), int(client[1]))) if client else None
        if connection is not None:
            connection.busy += 1
            connection.disarm()
        try:
            await self.app(scope, receive, send)
        finally:
            if connection is not None:
                connection.busy -= 1
                connection.arm()

    def protocol(self, **uvicorn_args: object) -> _Watched:
        return _Watched(self, **uvicorn_args)  # type: ignore[arg-type]


def _refusal(limit: int) -> bytes:
    error = ApiError(
        503,
        f"the server has {limit} connections open, its limit: try again shortly",
        type="server_error",
        code="too_many_connections",
        retry_after=1,
    )
    body = error.body().model_dump_json().encode()
    head = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    return f"{head}Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


class _Watched(asyncio.Protocol):
    """A connection: uvicorn's HTTP/1.1 protocol inside, closed when idle too long, or refused
    beyond the limit."""

    def __init__(self, connections: _Connections, **uvicorn_args: object):
        self.http = H11Protocol(**uvicorn_args)  # type: ignore[arg-type]
        self.watch = connections
        self.busy = 0  # requests in progress
        self.peer: tuple[str, int] | None = None
        self.link: asyncio.Transport | None = None
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.http.connection_made(transport)
        self.link = transport
        open_ = self.watch.open
        if len(open_) >= self.watch.limits.connections:
            if not self.watch.full:
                self.watch.full = True
                self.watch.notify(f"{len(open_)} connections open, the limit: refusing new ones (503) until some close")
            transport.write(_refusal(self.watch.limits.connections))
            transport.close()
            return
        self.watch.full = False
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = (str(peer[0]), int(peer[1]))
            open_[self.peer] = self
        self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.peer is not None:
            self.watch.open.pop(self.peer, None)
        self.http.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.http.data_received(data)

    def eof_received(self) -> bool | None:
        return self.http.eof_received()

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()

    def arm(self) -> None:
        self.disarm()
        if self.busy == 0 and self.link is not None and not self.link.is_closing():
            self.deadline = asyncio.get_running_loop().call_later(self.watch.limits.idle, self._expire)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expire(self) -> None:
        self.deadline = None
        if self.busy == 0 and self.link is not None:
            self.link.close()


def serve(
    app: ASGIApp, sock: socket.socket, on_stop: Callable[[], None], limits: Limits, notify: Callable[[str], None]
) -> None:
    """Serve until Ctrl-C or SIGTERM; on_stop() is called (in a thread) at the first of them."""
    connections = _Connections(app, limits, notify)
    config = uvicorn.Config(
        connections,
        http=connections.protocol,  # type: ignore[arg-type]
        log_config=None,  # no logging set-up of uvicorn's: the command says what happens, on stderr
        log_level="warning",
        access_log=False,
        lifespan="on",
        proxy_headers=False,  # no proxy in front: X-Forwarded-For does not rename the client
        timeout_keep_alive=math.ceil(limits.idle),
        timeout_graceful_shutdown=GRACE,
        ws="none",
    )
    _Server(config, on_stop).run(sockets=[sock])
