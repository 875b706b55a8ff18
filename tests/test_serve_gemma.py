"""`localrun serve` with a real model, where the text matters: Gemma 3 270M (a base model without
a chat template: the built-in gemma format, announced), facts, and structured output."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from support.serving import ServerProcess

pytestmark = pytest.mark.slow
GEMMA = "gemma-3-270m-Q4_K_M"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "London", "Rome"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(gemma: Path, tmp_path_factory):
    with ServerProcess([gemma], "--parallel", "2", "--ctx", "1024") as proc:
        yield proc


def test_a_fact_and_the_fallback_template_said(server: ServerProcess):
    client = server.client()
    reply = client.completions.create(
        model=GEMMA, prompt="The capital of France is the city of", max_tokens=3, temperature=0
    )
    assert reply.choices[0].text.startswith(" Paris")
    assert "no chat template; using the built-in 'gemma' format" in server.stderr
    chat = client.chat.completions.create(
        model=GEMMA, messages=[{"role": "user", "content": "Say hello."}], max_tokens=20, temperature=0
    )
    assert chat.choices[0].message.content.strip() and "<start_of_turn>" not in chat.choices[0].message.content


def test_json_schema_and_json_object_replies_parse(server: ServerProcess):
    client = server.client()
    ask = [{"role": "user", "content": "Describe a person who lives in a European capital, as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.chat.completions.create(model=GEMMA, messages=ask, response_format=fmt, max_tokens=80, temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    free = client.chat.completions.create(
        model=GEMMA, messages=ask, response_format={"type": "json_object"}, max_tokens=120, temperature=0
    )
    if free.choices[0].finish_reason == "stop":  # any object: it may run past max_tokens, never be invalid
        assert isinstance(json.loads(free.choices[0].message.content), dict)
    else:
        assert free.choices[0].message.content.lstrip().startswith("{")
