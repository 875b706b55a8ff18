"""A reply taken apart: reasoning, content and tool calls for every family, from hand-written
outputs in each family's documented format; the same split whatever the chunk boundaries (every
character, every UTF-8 byte); families detected from templates written in each format."""

from __future__ import annotations

import codecs
import json
import random
import re
from pathlib import Path

import pytest

from localrun.errors import UsageError
from localrun.inference.prompting.families import GENERIC, REASONING_FORMATS, TOOL_FORMATS, detect
from localrun.inference.prompting.replies import (
    ContentText,
    MalformedCall,
    ParsedReply,
    ReasoningText,
    ToolCall,
    ToolCallArguments,
    ToolCallStart,
    assemble,
)
from localrun.inference.prompting.reply_parser import ReplyParser, parse
from localrun.inference.prompting.templates import ChatTemplate
from localrun.inference.prompting.tool_messages import template_messages, template_tools, tool_schemas

TEMPLATES = Path(__file__).parent / "support" / "templates"
REASONING = {r.name: r for r in REASONING_FORMATS}
TOOLS = {t.name: t for t in TOOL_FORMATS} | {"generic": GENERIC}

WEATHER = '{"city": "Paris"}'
TIME = '{"zone": "Europe/Paris"}'


def numbered(index: int) -> str:
    return f"call_{index}"


def calls(*pairs: tuple[str, str]) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(numbered(i), name, args) for i, (name, args) in enumerate(pairs))


def reply(
    content: str = "", reasoning: str = "", tool_calls: tuple[ToolCall, ...] = (), warnings: int = 0
) -> ParsedReply:
    return ParsedReply(reasoning, content, tool_calls, ("?",) * warnings)


