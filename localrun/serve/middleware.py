"""What every request goes through before the API sees it (each a small ASGI middleware, so every
route, /health included, and every route added later, passes the same checks):

- `Gate`, who may ask. A browser sends a page's requests wherever the page says, so any web page
  could drive a keyless server on this machine: cross-origin (its `Origin` header names the page)
  or by DNS rebinding (the page's own name made to resolve to 127.0.0.1: then the request is
  same-origin, and only the `Host` header, which still names the page's site, tells). A `Host`
  that does not name this server is refused with 421 Misdirected Request (RFC 9110: a request
  for a site this server does not answer for); an `Origin` other than the server's own, unless
  `--cors` allows it, with 403 Forbidden (the request reached the right server, which refuses to
  serve that page). Browsers' CORS preflights for allowed origins are Starlette's CORSMiddleware's.
- `BodyLimit`, how much and how slowly: 413 for a body over --max-body, 408 for one not all sent
  within the body timeout (a client that sends half a body is not waited for forever).
- `JsonBodies`: Ollama's API reads every body as JSON whatever its Content-Type (its own
  documentation's `curl -d '{...}'` sends a form's), so its routes here do too; the other APIs
  keep asking for application/json.
- `LastResort`: a failure no handler expected is one 500 in the API's shape and one log line,
  never a traceback on the server's log nor a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localrun.serve.errors import ApiError, dialect

Report = Callable[[str, ApiError], None]  # a refusal or failure for the log: the path, the error


def split_host(value: str) -> tuple[str, int | None]:
    """A `Host` header's name (lowercase, without a trailing dot or IPv6 brackets) and port:
    `[::1]:8080` -> ("::1", 8080), `LocalHost.` -> ("localhost", None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:  # a name, or a bare IPv6 address (as --allowed-host may give one)
        name, port = value, ""
    return name.rstrip("."), int(port) if port.isdigit() else None


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class Gate:
    """Refuse requests whose Host does not name this server (421) or whose Origin is not allowed (403)."""

    def __init__(
        self, app: ASGIApp, *, loopback: bool, allowed_hosts: Sequence[str], cors: Sequence[str], report: Report
    ):
        self.app, self.loopback, self.report = app, loopback, report
        self.hosts = {split_host(h)[0] for h in allowed_hosts}
        self.origins = {o.strip().rstrip("/") for o in cors}
        # beyond loopback, this machine's own names reach it too (a DNS-rebinding page has its own name)
        self.own_names = {"localhost"}
        if not loopback:
            name = socket.gethostname().lower()
            self.own_names |= {name, f"{name}.local", socket.getfqdn(name).lower()}

    def host_allowed(self, name: str) -> bool:
        if "*" in self.hosts or name in self.hosts or name in self.own_names:
            return True
        ip = _ip(name)
        # an address typed in a browser's address bar makes a page of this server's own origin
        return ip is not None and (ip.is_loopback or not self.loopback)

    def origin_allowed(self, origin: str, host: str) -> bool:
        """--cors allows it, or it is the server's own: http:// and the host the request was sent to."""
        if "*" in self.origins or origin.rstrip("/") in self.origins:
            return True
        name, port = split_host(host)
        try:
            parts = urlsplit(origin)
            return parts.scheme == "http" and (parts.hostname, parts.port or 80) == (name, port or 80)
        except ValueError:  # a port that is not a number
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        error = None
        if host is not None and not self.host_allowed(split_host(host)[0]):
            error = ApiError(
                421,
                f"this server does not answer for the host {host!r} (a web page may be trying to reach it "
                "through DNS rebinding); start it with --allowed-host NAME to answer for that name",
                code="host_not_allowed",
            )
        elif origin is not None and not self.origin_allowed(origin, host or ""):
            error = ApiError(
                403,
                f"requests from the web page origin {origin!r} are not allowed; start the server with "
                "--cors ORIGIN to allow that page",
                code="origin_not_allowed",
            )
        if error is None:
            await self.app(scope, receive, send)
            return
        self.report(f"{scope.get('method', '')} {scope['path']}", error)
        await error.response(scope["path"])(scope, receive, send)


class BodyLimit:
    """413 for a request body over `limit` bytes, declared or streamed (chunked), and 408 for one
    not all received within `timeout` seconds of the request's headers: the whole body is read
    here before the app sees it."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float, report: Report):
        self.app, self.limit, self.timeout, self.report = app, limit, timeout, report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, self._too_large())
            return
        parts: list[bytes] = []
        size, more = 0, True
        held: list[Message] = []
        error = None
        try:
            async with asyncio.timeout(self.timeout):
                while more and error is None:
                    message = await receive()
                    if message["type"] != "http.request":
                        held.append(message)  # a disconnect: handed on after the body
                        break
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    parts.append(chunk)
                    more = message.get("more_body", False)
                    error = self._too_large() if size > self.limit else None
        except TimeoutError:
            message = f"the request body was not all sent within {self.timeout:g} s"
            # the rest of the body is not waited for: the connection closes after the answer
            await self._refuse(scope, receive, send, ApiError(408, message, code="request_timeout"), close=True)
            return
        if error is not None:
            await self._refuse(scope, receive, send, error)
            return
        held.insert(0, {"type": "http.request", "body": b"".join(parts), "more_body": False})

        async def replay() -> Message:
            return held.pop(0) if held else await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over {self.limit} bytes", code="request_too_large")

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, error: ApiError, close: bool = False) -> None:
        self.report(f"{scope.get('method', '')} {scope['path']}", error)
        await error.response(scope["path"], close=close)(scope, receive, send)


class JsonBodies:
    """A body sent to one of Ollama's routes is JSON, whatever Content-Type says (see above)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and dialect(scope["path"]) == "ollama":
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class LastResort:
    """A failure that no handler expected: one 500 in the API's shape (or, once a stream has begun,
    its end) and one log line. Starlette's own handler for Exception re-raises after answering,
    which makes uvicorn print a traceback and drop the connection."""

    def __init__(self, app: ASGIApp, report: Report):
        self.app, self.report = app, report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            error = ApiError(500, f"unexpected {type(exc).__name__}: {exc}", type="server_error")
            self.report(f"{scope.get('method', '')} {scope['path']}", error)
            if not started:
                await error.response(scope["path"])(scope, receive, send)
                return
            with contextlib.suppress(Exception):  # the client may be gone already
                await send({"type": "http.response.body", "body": b"", "more_body": False})
