"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

A request becomes the server's one internal chat request (protocol.ChatRequest), which is
prepared and generated as OpenAI's are (generating.py); its reply is rendered in Anthropic's
shapes (anthropic_replies.py). The mapping:
- `system` (a string or text blocks) is the first message, role system;
- a user turn's `tool_result` blocks are role tool messages (answering the call whose id they
  name), its text blocks one user message after them; an assistant turn's text is its content,
  its `thinking` its reasoning_content, its `tool_use` blocks its tool_calls; consecutive turns
  of one role are one turn, as Anthropic combines them;
- `tools` (name, description, input_schema) are function tools; `tool_choice` auto, any
  (required), tool (a named function), none; `disable_parallel_tool_use` is
  parallel_tool_calls false;
- `thinking` enabled or adaptive turns the template's thinking switch on (disabled: off), as
  reasoning_effort does; `output_config.effort` is reasoning_effort; `budget_tokens` is the
  request's reasoning_budget; `output_config.format` is a JSON schema the reply follows;
- `max_tokens`, `stop_sequences`, `temperature`, `top_p`, `top_k`, and localrun's `seed` and
  `grammar` as on OpenAI's routes; `metadata`, `service_tier` and `cache_control` change nothing
  and are ignored.
What would change the answer and cannot be honoured is refused by name: image, document and other
blocks than text, thinking, tool_use and tool_result; Anthropic's server tools; a last assistant
message to continue (prefill); `container`, `mcp_servers`, `context_management`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from localrun.serve import anthropic_replies, prepare
from localrun.serve.anthropic_protocol import (
    REFUSED,
    Block,
    CountTokensRequest,
    Message,
    MessageOut,
    MessagesRequest,
    OtherBlock,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    TokenCount,
    Tool,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
)
from localrun.serve.errors import ApiError, bad_request, invalid_request, unsupported
from localrun.serve.generating import Log, start
from localrun.serve.protocol import (
    ChatMessage,
    ChatRequest,
    FunctionCallIn,
    FunctionSpec,
    JsonSchemaFormat,
    JsonSchemaSpec,
    NamedFunction,
    NamedToolChoice,
    ToolCallIn,
    ToolSpec,
)
from localrun.serve.registry import Registry

# Anthropic's efforts as reasoning_effort's levels (the highest two have no match of their own)
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}


def router(
    registry: Registry, authorize: Callable[[Request], None], log: Log, counted: Callable[..., object]
) -> APIRouter:
    api = APIRouter(dependencies=[Depends(authorize)])

    @api.post("/v1/messages", response_model=None)
    async def messages(req: MessagesRequest, request: Request) -> MessageOut | Response:
        stops = list(req.stop_sequences or [])
        omit = req.thinking is not None and req.thinking.display == "omitted"
        generation = await start(registry, request, chat_request(req), log)
        if req.stream:
            return generation.streamed(anthropic_replies.stream(generation, stops, omit), "text/event-stream")
        reply = await generation.collect(request)
        if reply is None:  # the client went away: nobody reads what is sent
            return Response(status_code=499)
        return anthropic_replies.message(reply, stops, omit)

    @api.post("/v1/messages/count_tokens", dependencies=[Depends(counted)])
    async def count_tokens(req: CountTokensRequest) -> TokenCount:
        chat = chat_request(req)
        host = registry.find(chat.model)
        async with registry.holding(host):
            return TokenCount(input_tokens=await run_in_threadpool(prepare.prompt_tokens, host, chat))

    return api


def chat_request(req: CountTokensRequest) -> ChatRequest:
    """The request as the server's chat request (see the module's docstring)."""
    for name, why in REFUSED.items():
        if getattr(req, name) is not None:
            raise unsupported(name, why)
    fields: dict[str, Any] = {
        "model": req.model,
        "messages": _system(req.system) + _conversation(req.messages),
        "tools": [_tool(tool, i) for i, tool in enumerate(req.tools or [])] or None,
    }
    fields |= _tool_choice(req) | _reasoning(req)
    if req.output_config and req.output_config.format:
        spec = JsonSchemaSpec(schema=req.output_config.format.schema_)
        fields["response_format"] = JsonSchemaFormat(type="json_schema", json_schema=spec)
    if isinstance(req, MessagesRequest):
        fields |= {
            "max_tokens": req.max_tokens,
            "stop": req.stop_sequences,
            "stream": req.stream,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "seed": req.seed,
            "grammar": req.grammar,
        }
    try:
        return ChatRequest(**fields)
    except ValidationError as exc:  # a value Anthropic's bounds allow and OpenAI's shapes do not
        raise invalid_request(exc.errors()) from None


