"""Thinking models and tool calls through the server, with the official client: the tiny model
wears each family's template (tests/support/templates) and a grammar makes it write exactly a
family's reply, so what is tested is localrun's reading of real inference output -- streamed and
not -- and the history sent back through the template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.chat import WEATHER
from support.serving import ServerProcess

TINY = "tiny-llama-Q8_0"
TEMPLATES = Path(__file__).parent / "support" / "templates"


def gbnf_literal(text: str) -> str:
    """A grammar whose only sentence is `text`."""
    return "root ::= " + json.dumps(text)


def ask(server: ServerProcess, text: str, *, stream: bool, **extra):
    """The reply the model is made to write (a grammar), as the client gets it: the message, or
    the stream's deltas assembled."""
    client = server.client()
    body = {"grammar": gbnf_literal(text)}
    question = [{"role": "user", "content": "What now?"}]
    common = {"model": TINY, "messages": question, "max_tokens": 200, "temperature": 0, "extra_body": body, **extra}
    if not stream:
        reply = client.chat.completions.create(stream=False, **common)
        message = reply.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
        reasoning = (message.model_extra or {}).get("reasoning_content")
        return message.content, reasoning, calls, reply.choices[0].finish_reason
    content, reasoning, calls, finish = [], [], {}, None
    for chunk in client.chat.completions.create(stream=True, **common):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
        for call in delta.tool_calls or []:
            if call.id:
                calls[call.index] = [call.id, call.function.name, ""]
            calls[call.index][2] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return "".join(content) or None, "".join(reasoning) or None, [tuple(c) for _, c in sorted(calls.items())], finish


@pytest.fixture(scope="module")
def thinking(tiny):
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "2", "--template", TEMPLATES / "deepseek-r1.jinja") as s:
        yield s


@pytest.fixture(scope="module")
def hermes(tiny):
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "2", "--template", TEMPLATES / "hermes.jinja") as s:
        yield s


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_is_kept_apart_from_the_answer(thinking: ServerProcess, stream: bool):
    """The template opens <think> in the prompt: the reply starts inside the reasoning."""
    content, reasoning, calls, finish = ask(thinking, "Two and two make four.\n</think>\n\nFour.", stream=stream)
    assert reasoning.strip() == "Two and two make four." and content.strip() == "Four."
    assert calls == [] and finish == "stop"
    assert "reasoning: think" in thinking.stderr  # what was detected is said when the model loads


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_comes_back_as_tool_calls(hermes: ServerProcess, stream: bool):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, _, calls, finish = ask(hermes, call, stream=stream, tools=[WEATHER])
    assert finish == "tool_calls" and not (content or "").strip()
    ((call_id, name, arguments),) = calls
    assert call_id and name == "get_weather" and json.loads(arguments) == {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True])
def test_text_before_two_parallel_calls(hermes: ServerProcess, stream: bool):
    text = (
        "Let me look.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    content, _, calls, finish = ask(hermes, text, stream=stream, tools=[WEATHER])
    assert content.strip() == "Let me look." and finish == "tool_calls"
    assert [json.loads(a)["city"] for _, _, a in calls] == ["Paris", "Rome"] and calls[0][0] != calls[1][0]


def test_a_malformed_call_is_content_and_a_warning_never_an_error(hermes: ServerProcess):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'
    content, _, calls, finish = ask(hermes, text, stream=False, tools=[WEATHER])
    assert calls == [] and finish == "stop" and "get_weather" in content
    assert "given back as content" in hermes.stderr


def test_without_tools_the_markup_is_just_text(hermes: ServerProcess):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    content, _, calls, finish = ask(hermes, text, stream=False)
    assert calls == [] and finish == "stop" and content.strip() == text


def test_the_full_loop_call_result_answer(hermes: ServerProcess):
    """The call, its result as a role tool message, and the answer: the history goes back through
    the template (the call's arguments as an object, the result where the template puts it)."""
    client = hermes.client()
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(
        model=TINY, messages=messages, tools=[WEATHER], temperature=0, extra_body={"grammar": gbnf_literal(call)}
    )
    assistant = first.choices[0].message
    messages += [
        assistant.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": assistant.tool_calls[0].id, "content": '{"sky": "clear"}'},
    ]
    final = client.chat.completions.create(
        model=TINY,
        messages=messages,
        tools=[WEATHER],
        temperature=0,
        extra_body={"grammar": gbnf_literal("It is clear in Paris.")},
    )
    assert final.choices[0].message.content == "It is clear in Paris." and final.choices[0].finish_reason == "stop"
    # the prompt held the call and its result: more tokens than the first question alone
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 20


CITY = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "plain", "qwen3-coder", "gpt-oss"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_required_call_is_written_in_the_family_format_and_follows_the_schema(tiny, family: str, stream: bool):
    """tool_choice required: the grammar makes the model's own (random) tokens a call of the
    family's syntax whose arguments validate; a named function is the one called."""
    import jsonschema

    template = TEMPLATES / f"{family}.jinja"
    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "1", "--template", template) as server:
        client = server.client()
        common = {"model": TINY, "messages": [{"role": "user", "content": "Weather?"}], "tools": [CITY, TIME]}
        common |= {"max_tokens": 200, "temperature": 0.9, "seed": 7, "parallel_tool_calls": False}
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            if stream:
                calls: dict[int, list[str]] = {}
                finish = None
                for chunk in client.chat.completions.create(stream=True, tool_choice=choice, **common):
                    for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                        calls.setdefault(call.index, [call.function.name or "", ""])[1] += call.function.arguments or ""
                    finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
                got = [tuple(c) for _, c in sorted(calls.items())]
            else:
                reply = client.chat.completions.create(tool_choice=choice, **common)
                finish = reply.choices[0].finish_reason
                got = [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls or []]
            assert finish == "tool_calls" and got, server.stderr[-2000:]
            for name, arguments in got:
                tool = {"get_weather": CITY, "get_time": TIME}[name]
                jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])
            if isinstance(choice, dict):
                assert {name for name, _ in got} == {"get_weather"}


