"""Errors as each API the server speaks reports them, with their HTTP status:
- OpenAI's (`/v1/...`): {"error": {"message", "type", "param", "code"}};
- Ollama's (`/api/...`): {"error": "message"};
- Anthropic's (`/v1/messages...`): {"type": "error", "error": {"type", "message"}}.
Which one a request gets follows from its path (`dialect`), so a check that answers before any
route (the body's limit, the Host and Origin gate) still answers in the client's own shape."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from starlette.responses import JSONResponse

from localrun.errors import AccessDenied, BadModel, LocalrunError, NetworkError, NoSpace, NotFound, UsageError
from localrun.serve.protocol import ErrorBody, ErrorResponse


class ApiError(Exception):
    """An error a client gets as OpenAI's error JSON, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.retry_after = retry_after
        self.logged = False  # said on the server's log already (with the request's figures)

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    def payload(self, dialect: Dialect = "openai") -> dict[str, Any]:
        """The error's JSON in an API's shape."""
        if dialect == "ollama":
            return {"error": self.message}
        if dialect == "anthropic":
            kind = ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else "invalid_request_error")
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        return self.body().model_dump()

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def response(self, path: str = "", *, close: bool = False) -> JSONResponse:
        """The error as an HTTP response, in the shape of the API `path` belongs to; close: the
        connection is closed after it (a request that was not read to its end)."""
        headers = self.headers() | ({"Connection": "close"} if close else {})
        return JSONResponse(self.payload(dialect(path)), status_code=self.status, headers=headers)


Dialect = Literal["openai", "ollama", "anthropic"]

# Anthropic's error types by status (its documented list; 529 is its "overloaded")
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def dialect(path: str) -> Dialect:
    """Which API a request path belongs to."""
    if path.startswith("/api/"):
        return "ollama"
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def invalid_request(problems: Sequence[Mapping[str, Any]], named: Callable[[str], str] = str) -> ApiError:
    """A 400 for what pydantic found wrong in a body (its `errors()`): where each of the first
    five problems is -- its location, or for a check of the whole body the field it names -- in
    the words of the client's API (`named`), and what is wrong there."""
    where = [
        named(".".join(str(p) for p in e.get("loc", ()) if p != "body") or (e.get("ctx") or {}).get("param") or "")
        for e in problems
    ]
    text = "; ".join(f"{w or 'body'}: {e.get('msg')}" for w, e in list(zip(where, problems))[:5])
    return ApiError(400, f"invalid request: {text}", param=(where[0] if where else "") or None)


def unsupported(param: str, why: str) -> ApiError:
    """A parameter localrun does not implement: refused, never silently ignored."""
    return ApiError(400, f"{param} is not supported by localrun: {why}", param=param, code="unsupported_parameter")


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="server_shutdown")


def from_localrun(exc: LocalrunError) -> ApiError:
    """A localrun error met while serving a request, with the status that says whose fault it is."""
    message = exc.message + (f" ({exc.hint})" if exc.hint else "")
    if isinstance(exc, UsageError):
        return ApiError(400, message)
    if isinstance(exc, NotFound):
        return ApiError(404, message, code="model_not_found")
    if isinstance(exc, NoSpace):
        return ApiError(503, message, type="server_error", code="no_memory", retry_after=5)
    if isinstance(exc, AccessDenied):  # the Hub refused a pull: the client's to fix (a token, a licence)
        return ApiError(403, message, type="permission_error", code="hub_access_denied")
    if isinstance(exc, NetworkError):  # upstream of this server (the Hub, an RPC worker) did not answer
        return ApiError(502, message, type="server_error", code="upstream_unreachable")
    code = "bad_model" if isinstance(exc, BadModel) else None
    return ApiError(500, message, type="server_error", code=code)


def as_api_error(exc: BaseException) -> ApiError:
    """What ended a reply in the generation core, as the client gets it: an abort is the server
    stopping, a localrun error keeps its meaning, anything else is the server's fault."""
    from localrun.inference.llama.runtime import DecodeAborted

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DecodeAborted):
        return shutting_down()
    if isinstance(exc, LocalrunError):
        return from_localrun(exc)
    return ApiError(500, f"generation failed: {exc}", type="server_error")
