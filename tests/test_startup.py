"""What a command costs before it does its work: the modules a one-shot answer imports, and the
help every command prints. Structural checks, never timings (scripts/bench_startup.py times it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
from typer.testing import CliRunner

from localrun.cli import app

# `python -m localrun ARGS`, exactly, that writes the modules it imported to $MODULES_OUT as it exits.
PROBE = (
    "import atexit, json, os, runpy, sys\n"
    "atexit.register(lambda: open(os.environ['MODULES_OUT'], 'w').write(json.dumps(sorted(sys.modules))))\n"
    "sys.argv[0] = 'localrun'\n"
    "runpy.run_module('localrun', run_name='__main__', alter_sys=True)\n"
)
# What no answer from a local model needs: the Hub client and pull, the test-model builder and the
# gguf package (a model already seen has its header facts on disk), the server and its stack, and
# pydantic (Typer 0.29 builds a pydantic TypeAdapter for every parameter of every command run).
NEVER_FOR_AN_ANSWER = (
    "pydantic",
    "huggingface_hub",
    "localrun.commands.pull",
    "localrun.commands.planning",
    "localrun.hub.download",
    "localrun.model.tiny",
    "gguf",
    "fastapi",
    "uvicorn",
    "starlette",
    "localrun.serve",
)


def seen_before(model: Path) -> None:
    """One answer from `model`, so that its header facts are on disk as after any first use."""
    first = subprocess.run(
        [sys.executable, "-m", "localrun", "run", str(model), "hi", "-n", "1"], capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr


def imported(modules_file: Path, names: tuple[str, ...]) -> list[str]:
    """Which of `names` (packages count with their submodules) the probed command imported."""
    modules = json.loads(modules_file.read_text())
    return sorted({name for name in names for m in modules if m == name or m.startswith(name + ".")})


def test_a_one_shot_answer_imports_neither_the_repl_nor_the_hub_nor_the_builders(tiny, tmp_path):
    seen_before(tiny.quants["Q8_0"])
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "run", str(tiny.quants["Q8_0"]), "hi", "-n", "2"],
        env=dict(os.environ, MODULES_OUT=str(out)),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert imported(out, ("llama_cpp",)) == ["llama_cpp"]  # the probe saw the real run
    assert imported(out, ("prompt_toolkit", "localrun.commands.repl", *NEVER_FOR_AN_ANSWER)) == []


def test_chat_imports_only_what_it_needs_to_its_first_prompt(tiny, tmp_path):
    seen_before(tiny.quants["Q8_0"])
    out = tmp_path / "modules.json"
    env = dict(os.environ, MODULES_OUT=str(out), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(
        sys.executable,
        ["-c", PROBE, "chat", str(tiny.quants["Q8_0"])],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(30, 100),
    )
    child.expect_exact(">>>")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert imported(out, ("prompt_toolkit",)) == ["prompt_toolkit"]
    assert imported(out, NEVER_FOR_AN_ANSWER) == []


# -- --help ----------------------------------------------------------------------------------------

runner = CliRunner()
# Typer's names for types, and its bracketing or repeating of a metavar that has its own.
PLACEHOLDERS = ("<str>", "<int", "<float", "<path", "<bool", "list[", "[[", "]]", "...]...", "...}...")


def help_of(args: list[str]) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.stdout


def section(text: str, title: str) -> list[str]:
    """The lines of a help section ("Options:", "Arguments:", "Commands:") up to the next blank line."""
    lines = text.splitlines()
    if f"{title}:" not in lines:
        return []
    body = lines[lines.index(f"{title}:") + 1 :]
    return body[: body.index("")] if "" in body else body


def entries(lines: list[str]) -> dict[str, str]:
    """Each entry of a section (a line indented by two) with its description, continuation lines
    joined, and the bracketed facts Typer adds ([default: ...], [required], ranges) removed."""
    found: dict[str, str] = {}
    name = ""
    for line in lines:
        if re.match(r"^  \S", line):
            name, _, rest = line.strip().partition("  ")
            found[name] = rest
        elif name:
            found[name] += " " + line.strip()
    return {key: re.sub(r"\[[^\]]*\]", "", text).strip() for key, text in found.items()}


def every_command() -> list[list[str]]:
    """Every command and subcommand, as the help lists them (a group's own help included)."""
    commands, groups = [], [[]]
    while groups:
        group = groups.pop()
        for name in entries(section(help_of(group), "Commands")):
            path = [*group, name]
            commands.append(path)
            if section(help_of(path), "Commands"):
                groups.append(path)
    return commands


def test_every_help_names_values_in_words_and_describes_every_option():
    commands = every_command()
    assert ["run"] in commands and ["cache", "ls"] in commands and ["serve"] in commands
    assert "--pp N" in help_of(["bench"]) and "--port N" in help_of(["serve"])  # were <int range>
    assert "{MODEL...}" in help_of(["bench"]) and "[MODEL...]" in help_of(["serve"])  # several, or none
    assert "[PROMPT...]" in help_of(["run"])
    for args in [[], *commands]:
        text = help_of(args)
        shown = " ".join(args) or "localrun"
        for placeholder in PLACEHOLDERS:
            assert placeholder not in text, f"{shown} --help shows {placeholder!r}:\n{text}"
        for kind in ("Arguments", "Options"):
            for name, description in entries(section(text, kind)).items():
                assert re.search(r"\w", description), f"{shown} --help: {name} has no description"


def test_the_kv_cache_type_ids_are_ggmls():
    import gguf

    from localrun.fit import KV_TYPES
    from localrun.inference.llama.runtime import GGML_KV_TYPES

    assert set(GGML_KV_TYPES) == set(KV_TYPES)
    assert all(GGML_KV_TYPES[name] == gguf.GGMLQuantizationType[name.upper()] for name in KV_TYPES)
