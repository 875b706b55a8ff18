"""From an OpenAI request to what a slot runs: the prompt's tokens (messages through the model's
chat template), the sampling chain with its grammar, the reply's length and stop strings.

What localrun cannot honour is refused with a 400 that names the parameter, never ignored: a
client asking for tools or n=3 must not believe it got them. Runs in a worker thread (a
template render or a grammar can take a while); only the model's vocabulary is read here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localrun.errors import LocalrunError
from localrun.inference.conversation import fit_turns
from localrun.inference.generation import grammar
from localrun.inference.generation.sampler import Sampler
from localrun.inference.generation.sequence import Request, Update
from localrun.inference.generation.settings import OutOfBounds, SamplingOptions, check_stops
from localrun.inference.prompting.families import Detected, ToolFormat
from localrun.inference.prompting.reply_parser import ReplyParser
from localrun.inference.prompting.tool_messages import template_messages
from localrun.inference.prompting.tool_use import ToolUse, ToolUseError, described, reply_grammar
from localrun.serve.errors import ApiError, bad_request, from_localrun, unsupported
from localrun.serve.host import ModelHost
from localrun.serve.protocol import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    NamedToolChoice,
)

Sink = Callable[[Update], None]


@dataclass
class Prepared:
    """A chat request made ready: the core's request, the parser that takes its reply apart
    (reasoning, content, tool calls; None when there is nothing to take apart), and how many of
    the oldest messages were left out to fit the slot's context."""

    request: Request
    parser: ReplyParser | None = None
    dropped: int = 0


def chat(host: ModelHost, req: ChatRequest, sink: Sink) -> Prepared:
    _refuse_common(req)
    assert host.engine is not None and host.template is not None and host.replies is not None
    engine, template, families = host.engine, host.template, host.replies
    messages, use, calling, context = _conversation(req, families)
    wanted = req.max_completion_tokens or req.max_tokens
    try:  # a conversation longer than a slot's context loses its oldest turns, as a chat does
        prompt, dropped = fit_turns(
            messages, lambda ms: engine.chat_tokens(template, ms, **context), host.n_ctx_slot, wanted
        )
        text = template.render(messages, **context)
    except LocalrunError as exc:
        raise from_localrun(exc) from None
    if dropped:
        host.say(f"a conversation dropped its {dropped} oldest message{'s' * (dropped > 1)} to fit a slot's context")
    rules = _grammar(req)
    fmt = req.response_format
    if rules and isinstance(fmt, (JsonSchemaFormat, JsonObjectFormat)):
        raise bad_request("give a grammar or a response_format, not both", param="grammar")
    try:
        if isinstance(fmt, JsonSchemaFormat):
            rules = grammar.from_json_schema(fmt.json_schema.schema_).gbnf
        elif isinstance(fmt, JsonObjectFormat):
            rules = grammar.json_object().gbnf
    except LocalrunError as exc:
        raise bad_request(f"response_format: {exc.message}", param="response_format") from None
    reasoning = families.reasoning
    opened = reasoning is not None and reasoning.opens_in_prompt(text)
    thinking = reasoning.closing if opened and reasoning else None
    try:
        constrained = reply_grammar(
            rules, calling=calling, use=use, thinking=thinking, whole_reply=req.grammar is not None
        )
    except ToolUseError as exc:
        raise bad_request(exc.message, param=exc.param) from None
    top = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    stop = _stops(req) + list(template.stop)
    job = _job(host, req, prompt, constrained, wanted, stop, top, sink)
    # What the prompt cache keeps, as `run` does: a first question's prefix (the system prompt,
    # tool definitions, a shared document before it); later turns find theirs in a slot's cache.
    if sum(m["role"] == "user" for m in messages) == 1:
        job.cached_prefix = engine.prefix_length(text, messages[-1]["content"], prompt)
    if reasoning is not None:  # its tokens counted, and held to the request's budget (else the server's)
        budget = req.reasoning_budget if req.reasoning_budget is not None else host.opts.reasoning_budget
        job.watch = engine.reasoning_watch(reasoning, opened=opened, budget=None if budget == -1 else budget)
    if reasoning is None and calling is None:
        return Prepared(job, None, dropped)
    schemas = use.schemas() if use is not None else None
    parser = ReplyParser(reasoning, calling, starts_in_reasoning=opened, schemas=schemas)
    return Prepared(job, parser, dropped)