def test_run_prints_only_the_answer_and_the_reasoning_where_asked(tiny, tmp_path: Path):
    """`run`: stdout is the answer; --show-thinking puts the reasoning on stderr; --json has both
    apart, and --json --stream marks each chunk."""
    import subprocess
    import sys

    grammar = tmp_path / "think.gbnf"
    grammar.write_text(gbnf_literal("Two and two make four.\n</think>\n\nFour.") + "\n")
    base = [sys.executable, "-m", "localrun", "run", str(tiny.quants["Q8_0"]), "Sum?", "-n", "60"]
    base += ["--template", str(TEMPLATES / "deepseek-r1.jinja"), "--grammar", str(grammar), "--no-prompt-cache"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    plain = run()
    assert plain.stdout.strip() == "Four." and "two make" not in plain.stderr
    shown = run("--show-thinking")
    assert shown.stdout.strip() == "Four." and "Two and two make four." in shown.stderr
    data = json.loads(run("--json").stdout)
    assert data["text"].strip() == "Four." and data["reasoning"].strip() == "Two and two make four."
    lines = [json.loads(line) for line in run("--json", "--stream").stdout.splitlines()]
    thought = "".join(line["text"] for line in lines if line["kind"] == "reasoning")
    answer = "".join(line["text"] for line in lines if line["kind"] == "piece")
    assert thought.strip() == "Two and two make four." and answer.strip() == "Four."


def test_think_and_no_think_pass_the_templates_switch(tiny):
    """--think/--no-think set the template's own switch (Qwen3's enable_thinking): the prompt differs."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "localrun", "run", str(tiny.quants["Q8_0"]), "Hi", "-n", "1", "--json"]
    base += ["--template", str(TEMPLATES / "qwen3.jinja"), "--no-prompt-cache"]
    sizes = {}
    for flag in ("--think", "--no-think"):
        done = subprocess.run([*base, flag], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        sizes[flag] = json.loads(done.stdout)["prompt_tokens"]
    assert sizes["--think"] != sizes["--no-think"]


def run_json(tiny, *extra: str) -> dict:
    """`run --json` on the tiny model under a template that opens <think> in the prompt (it never
    closes it itself, so only a budget ends its reasoning)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "localrun", "run", str(tiny.quants["Q8_0"]), "Sum?", "--json", "--temp", "0"]
    command += ["--template", str(TEMPLATES / "deepseek-r1.jinja"), "--no-prompt-cache", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("budget", [0, 5])
def test_a_reasoning_budget_ends_the_reasoning_after_n_tokens(tiny, budget: int):
    """--reasoning-budget N: N tokens of reasoning, then the closing marker's tokens (forced: each
    certain, logprob 0), then the answer; the Stats count the reasoning's tokens, the marker's
    included."""
    data = run_json(tiny, "-n", "20", "--logprobs", "0", "--reasoning-budget", str(budget))
    tokens = [t["token"] for t in data["logprobs"]]
    n_close = next(i for i in range(1, 12) if "".join(tokens[budget : budget + i]).strip() == "</think>")
    # the marker as it comes inside a text: no space of the vocabulary's before its first piece
    assert "".join(tokens[budget : budget + n_close]) == "</think>"
    assert all(t["logprob"] == 0.0 for t in data["logprobs"][budget : budget + n_close])
    assert (data.get("reasoning") or "").strip() == "".join(tokens[:budget]).strip()
    assert data["text"].strip() == "".join(tokens[budget + n_close :]).strip() and data["text"].strip()
    assert data["reasoning_tokens"] == budget + n_close and data["generated_tokens"] == 20


def test_without_a_budget_the_reasoning_runs_on_and_is_counted(tiny):
    data = run_json(tiny, "-n", "12")
    assert data["text"] == "" and data["reasoning"] and data["reasoning_tokens"] == 12


def test_serve_holds_reasoning_to_its_budget_and_counts_the_reasoning_tokens(tiny):
    """The server's --reasoning-budget, a request's own (llama-server's thinking_budget_tokens,
    -1: none), and usage.completion_tokens_details.reasoning_tokens, whole and in the stream's
    usage chunk."""
    args = ("--parallel", "1", "--reasoning-budget", "3", "--template", TEMPLATES / "deepseek-r1.jinja")
    with ServerProcess([tiny.quants["Q8_0"]], *args) as server:
        client = server.client()
        common = {"model": TINY, "messages": [{"role": "user", "content": "Sum?"}], "max_tokens": 16, "temperature": 0}
        by_server = client.chat.completions.create(**common)
        assert by_server.choices[0].message.content  # the answer follows the forced </think>
        counted = by_server.usage.completion_tokens_details.reasoning_tokens
        own = client.chat.completions.create(**common, extra_body={"thinking_budget_tokens": 6})
        assert own.usage.completion_tokens_details.reasoning_tokens == counted + 3
        unbounded = client.chat.completions.create(**common, extra_body={"thinking_budget_tokens": -1})
        assert not unbounded.choices[0].message.content
        assert unbounded.usage.completion_tokens_details.reasoning_tokens == 16
        chunks = list(client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == counted
        reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks[:-1])
        assert reasoning == by_server.choices[0].message.model_extra["reasoning_content"]


def test_a_grammar_that_rules_out_the_closing_marker_wins_over_the_budget(tiny, tmp_path: Path):
    """A forced token is accepted into the grammar first: one the grammar rules out is not forced
    (accepting it would make llama.cpp's grammar throw, which aborts the process)."""
    grammar = tmp_path / "think.gbnf"
    grammar.write_text(gbnf_literal("Two and two make four.\n</think>\n\nFour.") + "\n")
    data = run_json(tiny, "-n", "60", "--grammar", str(grammar), "--reasoning-budget", "2")
    assert data["reasoning"].strip() == "Two and two make four." and data["text"].strip() == "Four."


def chat_keys(tiny, keys: str, template: str, max_tokens: int = 8):
    """Type `keys` into the real REPL (prompt-toolkit over a pipe) with the tiny model under a
    thinking template; the conversation it leaves."""
    from localrun.commands.generate import PromptOptions
    from localrun.inference.generation.settings import SamplingOptions, Settings
    from support.chat import typed_into_repl

    settings = Settings(SamplingOptions(temperature=0), max_tokens)
    options = PromptOptions(template_file=TEMPLATES / template, reasoning_budget=3)
    return typed_into_repl(tiny.quants["Q8_0"], keys, settings, options, n_ctx=512)


def test_chat_shows_hides_and_saves_the_reasoning_apart(tiny, tmp_path: Path, capsys):
    """/hide thinking collapses a reply's reasoning to the live line, /show thinking prints the
    last one; the conversation (and /save, and /load) keeps each reply's reasoning apart from
    its answer."""
    saved = tmp_path / "chat.json"
    keys = "\r".join(["/hide thinking", "first", "/show thinking", "/show nothing", f"/save {saved}", "/clear"])
    conv = chat_keys(tiny, keys + f"\r/load {saved}\r", "deepseek-r1.jinja", max_tokens=20)
    err = capsys.readouterr().err
    reply = conv.messages[1]
    assert reply["role"] == "assistant" and reply["reasoning_content"] and "</think>" not in reply["content"]
    assert err.count(reply["reasoning_content"]) == 1  # hidden as it came, printed by /show thinking
    assert "/show takes thinking" in err
    data = json.loads(saved.read_text())
    assert data["messages"][1]["reasoning_content"] == reply["reasoning_content"]
    assert data["messages"][1]["content"] == reply["content"]


def test_chat_think_on_and_off_sets_the_templates_switch(tiny, capsys):
    """/think off sends Qwen3's enable_thinking false (its template then writes an empty
    reasoning into the prompt); /think on a template with no switch says so."""
    conv = chat_keys(tiny, "/think off\rhello\r", "qwen3.jinja", max_tokens=1)
    assert conv.sent.endswith("<think>\n\n</think>\n\n")
    assert "thinking off from the next question" in capsys.readouterr().err
    chat_keys(tiny, "/think on\r/think maybe\r", "deepseek-r1.jinja", max_tokens=1)
    err = capsys.readouterr().err
    assert "this model's template has no thinking switch" in err and "/think takes on or off" in err


def run_cli(*args: str, timeout: float = 120):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "localrun", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("family", ["hermes", "llama3"])
def test_run_tools_prints_each_call_as_json_for_a_script(tiny, tmp_path: Path, family: str):
    """`run --tools FILE`: a call the family's grammar made (a named one, or any required) as one
    JSON line on stdout, as tool_calls in --json, as a tool_call event with --json --stream; its
    arguments follow the tool's schema, and the exit status is 0."""
    import jsonschema

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": [CITY, TIME]}))
    base = [str(tiny.quants["Q8_0"]), "Weather?", "-n", "120", "--seed", "7", "--no-prompt-cache"]
    base += ["--template", str(TEMPLATES / f"{family}.jinja"), "--tools", str(tools)]

    def calls(*extra: str) -> list[dict]:
        done = run_cli("run", *base, *extra)
        assert done.returncode == 0, done.stderr
        if "--stream" in extra:
            found = [json.loads(line) for line in done.stdout.splitlines()]
            found = [{k: v for k, v in line.items() if k != "kind"} for line in found if line["kind"] == "tool_call"]
        elif "--json" in extra:
            data = json.loads(done.stdout)
            assert not data["text"].strip()
            found = data["tool_calls"]
        else:
            found = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        assert found and all(call["id"] and set(call) == {"id", "name", "arguments"} for call in found)
        for call in found:
            jsonschema.validate(
                call["arguments"], {"get_weather": CITY, "get_time": TIME}[call["name"]]["function"]["parameters"]
            )
        return found

    assert {call["name"] for call in calls("--tool-choice", "get_weather")} == {"get_weather"}
    calls("--tool-choice", "required", "--json")
    calls("--tool-choice", "required", "--json", "--stream")


def test_run_tools_refuses_what_it_cannot_do_in_one_line(tiny, tmp_path: Path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([CITY]))
    model = str(tiny.quants["Q8_0"])
    cases = [
        (["run", model, "hi", "--tools", str(tools), "--tool-choice", "get_time"], "--tool-choice get_time is not"),
        (["run", model, "hi", "--tool-choice", "required"], "--tool-choice goes with --tools"),
        (["run", model, "hi", "--tools", str(tmp_path / "nope.json")], "cannot read"),
        (["run", model, "hi", "--tools", str(tmp_path)], "cannot read"),
        (["run", model, "hi", "--tools", str(tools), "--server", "http://127.0.0.1:9"], "--tools is for one answer"),
    ]
    (tmp_path / "bad.json").write_text("{not json")
    cases.append((["run", model, "hi", "--tools", str(tmp_path / "bad.json")], "is not JSON"))
    (tmp_path / "empty.json").write_text("[]")
    cases.append((["run", model, "hi", "--tools", str(tmp_path / "empty.json")], "holds no tools"))
    for args, said in cases:
        done = run_cli(*args, timeout=60)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


def test_mistral_calls_get_nine_character_ids_that_its_template_takes_back(tiny):
    """Mistral's templates refuse a call id that is not 9 letters and digits when the call comes
    back in the history: its family makes such ids (others keep OpenAI's call_...)."""
    import re

    with ServerProcess([tiny.quants["Q8_0"]], "--parallel", "1", "--template", TEMPLATES / "mistral.jinja") as server:
        client = server.client()
        messages = [{"role": "user", "content": "Weather?"}]
        common = {"model": TINY, "tools": [CITY], "max_tokens": 120, "seed": 7, "parallel_tool_calls": False}
        first = client.chat.completions.create(messages=messages, tool_choice="required", **common)
        assistant = first.choices[0].message
        (call,) = assistant.tool_calls
        assert re.fullmatch("[A-Za-z0-9]{9}", call.id)
        messages += [
            assistant.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
        ]
        final = client.chat.completions.create(messages=messages, **common | {"max_tokens": 4})
        assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were read


ANSWER = {
    "type": "object",
    "properties": {"sum": {"type": "integer", "minimum": 0, "maximum": 99}, "sure": {"type": "boolean"}},
    "required": ["sum", "sure"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream,budget", [(False, 4), (True, 4), (False, 0)])
def test_response_format_holds_after_a_thinking_models_reasoning(thinking: ServerProcess, stream: bool, budget: int):
    """The template leaves the model thinking: the schema's grammar waits for the end of the
    reasoning (here forced by the budget, the tiny model never ends it) and the answer follows it;
    a budget of 0 closes the reasoning before anything is sampled."""
    import jsonschema

    client = thinking.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}
    common = {"model": TINY, "messages": [{"role": "user", "content": "Sum?"}], "max_tokens": 80, "seed": 3}
    common |= {"response_format": fmt, "extra_body": {"thinking_budget_tokens": budget}}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **common))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasoning = "".join(
            (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
        )
    else:
        message = client.chat.completions.create(**common).choices[0].message
        content, reasoning = message.content, message.model_extra["reasoning_content"]
    assert bool(reasoning) == (budget > 0) and "</think>" not in (reasoning or "")
    jsonschema.validate(json.loads(content), ANSWER)


def test_run_json_schema_holds_after_a_thinking_models_reasoning(tiny, tmp_path: Path):
    import jsonschema

    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(ANSWER))
    data = run_json(
        tiny, "-n", "80", "--temp", "0.8", "--seed", "3", "--json-schema", str(schema), "--reasoning-budget", "4"
    )
    assert data["reasoning"] and data["reasoning_tokens"] > 4
    jsonschema.validate(json.loads(data["text"]), ANSWER)


