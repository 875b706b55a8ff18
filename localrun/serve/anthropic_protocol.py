"""Request and response bodies in the shapes Anthropic's Messages API (and its official client)
uses, with the conventions of OpenAI's (protocol.py): fields a request does not know are ignored,
known ones take their JSON types strictly, no string may hold a lone surrogate. A content block of
a type localrun cannot read (an image, a document) is parsed as `OtherBlock`, so that the mapping
(anthropic.py) refuses it by its name rather than with a list of the types it is not.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from localrun.serve.protocol import Body, RequestBody, bounds_of

# -- requests ----------------------------------------------------------------------------------------


class TextBlock(Body):
    type: Literal["text"]
    text: str  # cache_control and citations are ignored: they do not change the answer


class ThinkingBlock(Body):
    """An earlier reply's reasoning, sent back (templates that keep reasoning render it)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Body):
    """Another server's encrypted reasoning: nothing a local template can render."""

    type: Literal["redacted_thinking"]
    data: str | None = None


class ToolUseBlock(Body):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ResultPart(Body):
    type: str
    text: str | None = None


class ToolResultBlock(Body):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ResultPart] | None = None
    is_error: bool = False


class OtherBlock(Body):
    """A block of any other type (image, document, search_result, a server tool's): refused by name."""

    type: str


KNOWN_BLOCKS = ("text", "thinking", "redacted_thinking", "tool_use", "tool_result")


def _block_type(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in KNOWN_BLOCKS else "other"


Block = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_type),
]


class Message(Body):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(Body):
    """A client tool (the caller runs it); `type` names Anthropic's server tools, which it runs."""

    name: str = Field(min_length=1, max_length=256)
    type: str | None = None  # "custom", or a server tool's ("web_search_20250305", "bash_20250124")
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class ToolChoiceAuto(Body):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(Body):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(Body):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(Body):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class Thinking(Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, **bounds_of("max_tokens"))
    display: Literal["summarized", "omitted"] | None = None

    @model_validator(mode="after")
    def _budget_when_enabled(self) -> Thinking:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("thinking of type enabled needs budget_tokens")
        return self


class OutputFormat(Body):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Body):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class CountTokensRequest(RequestBody):
    """What a prompt is made of: the body of /v1/messages/count_tokens, and the start of a message's."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # Anthropic's fields that change the answer and that localrun cannot honour: refused by name
    container: Any = None
    mcp_servers: Any = None
    context_management: Any = None
    output_format: Any = None  # the beta's name for output_config.format


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(**bounds_of("max_tokens"))
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, **bounds_of("temperature"))
    top_p: float | None = Field(None, **bounds_of("top_p"))
    top_k: int | None = Field(None, **bounds_of("top_k"))
    # localrun's own, as on OpenAI's routes
    seed: int | None = Field(None, **bounds_of("seed"))
    grammar: str | None = None  # GBNF the reply must follow


REFUSED = {
    "container": "there is no code execution container here",
    "mcp_servers": "localrun does not connect to MCP servers; run the tools on the client",
    "context_management": "the conversation is not edited on the server",
    "output_format": "send output_config.format (the API's current form)",
}


# -- responses ---------------------------------------------------------------------------------------
class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingOut(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentOut = TextOut | ThinkingOut | ToolUseOut
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class UsageOut(BaseModel):
    input_tokens: int  # the prompt's tokens read, not those found in the cache
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class MessageOut(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentOut]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: UsageOut


class TokenCount(BaseModel):
    input_tokens: int
