"""Names from outside and the hints localrun gives, through the real CLI: escape sequences in file
names and `general.name`, hostile headers served by a Hub repo, a second pull, a vision projector
named as a model, a base model in `chat`, and `hw` into a pipe."""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from typer.testing import CliRunner

from localrun import hardware
from localrun.cli import app
from localrun.hub.settings import cache_dir
from localrun.inference.llama.build import build_info
from localrun.model.tiny import TinySpec, write_tiny_model

runner = CliRunner()
REPO = "acme/tiny-GGUF"
GiB = 2**30
# An OSC that retitles the terminal, and a clear screen: what a hostile name would do if printed raw.
EVIL = "\x1b]0;pwned\x07\x1b[2J"
EVIL_SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J"  # the same, as localrun must print it
RAW_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # anything that could drive a terminal
MEMORY_LIMIT = 2 * GiB  # address space of a child given a hostile header: far below what a 2^31 list needs


def cli(*args: object, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def no_raw_controls(*streams: str) -> None:
    for stream in streams:
        assert not RAW_CONTROLS.search(stream), repr(stream)


def limited_localrun(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real CLI in a child process with its address space capped: a header that made localrun
    allocate by what it claims would end in MemoryError (or worse), not in a clean refusal."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run(
        [sys.executable, "-m", "localrun", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=timeout,
        preexec_fn=cap,
    )


def whole_gets(hub) -> list:
    """GETs that download a file's body (whole, or resumed from an offset), not a header's range."""
    return [g for g in hub.downloads() if g.range is None or g.range.strip().endswith("-")]


# -- 1. escape sequences in names ------------------------------------------------------------------
@pytest.fixture(scope="session")
def evil_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny F32 model whose general.name and file name both carry escape sequences."""
    folder = tmp_path_factory.mktemp("evil")
    return write_tiny_model(folder / f"tiny{EVIL}-Q8_0.gguf", TinySpec(name=f"tiny{EVIL}name"))


def test_escapes_in_a_local_file_name_and_general_name_are_printed_escaped(evil_model):
    shown = cli("show", evil_model)
    assert shown.exit_code == 0, shown.stderr
    no_raw_controls(shown.stdout, shown.stderr)
    assert f"llama (tiny{EVIL_SHOWN}name)" in shown.stdout  # general.name, escaped
    assert f"tiny{EVIL_SHOWN}-Q8_0.gguf" in shown.stdout  # the file name, escaped
    # JSON is for programs: the exact values, in JSON's own escapes, never a raw ESC on the wire.
    as_json = cli("show", evil_model, "--json")
    assert as_json.exit_code == 0, as_json.stderr
    no_raw_controls(as_json.stdout)
    data = json.loads(as_json.stdout)
    assert data["name"] == f"tiny{EVIL}name" and data["files"][0]["name"] == evil_model.name

    ran = cli("run", evil_model, "--raw", "-n", "2", "--temp", "0", "hello")
    assert ran.exit_code == 0, ran.stderr
    no_raw_controls(ran.stderr)
    assert EVIL_SHOWN in ran.stderr and "reply 2 tok" in ran.stderr  # the stats line names the model


def test_escapes_in_a_repo_file_name_are_printed_escaped_by_pull_list_show_and_rm(hub, evil_model):
    # One file whose name gives a quant (the label is org/repo:Q8_0, the name shows as the file),
    # and one whose name gives none (the file name is the label itself).
    hub.add_repo("acme/evil-GGUF", {f"tiny{EVIL}-Q8_0.gguf": evil_model})
    hub.add_repo("acme/plain-GGUF", {f"tiny{EVIL}.gguf": evil_model})
    planned = cli("pull", "acme/plain-GGUF", "--dry-run")
    assert planned.exit_code == 0, planned.stderr
    no_raw_controls(planned.stdout, planned.stderr)
    assert f"tiny{EVIL_SHOWN}.gguf" in planned.stdout and not whole_gets(hub)

    for repo in ("acme/evil-GGUF", "acme/plain-GGUF"):
        for attempt in ("saved ", "already pulled: "):  # a second pull prints the path again
            pulled = cli("pull", repo)
            assert pulled.exit_code == 0, pulled.stderr
            no_raw_controls(pulled.stdout, pulled.stderr)
            last = pulled.stdout.splitlines()[-1]
            assert last.startswith(attempt) and last.endswith(".gguf") and EVIL_SHOWN in last, last

    listed = cli("list")
    assert listed.exit_code == 0, listed.stderr
    no_raw_controls(listed.stdout, listed.stderr)
    assert "acme/evil-GGUF:Q8_0" in listed.stdout and f"acme/plain-GGUF:tiny{EVIL_SHOWN}.gguf" in listed.stdout

    for repo in ("acme/evil-GGUF", "acme/plain-GGUF"):
        shown = cli("show", repo)
        assert shown.exit_code == 0, shown.stderr
        no_raw_controls(shown.stdout, shown.stderr)
        assert f"llama (tiny{EVIL_SHOWN}name)" in shown.stdout and f"tiny{EVIL_SHOWN}" in shown.stdout

    removed = cli("rm", "acme/plain-GGUF", "--yes")
    assert removed.exit_code == 0, removed.stderr
    no_raw_controls(removed.stdout, removed.stderr)
    assert removed.stdout == f"removed acme/plain-GGUF:tiny{EVIL_SHOWN}.gguf\n"


# -- 2. hostile headers, local and served ----------------------------------------------------------
def _value_offset(data: bytes, key: str) -> tuple[int, int]:
    """Where the value of metadata `key` starts in a GGUF file, and its GGUF type."""
    name = key.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    return at + 4, struct.unpack_from("<I", data, at)[0]


def _hostile(source: Path, target: Path, mutation: str) -> Path:
    data = bytearray(source.read_bytes())
    if mutation == "layers":  # llama.block_count, a UINT32, set to 2^31
        at, kind = _value_offset(data, "llama.block_count")
        assert kind == 4
        struct.pack_into("<I", data, at, 2**31)
    elif mutation == "array":  # the vocabulary claims 2^40 strings
        at, kind = _value_offset(data, "tokenizer.ggml.tokens")
        assert kind == 9
        struct.pack_into("<Q", data, at + 4, 2**40)  # after the element type
    elif mutation == "string":  # general.name claims 2^62 bytes
        at, kind = _value_offset(data, "general.name")
        assert kind == 8
        struct.pack_into("<Q", data, at, 2**62)
    target.write_bytes(data)
    return target


HOSTILE = {
    "layers": "corrupt GGUF header (2,147,483,648 layers)",
    "array": "an array of 1,099,511,627,776 strings (tokenizer.ggml.tokens)",
    "string": "the value of general.name of 4,611,686,018,427,387,904 bytes",
}


def _one_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The run refused the file in one error line (and a hint), with no traceback; the line."""
    assert proc.returncode == 7, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout == "" and "Traceback" not in proc.stderr and "unexpected" not in proc.stderr
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and all(line.startswith(("error: ", "hint: ")) for line in lines), proc.stderr
    assert lines[-1].startswith("hint: download"), proc.stderr  # what to do: fetch it again
    for word in words:
        assert word in errors[0], errors[0]
    assert len(errors[0]) < 400
    return errors[0]


@pytest.mark.parametrize("mutation", sorted(HOSTILE))
def test_a_hostile_header_is_refused_in_one_line_in_bounded_memory_local_or_served(hub, tiny, tmp_path, mutation):
    bad = _hostile(tiny.quants["Q8_0"], tmp_path / "tiny-Q8_0.gguf", mutation)
    started = time.monotonic()
    _one_error(limited_localrun("show", str(bad)), "tiny-Q8_0.gguf", HOSTILE[mutation])

    hub.add_repo("acme/hostile-GGUF", {"tiny-Q8_0.gguf": bad})
    for args in (["show", "acme/hostile-GGUF"], ["pull", "acme/hostile-GGUF", "--dry-run"]):
        line = _one_error(limited_localrun(*args), "acme/hostile-GGUF", "tiny-Q8_0.gguf", HOSTILE[mutation])
        assert ": is " not in line  # the file and what is wrong with it read as one sentence
    assert time.monotonic() - started < 60
    assert not whole_gets(hub)  # the header was read by ranges; nothing was downloaded

    # Next to a sound quant, the hostile one is a row marked with what is wrong, never chosen.
    hub.add_repo("acme/mixed-GGUF", {"tiny-Q8_0.gguf": bad, "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]})
    mixed = limited_localrun("pull", "acme/mixed-GGUF", "--dry-run")
    assert mixed.returncode == 0 and mixed.stderr == "", mixed.stderr
    rows = {line.split()[1] if line.startswith("▶") else line.split()[0]: line for line in mixed.stdout.splitlines()}
    verdict = "corrupt GGUF header" if mutation == "layers" else "is truncated: the GGUF header ends past the end"
    assert verdict in rows["Q8_0"] and not rows["Q8_0"].startswith("▶")
    assert rows["Q4_K_M"].startswith("▶") and mixed.stdout.splitlines()[-1].startswith("Q4_K_M: ")
    asked = limited_localrun("pull", "acme/mixed-GGUF:Q8_0")
    _one_error(asked, "acme/mixed-GGUF", "tiny-Q8_0.gguf", HOSTILE[mutation])
    assert not whole_gets(hub)


# -- 3. a second pull --------------------------------------------------------------------------------
def test_a_second_pull_says_it_is_already_there_and_downloads_nothing(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]})
    first = cli("pull", REPO)
    assert first.exit_code == 0, first.stderr
    assert first.stderr.startswith("downloading Q8_0: 1 file")
    saved = first.stdout.splitlines()[-1]
    assert saved.startswith("saved ")
    path = Path(saved.removeprefix("saved "))
    stamp = path.stat().st_mtime_ns
    bodies = len(whole_gets(hub))
    assert bodies == 1

    for args in (["pull", REPO], ["pull", f"{REPO}:Q8_0"], ["pull", REPO, "--quant", "q8_0"]):
        again = cli(*args)
        assert again.exit_code == 0, again.stderr
        assert again.stderr == ""  # no "downloading", no progress
        assert again.stdout.splitlines()[-1] == f"already pulled: {path}"
        assert "saved" not in again.stdout
    assert len(whole_gets(hub)) == bodies  # only header ranges since the first pull
    assert path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache_dir().rglob("*.gguf")) == ["tiny-Q8_0.gguf"]
    # Piped, the table is as wide as its content: no line padded out to the console width.
    assert not [line for line in again.stdout.splitlines() if line != line.rstrip()], again.stdout


# -- 4. a vision projector named as the model --------------------------------------------------------
def test_a_projector_named_as_the_model_is_said_to_be_one(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "mmproj-tiny-F16.gguf": tiny.mmproj})
    for args in (
        ["pull", f"{REPO}:mmproj-tiny-F16.gguf"],
        ["pull", f"{REPO}:mmproj-tiny-F16.gguf", "--dry-run"],
        ["show", f"{REPO}:mmproj-tiny-F16.gguf"],
        ["run", f"{REPO}:mmproj-tiny-F16.gguf", "hello"],
    ):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)  # a usage error: the file is there
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            "error: mmproj-tiny-F16.gguf is a vision projector (mmproj), not a model to run",
            "hint: name one of the repo's models: tiny-Q8_0.gguf",
        ], result.stderr
    assert not hub.downloads("mmproj-tiny-F16.gguf")  # not even its header was read
    assert not list(cache_dir().rglob("*.gguf"))


