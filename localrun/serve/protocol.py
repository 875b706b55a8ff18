"""Request and response bodies in the shapes OpenAI's API (and its official client) uses.

Requests ignore fields they do not know (clients send newer ones: `store`, `metadata`...), but a
known field that would change the answer and that localrun cannot honour is refused by the
request mapping (prepare.py), never dropped silently. Known fields take their JSON types strictly
(`"5"` is not a number, `"yes"` not a boolean; an integer is a number), and no string anywhere in
a request may hold a lone UTF-16 surrogate (`"\\ud800"` is valid JSON, but not text any encoder
can write). Ranges of localrun's own sampling fields come from the one table of bounds
(inference.sampling.BOUNDS).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from localrun.inference.generation.settings import BOUNDS, TOP_LOGPROBS_MAX

_SURROGATE = re.compile("[\ud800-\udfff]")


def bounds_of(name: str) -> dict[str, float]:
    """A sampling field's range from the one table of bounds, as pydantic's Field takes it (ge, le)."""
    bound = BOUNDS[name]
    return {k: v for k, v in (("ge", bound.low), ("le", bound.high)) if v is not None}


class Body(BaseModel):
    """A request body's part, as every API's request models take it (OpenAI's here, Ollama's and
    Anthropic's in their modules): unknown fields ignored, known ones strictly typed."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, strict=True)


def _lone_surrogate(data: object) -> str | None:
    """Where in a JSON value (its keys too) a string holds a surrogate: `messages.0.content`.
    Iterative: a body nested as deep as the JSON parser allows does not exhaust the stack here."""
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                return where or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                    return where or "body"
                stack.append((path, item))
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}" if where else str(i), item) for i, item in enumerate(value))
    return None


class RequestBody(Body):
    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        where = _lone_surrogate(data)
        if where is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "a lone UTF-16 surrogate (such as \\ud800) is not text",
                {"param": where},
            )
        return data


# -- requests ----------------------------------------------------------------------------------------
class ContentPart(Body):
    type: str
    text: str | None = None


class FunctionCallIn(Body):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier turn's reasoning (sent back where templates ask)


class FunctionSpec(Body):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaSpec(Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    type: Literal["json_object"]


class JsonSchemaFormat(Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class GenerationRequest(RequestBody):
    """What chat and text completions share: the model, sampling, length, stops, streaming."""

    model: str
    max_tokens: int | None = Field(None, **bounds_of("max_tokens"))
    temperature: float | None = Field(None, **bounds_of("temperature"))
    top_p: float | None = Field(None, **bounds_of("top_p"))
    seed: int | None = Field(None, **bounds_of("seed"))
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, **bounds_of("presence_penalty"))
    frequency_penalty: float | None = Field(None, **bounds_of("frequency_penalty"))
    logit_bias: dict[str, float] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # llama.cpp's own sampling fields, as llama-server accepts them (extra_body in the openai client)
    top_k: int | None = Field(None, **bounds_of("top_k"))
    min_p: float | None = Field(None, **bounds_of("min_p"))
    repeat_penalty: float | None = Field(None, **bounds_of("repeat_penalty"))
    repeat_last_n: int | None = Field(None, **bounds_of("repeat_last_n"))
    ignore_eos: bool = False
    grammar: str | None = None  # GBNF the reply must follow

    @field_validator("grammar")
    @classmethod
    def _grammar_says_something(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise PydanticCustomError("empty_grammar", "an empty grammar allows nothing: leave grammar out instead")
        return value


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, **bounds_of("max_tokens"))
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)
    tools: list[ToolSpec] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    reasoning_effort: Literal["minimal", "low", "medium", "high", "none"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # llama-server's: the template's own switches
    # llama-server's name: a thinking model's reasoning tokens before its end is forced (-1: no limit;
    # unset: the server's --reasoning-budget). Other APIs' budgets (Anthropic's) land here too.
    reasoning_budget: int | None = Field(None, ge=-1, alias="thinking_budget_tokens")


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TokenizeRequest(RequestBody):
    """llama-server's /tokenize; `model` is localrun's (default: the first model served)."""

    model: str | None = None
    content: str
    add_special: bool = False  # a BOS where the model's vocabulary adds one
    parse_special: bool = True  # special tokens written in the text are read as such
    with_pieces: bool = False


class DetokenizeRequest(RequestBody):
    """llama-server's /detokenize."""

    model: str | None = None
    tokens: list[int]


MAX_INPUTS = 2048  # inputs of one embeddings request (OpenAI's bound), documents of one rerank


class EmbeddingRequest(RequestBody):
    """OpenAI's embeddings body: one text or several, or token ids; `truncate` (llama-server's and
    Ollama's) cuts an input to the context instead of refusing it."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate: bool = False

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list[str] | list[int] | list[list[int]]):
        if isinstance(value, list) and not value:
            raise PydanticCustomError("no_input", "input is an empty list: give at least one text")
        if isinstance(value, list) and len(value) > MAX_INPUTS:
            raise PydanticCustomError("too_many_inputs", f"input has more than {MAX_INPUTS} items")
        if value == "" or (isinstance(value, list) and any(item == "" or item == [] for item in value)):
            raise PydanticCustomError("empty_input", "an input is empty: there is nothing to embed")
        return value


class RerankRequest(RequestBody):
    """A rerank body as llama-server, Jina and Cohere take it."""

    model: str
    query: str = Field(min_length=1)
    documents: list[str] = Field(min_length=1, max_length=MAX_INPUTS)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False
    truncate: bool = False


# -- responses ---------------------------------------------------------------------------------------
class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: the little-endian float32 bytes


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    model: str
    object: Literal["list"] = "list"
    usage: EmbeddingUsage
    results: list[RerankResult]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class Timings(BaseModel):
    """localrun's figures for a reply (llama-server sends a `timings` object too): what `run`'s
    stats line shows, so a client can show the same."""

    prompt_n: int
    cached_n: int
    prompt_ms: float | None  # None: the prompt was not read to the end
    prompt_per_second: float | None
    predicted_n: int
    predicted_ms: float
    predicted_per_second: float
    ttft_ms: float | None
    finish: Literal["eog", "stop", "length", "cancelled"]
    context_full: bool = False
    cached_from_disk: int = 0  # of cached_n, the tokens the prompt cache read from disk
    draft_n: int = 0  # speculative decoding: tokens drafted and verified (llama-server's names)
    draft_n_accepted: int = 0
    dropped_messages: int = 0  # the oldest messages left out to fit a slot's context


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class LegacyLogprobs(BaseModel):
    """Text completions' logprobs, in the older shape that endpoint keeps."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: LegacyLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    timings: Timings | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "localrun"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SlotsHealth(BaseModel):
    id: str
    loaded: bool
    slots: int
    busy: int
    queued: int
    ctx_per_slot: int


class Health(BaseModel):
    status: Literal["ok", "stopping"]
    models: list[SlotsHealth]


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int]  # the piece's text, or its bytes when they are not whole UTF-8


class Tokenized(BaseModel):
    tokens: list[int] | list[TokenPiece]


class Detokenized(BaseModel):
    content: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