def test_run_with_server_keeps_the_servers_reasoning_apart(thinking: ServerProcess, tmp_path: Path):
    """`run --server`: the server's reasoning_content is the reasoning here too, never the answer."""
    grammar = tmp_path / "think.gbnf"
    grammar.write_text(gbnf_literal("Two and two make four.\n</think>\n\nFour.") + "\n")
    done = run_cli("run", TINY, "Sum?", "--server", thinking.url, "--grammar", str(grammar), "--json", "-n", "60")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["text"].strip() == "Four." and data["reasoning"].strip() == "Two and two make four."
    assert data["reasoning_tokens"] > 5


def test_forced_tokens_give_the_same_reply_with_and_without_speculation(tiny):
    """Greedy, speculation is exact: the reply around the forced closing marker is the same whether
    drafts were verified (none covers a forced token) or not."""
    common = ("-n", "60", "--reasoning-budget", "5")
    drafted = run_json(tiny, *common, "--speculate", "lookup")  # drafts whenever the lookup finds some
    plain = run_json(tiny, *common, "--speculate", "off")
    assert drafted["drafted"] > 0 and plain["drafted"] == 0
    assert (drafted["reasoning"], drafted["text"]) == (plain["reasoning"], plain["text"])
    assert drafted["reasoning_tokens"] == plain["reasoning_tokens"]