def prompt_tokens(host: ModelHost, req: ChatRequest) -> int:
    """How many tokens the request's conversation takes through the model's template, with its
    tools and switches (what a reply to it would read; Anthropic's count_tokens)."""
    assert host.engine is not None and host.template is not None and host.replies is not None
    messages, _, _, context = _conversation(req, host.replies)
    try:
        return len(host.engine.chat_tokens(host.template, messages, **context))
    except LocalrunError as exc:
        raise from_localrun(exc) from None


def _conversation(
    req: ChatRequest, families: Detected
) -> tuple[list[dict[str, Any]], ToolUse | None, ToolFormat | None, dict[str, Any]]:
    """The messages as the template takes them, the request's tools, the format calls are read in
    (None: no calls), and the template's variables."""
    if req.functions or req.function_call not in (None, "none"):
        raise unsupported("functions", "send the functions as `tools` (OpenAI's current form)")
    try:
        messages = template_messages([_message(m, i) for i, m in enumerate(req.messages)])
    except LocalrunError as exc:
        raise bad_request(exc.message, param="messages") from None
    use = _tool_use(req)
    calling = use.format(families) if use is not None else None
    tools = use.tools if use is not None else None
    if tools and calling is not None and not families.template_describes_tools:  # a system message does
        messages = described(messages, tools)
    return messages, use, calling, {"tools": tools, "variables": _switches(req, families)}


def _tool_use(req: ChatRequest) -> ToolUse | None:
    """The request's tools and tool_choice, shaped once (inference.prompting.tool_use)."""
    if not req.tools:
        return None
    choice = req.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    try:
        return ToolUse.of(
            [t.model_dump(exclude_none=True) for t in req.tools],
            choice if isinstance(choice, str) else "auto",
            named,
            parallel=req.parallel_tool_calls is not False,
        )
    except ToolUseError as exc:
        raise bad_request(exc.message, param=exc.param) from None


def _switches(req: ChatRequest, families: Detected) -> dict[str, object]:
    """The template's own variables: chat_template_kwargs as given (llama-server's), and
    reasoning_effort -- as the template reads it, and as its thinking switch (off for none or
    minimal)."""
    variables: dict[str, object] = {}
    for key, value in (req.chat_template_kwargs or {}).items():
        if not key.isidentifier() or key in RESERVED or not isinstance(value, (str, int, float, bool, type(None))):
            raise bad_request(
                f"chat_template_kwargs.{key[:40]}: a template switch is a name and a plain value",
                param="chat_template_kwargs",
            )
        variables[key] = value
    if req.reasoning_effort is not None:
        variables.setdefault("reasoning_effort", req.reasoning_effort)
        switch = families.thinking_switch
        if switch is not None:
            for key, value in switch.variables(req.reasoning_effort not in ("none", "minimal")).items():
                variables.setdefault(key, value)
    return variables


RESERVED = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "documents"})


def completion(host: ModelHost, req: CompletionRequest, sink: Sink) -> Request:
    _refuse_common(req)
    if req.echo:
        raise unsupported("echo", "the prompt is not repeated in the reply")
    if req.suffix:
        raise unsupported("suffix", "fill-in-the-middle needs a model trained for it")
    if req.best_of not in (None, 1):
        raise unsupported("best_of", "one completion per request")
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise unsupported("prompt", "one prompt per request (send a string)")
        text = req.prompt[0]
    else:
        text = req.prompt
    assert host.engine is not None
    prompt = host.engine.tokenize(text)
    # OpenAI's default for this endpoint is 16 tokens; an explicit null asks for the whole reply
    wanted = req.max_tokens if "max_tokens" in req.model_fields_set else 16
    return _job(host, req, prompt, _grammar(req), wanted, _stops(req), req.logprobs, sink)


def _grammar(req: GenerationRequest) -> str | None:
    """The request's GBNF, within the bounds llama.cpp's parser survives."""
    if req.grammar is None:
        return None
    try:
        return grammar.from_text(req.grammar, "grammar").gbnf
    except LocalrunError as exc:
        raise bad_request(exc.message, param="grammar") from None


