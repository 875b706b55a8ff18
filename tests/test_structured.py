"""Structured output: --json-schema and --grammar through llama.cpp's grammar sampler. The real
Gemma model's replies parse and validate against their schemas; a schema the grammar cannot
enforce is refused before any model loads; /set switches the grammar in the REPL."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from localrun.cli import app
from localrun.inference.generation import grammar

runner = CliRunner()

SCHEMAS = {
    "object with required fields": (
        "A person, as JSON:",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 30},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "email": {"type": "string", "maxLength": 40},
                "admin": {"type": "boolean"},
            },
            "required": ["name", "age", "admin"],
        },
    ),
    "enum": (
        "Review: 'The food was cold and the waiter rude.' Sentiment as JSON:",
        {
            "type": "object",
            "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
            "required": ["sentiment"],
        },
    ),
    "array of objects": (
        "Three famous books as a JSON list:",
        {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"title": {"type": "string", "maxLength": 40}, "year": {"type": "integer"}},
                "required": ["title", "year"],
            },
        },
    ),
    "numbers with bounds": (
        "A product rating as JSON:",
        {
            "type": "object",
            "properties": {
                "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                "score": {"type": "number", "minimum": 0, "maximum": 10},
                "confidence": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            },
            "required": ["stars", "score", "confidence"],
        },
    ),
    "type lists keep their keywords": (
        "A city and its country as JSON:",
        {
            "type": ["object", "null"],
            "properties": {
                "city": {"type": ["string", "null"], "maxLength": 20},
                "country": {"type": "string", "maxLength": 20},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    ),
}


def run(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_gemma_replies_validate_against_the_schema(gemma: Path, name: str):
    prompt, schema = SCHEMAS[name]
    for sampling in (["--temp", "0"], ["--temp", "0.9", "--seed", "7"]):
        result = run(
            "run", gemma, "--raw", prompt, "--json-schema", json.dumps(schema), "-n", "200", "--json", *sampling
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["finish_reason"] == "eog", data  # the grammar ended the reply where the value is complete
        jsonschema.validate(json.loads(data["text"]), schema)


@pytest.mark.slow
def test_a_schema_file_and_speculation_together(gemma: Path, tmp_path: Path):
    """Drafted tokens are checked by the same grammar: lookup drafting copies the material."""
    prompt, schema = SCHEMAS["array of objects"]
    path = tmp_path / "books.json"
    path.write_text(json.dumps(schema))
    material = '[{"title": "Moby Dick", "year": 1851}, {"title": "Emma", "year": 1815}]\n'
    args = ["run", gemma, "--raw", "Repeat the list:", "--json-schema", path, "-n", "120", "--temp", "0", "--json"]
    spec = json.loads(run(*args, "--speculate", "lookup", input=material).stdout)
    plain = json.loads(run(*args, "--speculate", "off", input=material).stdout)
    jsonschema.validate(json.loads(spec["text"]), schema)
    assert spec["drafted"] > 0 and spec["text"] == plain["text"]


def test_a_gbnf_grammar_file_shapes_the_reply(tiny, tmp_path: Path):
    rules = tmp_path / "answer.gbnf"
    rules.write_text('root ::= ("yes" | "no") "." \n')
    for seed in range(4):
        result = run("run", tiny.quants["Q8_0"], "--raw", "Is it?", "--grammar", rules, "--seed", seed, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["text"] in ("yes.", "no.")


@pytest.mark.parametrize(
    "schema, message",
    [
        ("{not json", "is not valid JSON"),
        ('{"type": "integer", "minimum": 0}', "a bound on one side only"),
        ('{"type": "integer", "minimum": 0, "maximum": 1000000}', "bounds at $ cannot be enforced"),
        ('{"type": "integer", "minimum": 3, "maximum": 1}', "admit no value"),
        ('{"type": "array", "uniqueItems": true}', "'uniqueItems' at $ cannot be enforced"),
        ('{"type": "string", "format": "email"}', "format 'email' at $ cannot be enforced"),
        ("[1, 2]", "must be a JSON object"),
        ("no-such-schema.json", "neither JSON text nor a readable file (no such file or directory)"),
        ('{"type": "text"}', '"text" at $ is not a JSON Schema type'),
        ('{"type": ["string", 3]}', "3 at $ is not a JSON Schema type"),
        ('{"properties": {"a": {"description": "x"}}}', "at $.properties.a says nothing the grammar can enforce"),
        ('{"format": "email"}', "format 'email' at $ cannot be enforced"),
        ('{"type": "object", "properties": {"a": true}}', "a boolean schema (true) at $.properties.a"),
        ('{"type": "array", "items": false}', "a boolean schema (false) at $.items"),
        ('{"additionalProperties": true}', "at $ says nothing the grammar can enforce"),
    ],
)
def test_a_schema_the_grammar_cannot_enforce_is_refused_before_loading(tiny, schema: str, message: str):
    # the model is a corrupt file: had it been loaded first, that would be the error
    result = run("run", tiny.corrupt_vocab, "hi", "--json-schema", schema)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.output and "first load" not in result.stderr
    assert "Errno" not in result.stderr and "{'" not in result.stderr  # no Python reprs


def test_grammar_conflicts_are_usage_errors(tiny, tmp_path: Path):
    rules = tmp_path / "g.gbnf"
    rules.write_text('root ::= "a"\n')
    both = run("run", tiny.quants["Q8_0"], "hi", "--grammar", rules, "--json-schema", "{}")
    assert both.exit_code == 2 and "give one of them" in both.stderr
    eos = run("run", tiny.quants["Q8_0"], "hi", "--grammar", rules, "--ignore-eos")
    assert eos.exit_code == 2 and "(--ignore-eos, ignore_eos) cannot go with a grammar" in eos.stderr
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= (unclosed\n")
    broken = run("run", tiny.quants["Q8_0"], "hi", "--grammar", bad)
    assert broken.exit_code == 2 and "could not parse the grammar" in broken.stderr


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "number", "exclusiveMinimum": 0, "maximum": 2.5},
        {"type": "integer", "minimum": 5, "exclusiveMinimum": 0, "maximum": 8},  # the tighter bound holds
        {"type": "integer", "minimum": 1, "exclusiveMinimum": True, "maximum": 4},  # draft 4's flag
        {"type": ["integer", "null"], "minimum": 1, "maximum": 3},  # null stays allowed
        {"type": "number", "minimum": -1, "exclusiveMaximum": 1},
    ],
)
def test_bounds_become_exactly_the_values_the_schema_accepts(schema):
    """Every value the rewritten schema admits passes the original, and the edges are right."""
    enforced = grammar._enforceable(schema, "$", "s")
    values = enforced.get("enum") or enforced["anyOf"][0]["enum"]
    assert 0 < len(values) <= grammar.ENUM_RANGE
    validator = (
        jsonschema.Draft4Validator if schema.get("exclusiveMinimum") is True else jsonschema.Draft202012Validator
    )
    for value in values:
        validator(schema).validate(value)
    step = values[1] - values[0] if len(values) > 1 else 1
    for outside in (values[0] - step, values[-1] + step):
        assert not validator(schema).is_valid(outside)
    if "null" in schema["type"]:
        assert {"type": "null"} in enforced["anyOf"]
    grammar.from_json_schema(schema)  # and the converter takes it


def test_keywords_are_read_only_where_a_schema_is():
    """A property called "minimum" or "if", or an enum/default value, is data, not a keyword."""
    schema = {
        "type": "object",
        "properties": {"minimum": {"type": "integer", "minimum": 0, "maximum": 9}, "if": {"type": "string"}},
        "required": ["minimum", "if"],
        "default": {"not": 1, "maximum": 3},
    }
    found = grammar.from_json_schema(schema)
    assert '"minimum"' in found.gbnf.replace("\\", "")
    with pytest.raises(Exception, match="'not' at \\$.properties.x cannot be enforced"):
        grammar.from_json_schema({"type": "object", "properties": {"x": {"not": {"type": "string"}}}})


def test_what_the_converter_reads_first_is_not_refused_and_type_lists_keep_their_keywords():
    for schema in (
        {"enum": ["a@b.c"], "format": "email"},  # the enum is read first: the format is moot
        {"format": "date"},  # a format it knows, without a type
        {"additionalProperties": False},  # an empty object
    ):
        grammar.from_json_schema(schema)
    # the converter alone reads a type list as bare types and drops maxLength: a string of any length
    bounded = grammar.from_json_schema({"type": ["string", "null"], "maxLength": 3}).gbnf
    assert "char*" not in bounded and "null" in bounded


def test_a_grammar_set_in_a_chat_that_ignores_the_end_of_text_is_refused_and_the_chat_goes_on(tiny, capsys):
    """Nothing could end such a reply: llama.cpp's grammar would abort the process."""
    from test_chat import repl

    conv = repl(tiny.quants["Q8_0"], '/set json_schema {"enum": ["a"]}\rhello\r', ignore_eos=True)
    assert "cannot go with a grammar" in capsys.readouterr().err
    assert conv.settings.grammar is None and [m["role"] for m in conv.messages] == ["user", "assistant"]


def test_set_json_schema_and_grammar_in_the_repl(tiny, tmp_path: Path, capsys):
    from test_chat import repl

    rules = tmp_path / "yn.gbnf"
    rules.write_text('root ::= ("yes" | "no")\n')
    keys = "\r".join([f"/set grammar {rules}", "/set", "first", '/set json_schema {"enum": ["a", "b"]}', "second"])
    conv = repl(tiny.quants["Q8_0"], keys + "\r", max_tokens=10)
    err = capsys.readouterr().err
    assert f"grammar = grammar {rules}" in err
    replies = [m["content"] for m in conv.messages if m["role"] == "assistant"]
    assert replies[0] in ("yes", "no") and replies[1] in ('"a"', '"b"')