# (case id, reasoning family, tool family, the model's text, what it must parse to).
# A malformed call is given back as content exactly as written, with one warning.
CASES = [
    # Hermes 2 Pro, Qwen 2.5 and Qwen 3: <tool_call>{json}</tool_call>, thinking in <think>.
    (
        "hermes-plain",
        "think",
        "hermes",
        "The capital of France is Paris.\n\nAnything else?",
        reply("The capital of France is Paris.\n\nAnything else?"),
    ),
    (
        "hermes-text-then-call",
        "think",
        "hermes",
        'Let me check the weather.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        reply("Let me check the weather.", tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "hermes-two-calls",
        "think",
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>',
        reply(tool_calls=calls(("get_weather", WEATHER), ("get_time", TIME))),
    ),
    (
        "hermes-malformed",
        "think",
        "hermes",
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
        reply(
            'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>', warnings=1
        ),
    ),
    (
        "hermes-reasoning-then-content",
        "think",
        "hermes",
        "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?",
        reply("Hello! How can I help?", "The user greets me."),
    ),
    (
        "hermes-reasoning-then-call",
        "think",
        "hermes",
        '<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        reply(reasoning="I need the weather tool.", tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "hermes-arguments-as-a-string",
        None,
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}\n</tool_call>',
        reply(tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "hermes-unclosed-at-the-end",
        None,
        "hermes",
        'Sure <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',
        reply('Sure <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', warnings=1),
    ),
    # Qwen3-Coder and Qwen 3.5: <tool_call><function=NAME><parameter=KEY>value</parameter></function></tool_call>.
    (
        "xml-plain",
        "think",
        "qwen3-coder",
        "def add(a, b):\n    return a + b\n",
        reply("def add(a, b):\n    return a + b\n"),
    ),
    (
        "xml-text-then-call",
        "think",
        "qwen3-coder",
        "Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
        reply("Let me check.", tool_calls=calls(("get_weather", '{"city": "Paris", "days": 3}'))),
    ),
    (
        "xml-two-calls",
        "think",
        "qwen3-coder",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_time>\n<parameter=zone>\nEurope/Paris\n</parameter>\n</function>\n</tool_call>",
        reply(tool_calls=calls(("get_weather", WEATHER), ("get_time", TIME))),
    ),
    (
        "xml-malformed",
        "think",
        "qwen3-coder",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>",
        reply("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n</tool_call>", warnings=1),
    ),
    (
        "xml-reasoning-then-content",
        "think",
        "qwen3-coder",
        "<think>\nA greeting.\n</think>\n\nHi!",
        reply("Hi!", "A greeting."),
    ),
    (
        "xml-reasoning-then-call",
        "think",
        "qwen3-coder",
        "<think>\nWeather needed.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
        reply(reasoning="Weather needed.", tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "xml-without-tool-call-tags",
        None,
        "qwen3-coder",
        "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
        reply(tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "xml-object-parameter",
        None,
        "qwen3-coder",
        '<tool_call>\n<function=search>\n<parameter=filter>\n{"tags": ["a", "b"]}\n</parameter>\n</function>\n</tool_call>',
        reply(tool_calls=calls(("search", '{"filter": {"tags": ["a", "b"]}}'))),
    ),
    # Llama 3.1-3.3: a bare {"name": ..., "parameters": ...} at the start of the answer, or after <|python_tag|>.
    ("llama-plain", "think", "llama3", "Paris is the capital of France.", reply("Paris is the capital of France.")),
    (
        "llama-text-then-call",
        "think",
        "llama3",
        'Let me look that up.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        reply("Let me look that up.", tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "llama-two-calls",
        "think",
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"zone": "Europe/Paris"}}',
        reply(tool_calls=calls(("get_weather", WEATHER), ("get_time", TIME))),
    ),
    (
        "llama-malformed",
        "think",
        "llama3",
        '{"name": "get_weather", "parameters": {"city": }}',
        reply('{"name": "get_weather", "parameters": {"city": }}', warnings=1),
    ),
    (
        "llama-builtin-tool-is-not-json",
        None,
        "llama3",
        'Searching.\n<|python_tag|>brave_search.call(query="Paris weather")',
        reply('Searching.\n<|python_tag|>brave_search.call(query="Paris weather")', warnings=1),
    ),
    (
        "llama-reasoning-then-content",
        "think",
        "llama3",
        "<think>Easy one.</think>Paris.",
        reply("Paris.", "Easy one."),
    ),
    (
        "llama-reasoning-then-call",
        "think",
        "llama3",
        '<think>\nNeed data.\n</think>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}',
        reply(reasoning="Need data.", tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "llama-json-that-is-not-a-call",
        None,
        "llama3",
        '{"answer": 42, "name": "not a call"}',
        reply('{"answer": 42, "name": "not a call"}'),
    ),
    (
        "llama-call-with-spaces",
        None,
        "llama3",
        '\n{ "name" : "get_weather", "parameters": {"city": "Paris"}}',
        reply(tool_calls=calls(("get_weather", WEATHER))),
    ),
    # Mistral and Ministral: [TOOL_CALLS] with a JSON list, or NAME[ARGS]{json}; Magistral thinks in [THINK].
    (
        "mistral-plain",
        "mistral",
        "mistral",
        "Bonjour ! Paris est la capitale.",
        reply("Bonjour ! Paris est la capitale."),
    ),
    (
        "mistral-text-then-call",
        "mistral",
        "mistral",
        'Let me check.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123def"}]',
        reply("Let me check.", tool_calls=(ToolCall("abc123def", "get_weather", WEATHER),)),
    ),
    (
        "mistral-two-calls-in-a-list",
        "mistral",
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"zone": "Europe/Paris"}}]',
        reply(tool_calls=calls(("get_weather", WEATHER), ("get_time", TIME))),
    ),
    (
        "mistral-two-calls-named",
        "mistral",
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"zone": "Europe/Paris"}',
        reply(tool_calls=calls(("get_weather", WEATHER), ("get_time", TIME))),
    ),
    (
        "mistral-call-id",
        None,
        "mistral",
        '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}',
        reply(tool_calls=(ToolCall("a1b2c3d4e", "get_weather", WEATHER),)),
    ),
    (
        "mistral-malformed",
        "mistral",
        "mistral",
        'Sure.[TOOL_CALLS]get_weather{"city": "Paris"}',
        reply('Sure.[TOOL_CALLS]get_weather{"city": "Paris"}', warnings=1),
    ),
    (
        "mistral-reasoning-then-content",
        "mistral",
        "mistral",
        "[THINK]A simple greeting.[/THINK]Hello!",
        reply("Hello!", "A simple greeting."),
    ),
    (
        "mistral-reasoning-then-call",
        "mistral",
        "mistral",
        '[THINK]I need the weather.[/THINK][TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
        reply(reasoning="I need the weather.", tool_calls=calls(("get_weather", WEATHER))),
    ),
    # gpt-oss (harmony): channels analysis / commentary / final; calls to=functions.NAME, ended by <|call|>.
    (
        "harmony-plain",
        "harmony",
        "harmony",
        "<|channel|>final<|message|>Paris is the capital of France.<|return|>",
        reply("Paris is the capital of France."),
    ),
    (
        "harmony-text-then-call",
        "harmony",
        "harmony",
        "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant"
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
        reply("Let me check.", tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "harmony-two-calls",
        "harmony",
        "harmony",
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
        '<|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{"zone":"Europe/Paris"}<|call|>',
        reply(tool_calls=calls(("get_weather", WEATHER), ("get_time", TIME))),
    ),
    (
        "harmony-malformed",
        "harmony",
        "harmony",
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"',
        reply(
            '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"', warnings=1
        ),
    ),
    (
        "harmony-reasoning-then-content",
        "harmony",
        "harmony",
        "<|channel|>analysis<|message|>User greets.<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
        reply("Hello!", "User greets."),
    ),
    (
        "harmony-reasoning-then-call-ended-by-the-stop",
        "harmony",
        "harmony",
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}',
        reply(reasoning="Need the weather.", tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "harmony-recipient-in-the-header",
        "harmony",
        "harmony",
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
        reply(tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "harmony-preamble-then-more-reasoning-then-call",
        "harmony",
        "harmony",
        "<|channel|>commentary<|message|>Checking the forecast.<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Paris, then.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
        reply("Checking the forecast.", "Paris, then.", calls(("get_weather", WEATHER))),
    ),
    # The generic fallback: {"tool_calls": [...]} as the whole answer.
    ("generic-plain", "think", "generic", "Paris.", reply("Paris.")),
    (
        "generic-text-before-is-content",
        "think",
        "generic",
        'Sure: {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}',
        reply('Sure: {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'),
    ),
    (
        "generic-two-calls",
        "think",
        "generic",
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"zone": "Europe/Paris"}}]}',
        reply(tool_calls=calls(("get_weather", WEATHER), ("get_time", TIME))),
    ),
    (
        "generic-malformed",
        "think",
        "generic",
        '{"tool_calls": [{"arguments": {"city": "Paris"}}]}',
        reply('{"tool_calls": [{"arguments": {"city": "Paris"}}]}', warnings=1),
    ),
    (
        "generic-reasoning-then-content",
        "think",
        "generic",
        "<think>\nhm\n</think>\nParis.",
        reply("Paris.", "hm"),
    ),
    (
        "generic-reasoning-then-call",
        "think",
        "generic",
        '<think>\nweather\n</think>\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}',
        reply(reasoning="weather", tool_calls=calls(("get_weather", WEATHER))),
    ),
    # Text in several scripts, to cut inside multi-byte characters.
    (
        "multibyte-reasoning-and-call",
        "think",
        "hermes",
        '<think>\nZürich ☀️ 東京 — 🌧\n</think>\n\nJe vérifie…\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich 東京"}}\n</tool_call>',
        reply("Je vérifie…", "Zürich ☀️ 東京 — 🌧", calls(("get_weather", '{"city": "Zürich 東京"}'))),
    ),
    (
        "multibyte-malformed",
        None,
        "mistral",
        "Voilà ☀️[TOOL_CALLS]météo[ARGS]{« ville »: 東京}",
        reply("Voilà ☀️[TOOL_CALLS]météo[ARGS]{« ville »: 東京}", warnings=1),
    ),
]


