"""The families of reasoning and tool-call formats, in one table each, and how a model's family is
found from its chat template (the Jinja source) and its vocabulary's special tokens.

A new family is one more entry: how to recognise it, its markers, and (for tool calls) the reader
of a call block in call_formats. Entries are tried in order, the more specific first; the
template decides before the vocabulary, since a vocabulary may carry tokens its template never
uses. A model with no recognisable tool-call format gets the generic one: a JSON object holding
"tool_calls", which the caller describes to the model itself (and constrains with a grammar).

Triggers are the text with which a call begins: with tool_choice "auto" the caller samples free
text until a trigger, then the call's grammar (llama.cpp's lazy grammar, whose trigger patterns are
ToolFormat.trigger_patterns, the call's grammar starting at the trigger itself); `anchored`
triggers count only at the start of the answer, so their pattern is matched against the answer
alone, after any reasoning."""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable, Container
from dataclasses import dataclass

from jinja2 import TemplateError, meta

from localrun.inference.prompting import call_formats, sandbox
from localrun.inference.prompting.call_formats import CallReader
from localrun.inference.prompting.markers import JsonObjectStart, Literal, Marker


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    start: tuple[str, ...]  # markers that open the reasoning
    end: tuple[str, ...]  # markers that close it
    template_signs: tuple[str, ...]  # any of these in the template's source
    token_signs: tuple[str, ...]  # any of these among the special tokens
    framing: tuple[str, ...] = ()  # markers around the answer that carry no text (harmony's headers)
    # Plain-text markers such as <think> open the reasoning only before the answer, where a model
    # writing about them cannot mean them; special tokens open it anywhere (between calls, say).
    only_at_start: bool = True
    close: str | None = None  # what a reasoning budget forces to end the reasoning (else end[0])

    @property
    def closing(self) -> str:
        return self.close or self.end[0]

    def opens_in_prompt(self, generation_prompt: str) -> bool:
        """Whether a rendered prompt (with the generation prompt) leaves the reasoning open, so
        the reply starts inside it (DeepSeek-R1, Qwen3 thinking templates that write `<think>`)."""
        tail = generation_prompt.rstrip()
        return any(tail.endswith(marker) for marker in self.start)


@dataclass(frozen=True)
class CallSyntax:
    """One way a call is written: its trigger, its end, and the reader of the text between."""

    trigger: Marker
    close: str | None  # None: the call runs to the next trigger or the end of the reply
    reader: CallReader
    keep_trigger: bool = False  # the trigger is part of the call's text (a bare JSON object)
    anchored: bool = False  # only at the start of the reply
    close_optional: bool = False  # the end of the reply may stand for close (it is an end-of-generation token)

    @property
    def trigger_pattern(self) -> str:
        """A pattern that matches the whole answer so far once a call has begun, with the call's
        start in group 1 (the form of llama.cpp's lazy-grammar trigger patterns)."""
        lead = r"\s*" if self.anchored else r"[\s\S]*?"
        return lead + "(" + self.trigger.pattern + r")[\s\S]*"


def openai_call_id(index: int) -> str:
    """An id in OpenAI's style for a call the model gave none: call_ and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


_ALPHANUMERIC = string.ascii_letters + string.digits


def mistral_call_id(index: int) -> str:
    """Mistral's: 9 letters and digits. Its templates refuse any other id when the call and its
    result come back in the history."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


@dataclass(frozen=True)
class ToolFormat:
    name: str
    calls: tuple[CallSyntax, ...]
    template_signs: tuple[tuple[str, ...], ...]  # any group whose strings are all in the template
    token_signs: tuple[str, ...]  # any of these among the special tokens
    framing: tuple[str, ...] = ()
    make_id: Callable[[int], str] = openai_call_id  # the id of a call the model gave none

    @property
    def trigger_patterns(self) -> tuple[str, ...]:
        return tuple(c.trigger_pattern for c in self.calls)


_HARMONY_FRAMING = (
    "<|start|>assistant",
    "<|channel|>final<|message|>",
    "<|channel|>commentary<|message|>",
    "<|end|>",
    "<|return|>",
)

REASONING_FORMATS: tuple[ReasoningFormat, ...] = (
    ReasoningFormat(
        "harmony",
        start=("<|channel|>analysis<|message|>",),
        end=("<|end|>",),
        template_signs=("<|channel|>",),
        token_signs=("<|channel|>",),
        framing=_HARMONY_FRAMING,
        only_at_start=False,
        close="<|end|><|start|>assistant<|channel|>final<|message|>",
    ),
    ReasoningFormat("mistral", ("[THINK]",), ("[/THINK]",), ("[THINK]",), ("[THINK]",), only_at_start=False),
    ReasoningFormat("think", ("<think>",), ("</think>",), ("<think>",), ("<think>",)),
)