def _job(
    host: ModelHost,
    req: GenerationRequest,
    prompt: list[int],
    rules: str | tuple[str, tuple[str, ...]] | None,
    wanted: int | None,
    stop: list[str],
    top_logprobs: int | None,
    sink: Sink,
) -> Request:
    room = host.n_ctx_slot - len(prompt)
    if not prompt:
        raise bad_request("the prompt is empty", param="prompt")
    if room <= 0:
        raise ApiError(
            400,
            f"this model's context is {host.n_ctx_slot} tokens per slot, and the prompt takes {len(prompt)}: "
            "shorten it, or start the server with a larger --ctx",
            code="context_length_exceeded",
            param="messages",
        )
    limit = room if wanted is None else min(wanted, room)
    assert host.engine is not None
    options = sampling(req, host.engine.model.n_vocab)
    try:
        gbnf, triggers = rules if isinstance(rules, tuple) else (rules, ())
        sampler = Sampler(host.engine.model, options, gbnf, n_ctx=host.n_ctx_slot, triggers=triggers)
    except OutOfBounds as exc:  # a sampling value beyond its range: the field that holds it
        raise bad_request(exc.message, param=exc.name) from None
    except LocalrunError as exc:
        param = "grammar" if req.grammar else "response_format"
        raise bad_request(f"{param}: {exc.message}", param=param) from None
    return Request(prompt, sampler, limit, room, stop, sink, top_logprobs)


def sampling(req: GenerationRequest, n_vocab: int) -> SamplingOptions:
    """The request's sampling; what it leaves out takes localrun's defaults (as `localrun run`),
    except the repeat penalty: OpenAI clients expect none unless they ask (it also bends JSON)."""
    base = SamplingOptions()
    return SamplingOptions(
        temperature=base.temperature if req.temperature is None else req.temperature,
        top_k=base.top_k if req.top_k is None else req.top_k,
        top_p=base.top_p if req.top_p is None else req.top_p,
        min_p=base.min_p if req.min_p is None else req.min_p,
        repeat_penalty=1.0 if req.repeat_penalty is None else req.repeat_penalty,
        repeat_last_n=base.repeat_last_n if req.repeat_last_n is None else req.repeat_last_n,
        seed=req.seed,
        ban_eog=req.ignore_eos,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logit_bias=_logit_bias(req.logit_bias or {}, n_vocab),
    )


def _logit_bias(biases: dict[str, float], n_vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: token ids of this model's vocabulary (as llama-server takes them) to
    a bias added to their logit, from -100 (never) to 100."""
    out: dict[int, float] = {}
    for key, bias in biases.items():
        token = int(key) if key.isascii() and key.isdigit() and len(key) <= 10 else -1
        if not 0 <= token < n_vocab:
            raise bad_request(
                f"logit_bias: {key[:20]!r} is not a token id of this model (0 to {n_vocab - 1})", "logit_bias"
            )
        if token in out:
            raise bad_request(f"logit_bias: token {token} is given twice", "logit_bias")
        if not -100 <= bias <= 100:
            raise bad_request(f"logit_bias: the bias of token {token} must be between -100 and 100", "logit_bias")
        out[token] = float("-inf") if bias == -100 else float(bias)
    return tuple(out.items())


def _refuse_common(req: GenerationRequest) -> None:
    if req.n not in (None, 1):
        raise unsupported("n", "one choice per request; send several requests (they run in parallel)")


def _stops(req: GenerationRequest) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        check_stops(stops)
    except OutOfBounds as exc:
        raise bad_request(exc.message, param="stop") from None
    return [s for s in stops if s]


def _message(message: ChatMessage, index: int) -> dict[str, Any]:
    """A message as OpenAI sends it, its content as text (template_messages shapes the rest)."""
    where = f"messages[{index}]"
    if message.role == "function":
        raise unsupported(f"{where}.role", "send function results as role tool")
    content = message.content
    if content is None:
        if message.role != "assistant":
            raise bad_request(f"{where}.content is missing", param=f"{where}.content")
        content = ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise unsupported(f"{where}.content", f"only text parts are (got {part.type!r})")
            parts.append(part.text)
        content = "\n".join(parts)
    shaped = message.model_dump(exclude_none=True)
    shaped["role"] = "system" if message.role == "developer" else message.role
    shaped["content"] = content
    return shaped