def _tool_choice(req: CountTokensRequest) -> dict[str, Any]:
    """tool_choice and parallel_tool_calls, as the chat request takes them."""
    choice = req.tool_choice
    if choice is None:
        return {}
    if isinstance(choice, (ToolChoiceAny, ToolChoiceTool)) and not req.tools:
        raise bad_request("tool_choice asks for a tool call, and there are no tools", param="tool_choice")
    if isinstance(choice, ToolChoiceTool):
        fields: dict[str, Any] = {
            "tool_choice": NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
        }
    else:
        fields = {"tool_choice": {"auto": "auto", "any": "required", "none": "none"}[choice.type]}
    if not isinstance(choice, ToolChoiceNone) and choice.disable_parallel_tool_use:
        fields["parallel_tool_calls"] = False
    return fields


def _reasoning(req: CountTokensRequest) -> dict[str, Any]:
    """thinking and output_config.effort as reasoning_effort (which the template's thinking switch
    follows: off for none), and the thinking budget as reasoning_budget."""
    effort, thinking = req.output_config.effort if req.output_config else None, req.thinking
    if thinking is not None and thinking.type == "disabled":
        return {"reasoning_effort": "none"}
    if effort is None and thinking is None:
        return {}
    fields: dict[str, Any] = {"reasoning_effort": EFFORTS[effort or "medium"]}
    if thinking is not None and thinking.budget_tokens is not None:
        fields["reasoning_budget"] = thinking.budget_tokens
    return fields


def _system(system: str | list[TextBlock] | None) -> list[ChatMessage]:
    text = system if isinstance(system, str) else "\n".join(block.text for block in system or [])
    return [ChatMessage(role="system", content=text)] if text else []


def _conversation(messages: list[Message]) -> list[ChatMessage]:
    """The turns as chat messages; consecutive messages of one role are one turn."""
    turns: list[tuple[str, list[tuple[str, Block]]]] = []
    for i, message in enumerate(messages):
        content = message.content
        blocks = [TextBlock(type="text", text=content)] if isinstance(content, str) else content
        located = [(f"messages.{i}.content.{j}", block) for j, block in enumerate(blocks)]
        if turns and turns[-1][0] == message.role:
            turns[-1][1].extend(located)
        else:
            turns.append((message.role, located))
    if turns[-1][0] == "assistant":
        raise unsupported(
            f"messages.{len(messages) - 1}",
            "a last assistant message to continue (prefill): the reply always starts a new turn",
        )
    out: list[ChatMessage] = []
    for role, located in turns:
        out.extend(_assistant(located) if role == "assistant" else _user(located))
    return out


def _user(blocks: list[tuple[str, Block]]) -> list[ChatMessage]:
    """A user turn: its tool results (each a role tool message), then its text."""
    results, texts = [], []
    for where, block in blocks:
        if isinstance(block, ToolResultBlock):
            results.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id, content=_result(block, where)))
        elif isinstance(block, TextBlock):
            texts.append(block.text)
        else:
            raise _refused(where, block, "a user message holds text and tool_result blocks")
    return results + ([ChatMessage(role="user", content="\n".join(texts))] if texts else [])


def _assistant(blocks: list[tuple[str, Block]]) -> list[ChatMessage]:
    """An assistant turn: its text, its reasoning and its tool calls, as one message."""
    texts, reasoning, calls = [], [], []
    for where, block in blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append(ToolCallIn(id=block.id, function=FunctionCallIn(name=block.name, arguments=block.input)))
        elif not isinstance(block, RedactedThinkingBlock):  # another server's, unreadable: left out
            raise _refused(where, block, "an assistant message holds text, thinking and tool_use blocks")
    return [
        ChatMessage(
            role="assistant",
            content="\n".join(texts),
            reasoning_content="\n".join(reasoning) or None,
            tool_calls=calls or None,
        )
    ]


def _result(block: ToolResultBlock, where: str) -> str:
    """A tool result's content as text; an error result says so."""
    content = block.content
    if isinstance(content, list):
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise unsupported(f"{where}.content.{j}", f"{part.type!r} blocks in a tool result: it holds text")
        content = "\n".join(part.text or "" for part in content)
    text = content or ""
    return f"Error: {text}" if block.is_error else text


def _refused(where: str, block: Block, holds: str) -> ApiError:
    if isinstance(block, OtherBlock):
        return unsupported(where, f"{block.type!r} blocks (localrun serves text models; {holds})")
    return bad_request(f"{where}: {holds}, not {block.type} blocks", param=where)


def _tool(tool: Tool, index: int) -> ToolSpec:
    where = f"tools.{index}"
    if tool.type not in (None, "custom"):
        raise unsupported(where, f"{tool.type!r} is one of Anthropic's server tools; localrun serves client tools")
    if tool.input_schema is None:
        raise bad_request(f"{where}.input_schema: a tool needs one", param=f"{where}.input_schema")
    spec = FunctionSpec(name=tool.name, description=tool.description, parameters=tool.input_schema)
    return ToolSpec(type="function", function=spec)
