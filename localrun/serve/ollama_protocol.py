"""Request and response bodies in the shapes Ollama's API (docs/api.md, and its official `ollama`
client's `_types.py`) uses.

Requests follow the conventions of the OpenAI bodies (protocol.py): unknown top-level fields are
ignored, known ones take their JSON types strictly, no string may hold a lone UTF-16 surrogate,
and the ranges of the sampling options come from the one table of bounds. What localrun cannot
honour is refused by name in the mapping (ollama.py), never dropped silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from localrun.serve.protocol import Body, RequestBody, bounds_of
from localrun.text import duration_seconds

# -- requests ----------------------------------------------------------------------------------------


class Options(Body):
    """The `options` Ollama's runner takes. The fields here are the ones localrun honours; the
    others Ollama knows stay in `model_extra`, where the mapping ignores the harmless ones (how the
    model is loaded: threads, mmap...) and refuses the rest by name."""

    model_config = ConfigDict(extra="allow", strict=True)

    num_ctx: int | None = Field(None, ge=1)
    num_predict: int | None = Field(None, ge=-2)  # -1: until the end, -2: until the context is full
    temperature: float | None = Field(None, **bounds_of("temperature"))
    top_k: int | None = Field(None, **bounds_of("top_k"))
    top_p: float | None = Field(None, **bounds_of("top_p"))
    min_p: float | None = Field(None, **bounds_of("min_p"))
    repeat_penalty: float | None = Field(None, **bounds_of("repeat_penalty"))
    repeat_last_n: int | None = Field(None, **bounds_of("repeat_last_n"))
    presence_penalty: float | None = Field(None, **bounds_of("presence_penalty"))
    frequency_penalty: float | None = Field(None, **bounds_of("frequency_penalty"))
    seed: int | None = None  # negative: a random seed, as Ollama's -1
    stop: list[str] | str | None = None
    grammar: str | None = None  # localrun's own: a GBNF grammar the reply follows (as llama.cpp takes it)


class FunctionCall(Body):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(Body):
    function: FunctionCall


class Message(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class Function(Body):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Body):
    type: Literal["function"] = "function"
    function: Function


KeepAlive = float | int | str


class _Generating(RequestBody):
    """What chat and generate share."""

    model: str = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    format: str | dict[str, Any] | None = None  # "json", or a JSON schema
    options: Options | None = None
    keep_alive: KeepAlive | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str) and value not in ("", "json"):
            raise ValueError('format is "json" or a JSON schema (an object)')
        return value


class ChatRequest(_Generating):
    messages: list[Message] = Field(default_factory=list)  # none: load (or unload) the model
    tools: list[Tool] | None = Field(None, max_length=128)


class GenerateRequest(_Generating):
    prompt: str = ""  # empty: load (or unload) the model
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None


class EmbedRequest(RequestBody):
    """/api/embed: one text or several; cut to the context unless `truncate` is false."""

    model: str = Field(min_length=1)
    input: str | list[str] = Field(default_factory=list)  # none: load (or unload) the model
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1)
    options: Options | None = None  # nothing in them changes a vector: read for their types only
    keep_alive: KeepAlive | None = None


class EmbeddingsRequest(RequestBody):
    """/api/embeddings, the older form: one text, its vector as the model pools it."""

    model: str = Field(min_length=1)
    prompt: str = ""  # empty: load (or unload) the model
    options: Options | None = None
    keep_alive: KeepAlive | None = None


class ModelRequest(RequestBody):
    """/api/show, /api/delete: a model by name (`name` is the older spelling)."""

    model: str = Field("", max_length=1024)
    name: str = Field("", max_length=1024)
    verbose: bool = False

    @property
    def target(self) -> str:
        return self.model or self.name


class PullRequest(ModelRequest):
    stream: bool = True
    insecure: bool = False


# -- responses ---------------------------------------------------------------------------------------
class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Details(Out):
    parent_model: str = ""
    format: str = "gguf"
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class ListedModel(Out):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: Details


class ListResponse(Out):
    models: list[ListedModel]


class LoadedModel(ListedModel):
    expires_at: str
    size_vram: int
    context_length: int


class ProcessResponse(Out):
    models: list[LoadedModel]


class ShowResponse(Out):
    modelfile: str
    parameters: str
    template: str
    details: Details
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str
    license: str | None = None


class OutCall(Out):
    function: FunctionCall


class OutMessage(Out):
    role: Literal["assistant"] = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[OutCall] | None = None


class TopLogprob(Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class Logprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Timing(Out):
    """The figures of a finished reply, in nanoseconds (Ollama's units)."""

    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


class _Chunk(Out):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    logprobs: list[Logprob] | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatChunk(_Chunk):
    message: OutMessage


class GenerateChunk(_Chunk):
    response: str = ""
    thinking: str | None = None


class EmbedResponse(Out):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(Out):
    embedding: list[float]


class Progress(Out):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


class Version(Out):
    version: str


# -- durations ---------------------------------------------------------------------------------------
def keep_alive_seconds(value: KeepAlive) -> float | None:
    """Ollama's keep_alive in seconds (None: stay loaded until the server stops): a number of
    seconds, or a Go duration ("5m", "1h30m", "300ms"); negative (or beyond Go's 292 years) means
    forever, 0 unload now. ValueError for anything else."""
    try:
        return duration_seconds(value)
    except ValueError:
        shown = value[:40] if isinstance(value, str) else value
        raise ValueError(f"keep_alive {shown!r} is not a duration (such as 30s, 5m, 1h30m, 0 or -1)") from None
