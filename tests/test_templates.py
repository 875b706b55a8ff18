"""Chat templates from model files are hostile input: bounded in time, steps, size and recursion."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from localrun.cli import app
from localrun.errors import BadModel, ExitCode, UsageError
from localrun.inference.prompting.templates import ChatTemplate
from localrun.model.tiny import TinySpec, write_tiny_model

HOSTILE = {
    "huge range": "{% for i in range(10**9) %}x{% endfor %}",
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "string times huge": "{{ 'x' * 10**11 }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "output flood": "{% for i in range(100000) %}{{ 'y' * 999999 }}{% endfor %}",
    "centre": "{{ 'x' | center(10**10) }}",
    "ljust": "{{ 'x'.ljust(10**10) }}",
    "percent width": "{{ '%2000000000s' % 'x' }}",
    "power": "{{ 10 ** (10 ** 10) }}",
    "bad syntax": "{% for %}",
    "undefined call": "{{ nothing() }}",
}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_model_template_is_a_bad_model_quickly(name):
    started = time.monotonic()
    with pytest.raises(BadModel) as bad:
        ChatTemplate(HOSTILE[name], "model").render(MESSAGES)
    assert time.monotonic() - started < 10  # bounded: never hangs
    assert bad.value.exit_code == ExitCode.BAD_MODEL
    assert bad.value.message.startswith("the model's chat template ")
    assert len(bad.value.message) < 400


def test_the_same_template_given_by_the_user_is_a_bad_argument():
    with pytest.raises(UsageError, match=r"the chat template \(file t.jinja\) was stopped: it recurses"):
        ChatTemplate(HOSTILE["recursive macro"], "file t.jinja").render(MESSAGES)


def test_ordinary_templates_render_as_before():
    chatml = ChatTemplate(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        "model",
    )
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 500} for i in range(200)]
    text = chatml.render(long)
    assert text.count("<|im_start|>") == 201 and len(text) > 500_000


def test_the_cli_reports_a_hostile_template_in_one_line(tmp_path):
    model = write_tiny_model(
        tmp_path / "tiny-hostile-F32.gguf", TinySpec(chat_template=HOSTILE["nested loops"], name="tiny-hostile")
    )
    result = CliRunner().invoke(app, ["run", str(model), "hi", "-n", "2"])
    assert result.exit_code == 7, result.output
    assert result.stderr.splitlines()[-2].startswith("error: the model's chat template was stopped: it runs")
    assert "--chat-format" in result.stderr.splitlines()[-1]