TOOL_FORMATS: tuple[ToolFormat, ...] = (
    ToolFormat(
        "harmony",
        calls=(
            CallSyntax(
                Literal("<|channel|>commentary to=functions."),
                "<|call|>",
                call_formats.read_harmony,
                close_optional=True,
            ),
            CallSyntax(Literal(" to=functions."), "<|call|>", call_formats.read_harmony, close_optional=True),
        ),
        template_signs=(("<|channel|>", "functions."), ("<|channel|>", "<|call|>")),
        token_signs=("<|call|>",),
        framing=_HARMONY_FRAMING,
    ),
    ToolFormat(
        "qwen3-coder",
        calls=(
            CallSyntax(Literal("<tool_call>"), "</tool_call>", call_formats.read_xml_function),
            CallSyntax(Literal("<function="), "</function>", call_formats.read_xml_function, keep_trigger=True),
        ),
        template_signs=(("<function=", "<parameter="),),
        token_signs=(),
    ),
    ToolFormat(
        "hermes",
        calls=(CallSyntax(Literal("<tool_call>"), "</tool_call>", call_formats.read_hermes),),
        template_signs=(("<tool_call>",),),
        token_signs=("<tool_call>",),
    ),
    ToolFormat(
        "mistral",
        calls=(CallSyntax(Literal("[TOOL_CALLS]"), None, call_formats.read_mistral),),
        template_signs=(("[TOOL_CALLS]",),),
        token_signs=("[TOOL_CALLS]",),
        make_id=mistral_call_id,
    ),
    ToolFormat(
        "llama3",
        calls=(
            CallSyntax(Literal("<|python_tag|>"), None, call_formats.read_llama3),
            CallSyntax(JsonObjectStart("name"), None, call_formats.read_llama3, keep_trigger=True, anchored=True),
        ),
        template_signs=(("<|python_tag|>",), ("<|start_header_id|>", "ipython")),
        token_signs=("<|python_tag|>",),
    ),
)

GENERIC = ToolFormat(
    "generic",
    calls=(
        CallSyntax(JsonObjectStart("tool_calls"), None, call_formats.read_generic, keep_trigger=True, anchored=True),
    ),
    template_signs=(),
    token_signs=(),
)


@dataclass(frozen=True)
class ThinkingSwitch:
    """A template variable that turns thinking on or off, and its two values."""

    variable: str
    on: object
    off: object

    def variables(self, think: bool) -> dict[str, object]:
        return {self.variable: self.on if think else self.off}


# Tried in order: Qwen3, DeepSeek-V3.1, Granite and others name their switch in the template.
THINKING_SWITCHES: tuple[ThinkingSwitch, ...] = (
    ThinkingSwitch("enable_thinking", True, False),
    ThinkingSwitch("thinking", True, False),
)


_PARSER = sandbox.environment({})


@dataclass(frozen=True)
class Detected:
    """What a model's template and vocabulary say about its replies (for `show` and the parser)."""

    reasoning: ReasoningFormat | None
    tools: ToolFormat
    thinking_switch: ThinkingSwitch | None
    template_describes_tools: bool  # the template renders `tools` itself; else the caller must describe them
    evidence: tuple[str, ...]  # one line per choice, saying what decided it


def template_variables(source: str) -> frozenset[str]:
    """The variables a template reads from its caller (parsed, never run); none if it does not parse."""
    try:
        return frozenset(meta.find_undeclared_variables(_PARSER.parse(source)))
    except TemplateError:
        return frozenset()


def detect(template_source: str | None, special_tokens: Container[str] = ()) -> Detected:
    """The reasoning and tool-call formats of a model, from its template and special tokens."""
    source = template_source or ""
    evidence: list[str] = []

    reasoning = next((r for r in REASONING_FORMATS if any(s in source for s in r.template_signs)), None)
    if reasoning is not None:
        evidence.append(f"reasoning: {reasoning.name} (the template writes {reasoning.template_signs[0]})")
    else:
        reasoning = next((r for r in REASONING_FORMATS if any(t in special_tokens for t in r.token_signs)), None)
        if reasoning is not None:
            evidence.append(f"reasoning: {reasoning.name} (the vocabulary has {reasoning.token_signs[0]})")

    tools = next((t for t in TOOL_FORMATS if any(all(s in source for s in group) for group in t.template_signs)), None)
    if tools is not None:
        sign = next(group for group in tools.template_signs if all(s in source for s in group))
        evidence.append(f"tool calls: {tools.name} (the template writes {' and '.join(sign)})")
    else:
        tools = next((t for t in TOOL_FORMATS if any(s in special_tokens for s in t.token_signs)), None)
        if tools is not None:
            evidence.append(f"tool calls: {tools.name} (the vocabulary has {tools.token_signs[0]})")
        else:
            tools = GENERIC
            evidence.append("tool calls: generic JSON (no known call format in the template or the vocabulary)")

    variables = template_variables(source)
    switch = next((s for s in THINKING_SWITCHES if s.variable in variables), None)
    if switch is not None:
        evidence.append(f"thinking switch: the template reads {switch.variable}")
    return Detected(reasoning, tools, switch, "tools" in variables, tuple(evidence))