# -- 5. a base model (no chat template) in chat ------------------------------------------------------
BASE_HINT = "It may be a base model, which continues text rather than answers"


def test_piped_chat_with_a_base_model_suggests_run_raw(tiny):
    model = tiny.no_template
    result = cli("chat", model, "-n", "2", "--temp", "0", input="the old man and the sea\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip()
    assert BASE_HINT in result.stderr
    assert f'localrun run {model} --raw "TEXT"' in result.stderr


def test_chat_on_a_terminal_with_a_base_model_suggests_run_raw(tiny):
    model = tiny.no_template
    env = dict(os.environ, TERM="xterm", COLUMNS="300", LINES="30", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localrun", "chat", str(model), "-n", "2", "--temp", "0"],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(30, 300),
    )
    try:
        child.expect_exact(">>>")
        before = child.before.replace("\r", "").replace("\n", "")
        assert BASE_HINT in before, before
        assert f'localrun run {model} --raw "TEXT"' in before, before
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_a_chat_model_gets_no_base_model_hint(tiny):
    result = cli("chat", tiny.quants["Q8_0"], "-n", "2", "--temp", "0", input="hello\n")
    assert result.exit_code == 0, result.stderr
    assert "base model" not in result.stderr and "--raw" not in result.stderr


# -- 6. hw into a pipe -----------------------------------------------------------------------------
def test_hw_into_a_pipe_is_unpadded_unwrapped_and_hints_nvidia_only_with_its_driver():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # as `localrun hw | cat`
    proc = subprocess.run(
        [sys.executable, "-m", "localrun", "hw", "--no-selftest"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines and not [line for line in lines if line != line.rstrip()], proc.stdout
    fields = {}
    for line in lines:
        label, _, value = re.split(r"( {2,})", line, maxsplit=1)
        fields[label] = value
    assert {"OS", "CPU", "RAM", "llama-cpp-python", "System info"} <= set(fields)
    assert fields["System info"] == build_info().system_info.strip()  # whole, on its own line, however long
    assert "Self-test" not in fields
    gpu_lines = [label for label in fields if label == "GPU" or label.startswith("GPU ")]
    assert gpu_lines
    if hardware.detect().gpus:
        return  # the GPUs are listed by name: no hint either way
    if hardware.nvidia_driver_present() and not hardware.nvml_available():
        assert "pip install 'localrun[nvidia]'" in fields["GPU"]
    else:
        assert fields["GPU"] == "none found"
        assert "nvidia" not in proc.stdout.lower()