def test_the_reasoning_watch_counts_and_forces_the_close_each_time_the_reasoning_opens():
    """The watch the core consults after each token (no model needed): the tokens inside the
    reasoning are counted (its closing marker too, not an opening the model writes), the close is
    forced once the budget is spent, and again at once when harmony opens its analysis anew."""
    from localrun.inference.prompting.families import REASONING_FORMATS
    from localrun.inference.prompting.reasoning_watch import ReasoningWatch

    harmony = next(f for f in REASONING_FORMATS if f.name == "harmony")
    watch = ReasoningWatch(harmony, starts_in_reasoning=False, budget=2, closing=[7, 8])
    assert watch.start() == []
    opening = "<|channel|>analysis<|message|>"
    seen = [watch.see(text) for text in (opening, "Hm", "m.")]
    assert seen == [(False, []), (True, []), (True, [7, 8])]
    # the forced tokens' texts, then the answer: the close is not forced twice
    seen = [watch.see(text) for text in ("<|end|>", "<|start|>assistant<|channel|>final<|message|>", "Hi")]
    assert seen == [(True, []), (False, []), (False, [])]
    assert watch.see(opening) == (False, [7, 8])  # opened again with the budget spent: closed at once
    zero = ReasoningWatch(harmony, starts_in_reasoning=True, budget=0, closing=[7])
    assert zero.start() == [7]