def _parser(reasoning: str | None, tools: str | None, **options) -> ReplyParser:
    return ReplyParser(REASONING.get(reasoning or ""), TOOLS.get(tools or ""), make_id=numbered, **options)


def _parse(text: str, reasoning: str | None, tools: str | None, **options) -> ParsedReply:
    return parse(text, REASONING.get(reasoning or ""), TOOLS.get(tools or ""), make_id=numbered, **options)


def _same(got: ParsedReply, expected: ParsedReply) -> None:
    assert (got.reasoning, got.content, got.tool_calls) == (expected.reasoning, expected.content, expected.tool_calls)
    assert len(got.warnings) == len(expected.warnings)


def _streamed(pieces: list[str], reasoning: str | None, tools: str | None, **options) -> ParsedReply:
    parser = _parser(reasoning, tools, **options)
    deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
    _check_order(deltas)
    return assemble(deltas)


def _check_order(deltas: list) -> None:
    """A call's id and name come first, then its arguments; calls are numbered in order."""
    started = -1
    for delta in deltas:
        if isinstance(delta, ToolCallStart):
            assert delta.index == started + 1
            started = delta.index
        elif isinstance(delta, ToolCallArguments):
            assert delta.index == started


def _every_split_gives(text: str, reasoning: str | None, tools: str | None, whole: ParsedReply, **options) -> None:
    for cut in range(len(text) + 1):
        assert _streamed([text[:cut], text[cut:]], reasoning, tools, **options) == whole, f"cut at character {cut}"
    assert _streamed(list(text), reasoning, tools, **options) == whole, "one character at a time"
    data = text.encode()
    if len(data) != len(text):
        for cut in range(len(data) + 1):
            decoder = codecs.getincrementaldecoder("utf-8")()
            pieces = [decoder.decode(data[:cut]), decoder.decode(data[cut:], final=True)]
            assert _streamed(pieces, reasoning, tools, **options) == whole, f"cut at byte {cut}"
        decoder = codecs.getincrementaldecoder("utf-8")()
        pieces = [decoder.decode(data[i : i + 1]) for i in range(len(data))] + [decoder.decode(b"", final=True)]
        assert _streamed(pieces, reasoning, tools, **options) == whole, "one byte at a time"
    chance = random.Random(text)
    for _ in range(20):
        cuts = sorted(chance.sample(range(len(text) + 1), min(len(text) + 1, 5)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert _streamed(pieces, reasoning, tools, **options) == whole, f"cut at {cuts}"


@pytest.mark.parametrize(("reasoning", "tools", "text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_family_parses_its_own_format(reasoning, tools, text, expected):
    _same(_parse(text, reasoning, tools), expected)


@pytest.mark.parametrize(("reasoning", "tools", "text"), [c[1:4] for c in CASES], ids=[c[0] for c in CASES])
def test_streaming_gives_the_same_reply_wherever_the_text_is_cut(reasoning, tools, text):
    _every_split_gives(text, reasoning, tools, _parse(text, reasoning, tools))


def test_a_malformed_call_says_why_and_hands_back_its_text():
    parser = _parser("think", "hermes")
    deltas = (
        parser.feed('Checking.\n<tool_call>\n{"name": "get_weather"')
        + parser.feed(", }\n</tool_call>")
        + parser.finish()
    )
    malformed = [d for d in deltas if isinstance(d, MalformedCall)]
    assert len(malformed) == 1
    assert "not valid JSON" in malformed[0].reason
    assert malformed[0].text == '<tool_call>\n{"name": "get_weather", }\n</tool_call>'
    assert assemble(deltas).content == 'Checking.\n<tool_call>\n{"name": "get_weather", }\n</tool_call>'


def test_an_unclosed_call_at_the_end_is_given_back_with_the_reason():
    result = _parse('<tool_call>\n{"name": "get_weather", "arguments": {}}', None, "hermes")
    assert result.tool_calls == ()
    assert result.warnings == ("the call was not closed by </tool_call>",)


def test_a_partial_marker_is_held_back_then_released_as_text_when_it_comes_to_nothing():
    parser = _parser("think", "hermes")
    assert parser.feed("Use a <tool_ca") == [ContentText("Use a")]
    assert parser.feed("ble> tag") == [ContentText(" <tool_cable> tag")]
    parser = _parser("think", "hermes")
    assert parser.feed("Answer: <tool_ca") == [ContentText("Answer:")]
    assert parser.finish() == [ContentText(" <tool_ca")]


def test_reasoning_streams_before_its_end_marker_arrives():
    parser = _parser("think", "hermes")
    assert parser.feed("<think>\nFirst, the") == [ReasoningText("First, the")]
    assert parser.feed(" city.\n</thi") == [ReasoningText(" city.")]
    assert parser.feed("nk>\n\nParis") == [ContentText("Paris")]


def test_a_call_streams_its_id_and_name_then_arguments_that_join_to_the_whole_call():
    parser = _parser(None, "hermes")
    assert parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par') == []
    deltas = parser.feed('is"}}\n</tool_call>')
    assert deltas == [ToolCallStart(0, "call_0", "get_weather"), ToolCallArguments(0, WEATHER)]
    assert json.loads("".join(d.fragment for d in deltas if isinstance(d, ToolCallArguments))) == {"city": "Paris"}


def test_call_ids_are_fresh_when_the_model_gives_none():
    first = parse('<tool_call>{"name": "f", "arguments": {}}</tool_call>', None, TOOLS["hermes"])
    second = parse('<tool_call>{"name": "f", "arguments": {}}</tool_call>', None, TOOLS["hermes"])
    assert first.tool_calls[0].id.startswith("call_")
    assert first.tool_calls[0].id != second.tool_calls[0].id


FORCED_OPEN = [
    ("content", "The user says hi.\n</think>\n\nHello!", reply("Hello!", "The user says hi.")),
    (
        "call",
        'Weather needed.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        reply(reasoning="Weather needed.", tool_calls=calls(("get_weather", WEATHER))),
    ),
    (
        "cut-off",
        "\nStill thinking about 東京 when the budget",
        reply(reasoning="Still thinking about 東京 when the budget"),
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in FORCED_OPEN], ids=[c[0] for c in FORCED_OPEN])
def test_a_reply_that_starts_inside_the_reasoning(text, expected):
    _same(_parse(text, "think", "hermes", starts_in_reasoning=True), expected)
    _every_split_gives(
        text, "think", "hermes", _parse(text, "think", "hermes", starts_in_reasoning=True), starts_in_reasoning=True
    )


def test_reasoning_opens_only_at_the_start_of_the_reply():
    text = "Wrap it in <think> tags, then </think>."
    assert _parse(text, "think", "hermes") == reply(text)


def test_a_reply_without_markers_is_its_own_content_whitespace_and_all():
    text = "\n  Hello,\n\n  world  \n"
    for reasoning, tools in [
        (None, None),
        ("think", "hermes"),
        ("harmony", "harmony"),
        ("think", "llama3"),
        ("think", "generic"),
    ]:
        assert _parse(text, reasoning, tools) == reply(text)


def test_without_tool_families_calls_are_content():
    text = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert _parse(text, "think", None) == reply(text)


def test_xml_parameters_take_their_type_from_the_schema():
    text = "<tool_call>\n<function=lookup>\n<parameter=zip>\n75001\n</parameter>\n<parameter=count>\n2\n</parameter>\n</function>\n</tool_call>"
    schema = {"type": "object", "properties": {"zip": {"type": "string"}, "count": {"type": "integer"}}}
    typed = _parse(text, None, "qwen3-coder", schemas={"lookup": schema})
    assert json.loads(typed.tool_calls[0].arguments) == {"zip": "75001", "count": 2}
    untyped = _parse(text, None, "qwen3-coder")
    assert json.loads(untyped.tool_calls[0].arguments) == {"zip": 75001, "count": 2}


# Each template in tests/support/templates, and what detection must find in it.
DETECTED = {
    "hermes.jinja": (None, "hermes", None, True),
    "qwen3.jinja": ("think", "hermes", "enable_thinking", True),
    "qwen3-coder.jinja": (None, "qwen3-coder", None, True),
    "llama3.jinja": (None, "llama3", None, True),
    "mistral.jinja": (None, "mistral", None, True),
    "magistral.jinja": ("mistral", "mistral", None, True),
    "gpt-oss.jinja": ("harmony", "harmony", None, True),
    "deepseek-r1.jinja": ("think", "generic", None, False),
    "plain.jinja": (None, "generic", None, False),
}


def _template(name: str) -> ChatTemplate:
    return ChatTemplate((TEMPLATES / name).read_text(), f"file {name}", "<s>", "</s>")


@pytest.mark.parametrize("name", sorted(DETECTED))
def test_each_family_is_detected_from_its_template(name):
    found = detect(_template(name).source)
    reasoning, tools, switch, describes = DETECTED[name]
    assert (found.reasoning.name if found.reasoning else None) == reasoning
    assert found.tools.name == tools
    assert (found.thinking_switch.variable if found.thinking_switch else None) == switch
    assert found.template_describes_tools is describes
    assert found.evidence


def test_every_template_is_in_the_detection_table():
    assert {p.name for p in TEMPLATES.glob("*.jinja")} == set(DETECTED)


@pytest.mark.parametrize(
    ("tokens", "reasoning", "tools"),
    [
        ({"<think>", "</think>", "<tool_call>"}, "think", "hermes"),
        ({"[THINK]", "[/THINK]", "[TOOL_CALLS]"}, "mistral", "mistral"),
        ({"<|channel|>", "<|message|>", "<|call|>"}, "harmony", "harmony"),
        ({"<|python_tag|>", "<|eot_id|>"}, None, "llama3"),
        ({"<|im_start|>"}, None, "generic"),
    ],
)
def test_without_a_telling_template_the_vocabulary_decides(tokens, reasoning, tools):
    found = detect(_template("plain.jinja").source, tokens)
    assert (found.reasoning.name if found.reasoning else None) == reasoning
    assert found.tools.name == tools


def test_the_template_decides_before_the_vocabulary():
    found = detect(_template("llama3.jinja").source, {"<tool_call>", "[TOOL_CALLS]"})
    assert found.tools.name == "llama3"


def test_a_template_that_does_not_parse_is_detected_by_its_text():
    found = detect("{% if %} <tool_call> <think>")
    assert (found.reasoning.name, found.tools.name, found.thinking_switch) == ("think", "hermes", None)


MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def test_a_prompt_that_opens_the_reasoning_is_detected_from_its_render():
    think = REASONING["think"]
    assert think.opens_in_prompt(_template("deepseek-r1.jinja").render(MESSAGES))
    assert not think.opens_in_prompt(_template("qwen3.jinja").render(MESSAGES))


def test_the_thinking_switch_reaches_the_template():
    template = _template("qwen3.jinja")
    switch = detect(template.source).thinking_switch
    off = template.render(MESSAGES, variables=switch.variables(False))
    on = template.render(MESSAGES, variables=switch.variables(True))
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
    assert not REASONING["think"].opens_in_prompt(off)


TOOL_DEFS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "name": "get_time",
        "description": "The time in a zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
]
HISTORY_CALLS = [
    {"id": "abc123def", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
    {"id": "ghi456jkl", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "Europe/Zurich"}'}},
]
# (template, reasoning family, tool family, calls it writes in a turn, text after the calls that ends the turn)
ROUND_TRIPS = [
    ("hermes.jinja", None, "hermes", 2, "<|im_end|>\n"),
    ("qwen3.jinja", "think", "hermes", 2, "<|im_end|>\n"),
    ("qwen3-coder.jinja", None, "qwen3-coder", 2, "<|im_end|>\n"),
    ("llama3.jinja", None, "llama3", 1, "<|eot_id|>"),
    ("mistral.jinja", None, "mistral", 2, "</s>"),
    ("magistral.jinja", "mistral", "mistral", 2, "</s>"),
    ("gpt-oss.jinja", "harmony", "harmony", 1, ""),
]


@pytest.mark.parametrize(("name", "reasoning", "tools", "count", "end"), ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_calls_a_template_writes_into_the_history_parse_back_to_the_same_calls(name, reasoning, tools, count, end):
    template = _template(name)
    defs = template_tools(TOOL_DEFS)
    prompt = template.render(template_messages(MESSAGES), tools=defs)
    turn = {"role": "assistant", "content": None, "tool_calls": HISTORY_CALLS[:count]}
    whole = template.render(template_messages([*MESSAGES, turn]), add_generation_prompt=False, tools=defs)
    assert whole.startswith(prompt) and whole.endswith(end)
    written = whole[len(prompt) : len(whole) - len(end)]
    result = _parse(written, reasoning, tools, schemas=tool_schemas(TOOL_DEFS))
    assert result.content == "" and result.warnings == ()
    got = [(c.name, json.loads(c.arguments)) for c in result.tool_calls]
    assert got == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in HISTORY_CALLS[:count]]
    _every_split_gives(written, reasoning, tools, result, schemas=tool_schemas(TOOL_DEFS))


def test_a_full_tool_loop_renders_through_every_template():
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": HISTORY_CALLS[:1]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "sunny, 21 °C"},
    ]
    for name in sorted(DETECTED):
        prompt = _template(name).render(template_messages(history), tools=template_tools(TOOL_DEFS))
        assert "sunny, 21 °C" in prompt, name


def test_tool_history_is_shaped_for_templates():
    shaped = template_messages(
        [
            {"role": "assistant", "content": None, "tool_calls": HISTORY_CALLS},
            {"role": "tool", "tool_call_id": "ghi456jkl", "content": [{"type": "text", "text": "12:00"}]},
        ]
    )
    assert shaped[0]["content"] == ""
    assert shaped[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Zürich"}
    assert shaped[1] == {"role": "tool", "tool_call_id": "ghi456jkl", "content": "12:00", "name": "get_time"}


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
    ],
    ids=["arguments-not-an-object", "arguments-not-json", "no-name", "image-part"],
)
def test_tool_history_a_template_cannot_take_is_refused_in_one_line(message):
    with pytest.raises(UsageError):
        template_messages([message])


def test_tool_definitions_need_a_name():
    with pytest.raises(UsageError):
        template_tools([{"type": "function", "function": {"description": "nameless"}}])


def test_templates_write_plain_json():
    template = ChatTemplate("{{ 'args: ' + messages[0].data | tojson }}", "file t")
    assert (
        template.render([{"role": "user", "content": "", "data": {"b": "<é>", "a": 1}}]) == 'args: {"b": "<é>", "a": 1}'
    )


def test_a_call_nested_past_the_decoder_is_given_back():
    text = '<tool_call>{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}</tool_call>"
    result = _parse(text, None, "hermes")
    assert result.content == text and result.warnings == ("the call nests too deeply",)
    with pytest.raises(UsageError):
        template_messages(
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[" * 100_000}}]}]
        )


# Pieces a reply of each family is made of: its markers (whole and cut), text, whitespace, JSON.
_PIECES = {
    "hermes": [
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<tool_",
        '{"name": "f", "arguments": {"a": 1}}',
        "\n",
    ],
    "qwen3-coder": [
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<function=f>",
        "</function>",
        "<parameter=a>",
        "1",
        "</parameter>",
    ],
    "llama3": ["<think>", "</think>", "<|python_tag|>", '{"name": "f", "parameters": {}}', "{", '"name"', ":", ";"],
    "mistral": ["[THINK]", "[/THINK]", "[TOOL_CALLS]", "f[ARGS]", "[CALL_ID]abc123def", '{"a": [1]}', "[", "]"],
    "harmony": [
        *REASONING["harmony"].start,
        *REASONING["harmony"].framing,
        "<|channel|>commentary to=functions.f",
        " <|constrain|>json<|message|>",
        "{}",
        "<|call|>",
    ],
    "generic": ["<think>", "</think>", '{"tool_calls": [{"name": "f", "arguments": {}}]}', '{"tool_calls"', "{", "}"],
}
_FAMILY_REASONING = {
    "hermes": "think",
    "qwen3-coder": "think",
    "llama3": "think",
    "mistral": "mistral",
    "harmony": "harmony",
    "generic": "think",
}


@pytest.mark.parametrize("tools", sorted(_PIECES))
def test_random_replies_split_the_same_wherever_they_are_cut(tools):
    chance = random.Random(tools)
    common = ["Paris", " ", "\n\n", "é東", "<", "[", "{", "}"]
    for _ in range(60):
        text = "".join(chance.choice(_PIECES[tools] + common) for _ in range(chance.randint(1, 12)))
        for opened in (False, True):
            whole = _parse(text, _FAMILY_REASONING[tools], tools, starts_in_reasoning=opened)
            _every_split_gives(text, _FAMILY_REASONING[tools], tools, whole, starts_in_reasoning=opened)


LAZY_TRIGGERS = [
    ("hermes", "Let me check.\n", '<tool_call>\n{"name": "f", "arguments": {}}'),
    ("qwen3-coder", "Let me check.\n", "<tool_call>\n<function=f>"),
    ("qwen3-coder", "Let me check.\n", "<function=f>\n<parameter=a>"),
    ("llama3", "", '{"name": "f", "parameters": {}}'),
    ("llama3", "Looking.", '<|python_tag|>{"name": "f"'),
    ("mistral", "Sure.", "[TOOL_CALLS]f[ARGS]{"),
    (
        "harmony",
        "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant",
        "<|channel|>commentary to=functions.f <|constrain|>json",
    ),
    ("harmony", "<|start|>assistant", " to=functions.f<|channel|>commentary json"),
    ("generic", "\n", '{"tool_calls": [{"name": "f"'),
]


@pytest.mark.parametrize(
    ("tools", "before", "call"), LAZY_TRIGGERS, ids=[f"{t[0]}-{i}" for i, t in enumerate(LAZY_TRIGGERS)]
)
def test_lazy_grammar_triggers_find_where_a_call_begins(tools, before, call):
    patterns = [re.compile(p) for p in TOOLS[tools].trigger_patterns]
    matches = [m for m in (p.fullmatch(before + call) for p in patterns) if m]
    assert matches and min(m.start(1) for m in matches) == len(before)
    for cut in range(len(before) + 1):
        assert not any(p.fullmatch(before[:cut]) for p in patterns)
    assert not any(p.fullmatch('Here is JSON: {"name": "Bob"} and <b>tags</b>.') for p in patterns)
