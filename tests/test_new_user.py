"""What a new user trips over (issue 22): commands, paths and log lines printed whole on a terminal,
bench across two models, the server's log, `cache ls`, and the exit codes of pull and rm."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import openai
import pexpect
import pytest
from typer.testing import CliRunner

from localrun.cli import app
from support.serving import ServerProcess

runner = CliRunner()
REPO = "org/tiny-GGUF"


def on_terminal(*args: object, columns: int = 80, until: str | None = None, timeout: int = 120) -> pexpect.spawn:
    """`localrun ARGS` in a pseudo-terminal `columns` wide (stdout and stderr both on it)."""
    env = dict(os.environ, TERM="xterm", COLUMNS=str(columns), LINES="30")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localrun", *map(str, args)],
        env=env,
        encoding="utf-8",
        timeout=timeout,
        dimensions=(30, columns),
    )
    if until:
        child.expect(until)
    return child


ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[78DEM])")


def screen_of(*args: object, columns: int = 80) -> tuple[int, str]:
    """Run to the end on a terminal; the exit code and the text, lines as the program ended them
    (escape sequences removed; of a line redrawn after a carriage return, what was drawn last)."""
    child = on_terminal(*args, columns=columns)
    child.expect(pexpect.EOF)
    child.close()
    lines = ESCAPE.sub("", child.before).replace("\r\n", "\n").split("\n")
    return child.exitstatus, "\n".join(next((p for p in reversed(line.split("\r")) if p), "") for line in lines)


@pytest.fixture
def pulled(hub, tiny):
    """REPO with Q8_0 pulled through localrun."""
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "mmproj-tiny-F16.gguf": tiny.mmproj})
    result = runner.invoke(app, ["pull", f"{REPO}:Q8_0"])
    assert result.exit_code == 0, result.stderr
    return hub


# -- data is never wrapped --------------------------------------------------------------------------
def test_serve_prints_its_curl_example_on_one_line_and_logs_each_request_on_one_line(tiny):
    model = tiny.quants["Q8_0"]
    child = on_terminal("serve", model, "--port", "0", "--threads", "1", until=r"try: curl [^\r\n]*\r\n")
    try:
        command = child.after.strip().removeprefix("try: ")
        assert len(command) > 80  # longer than the terminal, and still one line
        assert command.endswith('"stream": true}\'') and "-H 'Content-Type: application/json'" in command
        started = child.before
        url = re.search(r"(http://\S+)/v1\r\n", started).group(1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        client.chat.completions.create(model="tiny-llama-Q8_0", messages=[{"role": "user", "content": "hi"}])
        child.expect(r"([^\r\n]*/v1/chat/completions[^\r\n]*)\r\n")
        line = child.match.group(1)
        # when, the method and the path, the model, the status, the figures: one line, nothing cut
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d POST /v1/chat/completions tiny-llama-Q8_0 200 · ", line)
        assert re.search(r"reply [\d,]+ tok, [\d.]+ tok/s", line) and len(line) > 80
        assert "…" not in line
        assert re.search(r"\d\d:\d\d:\d\d loaded tiny-llama-Q8_0: 4 slots × \d+ tokens, 1 thread, ", started)
    finally:
        child.sendintr()
        child.expect(pexpect.EOF)
    assert "stopped" in child.before


def test_a_stream_cut_by_shutdown_is_logged_with_the_200_it_was_sent(tiny):
    with ServerProcess([tiny.quants["Q8_0"]]) as server:
        client = openai.OpenAI(base_url=server.base, api_key="none")
        stream = client.chat.completions.create(
            model="tiny-llama-Q8_0",
            messages=[{"role": "user", "content": "tell me a story"}],
            max_tokens=1900,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
        next(chunks)
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError):
            for _ in chunks:
                pass
        server.proc.wait(60)
        log = server.stderr
    lines = [line for line in log.splitlines() if "POST /v1/chat/completions" in line]
    assert len(lines) == 1, log
    line = lines[0]
    assert " 200 · " in line and "cut short: the server is shutting down" in line, log
    assert " 503 " not in line


def test_auto_pull_prints_the_saved_path_whole(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"]})
    code, screen = screen_of("run", REPO, "hi", "-n", "1")
    assert code == 0, screen
    [saved] = [line for line in screen.splitlines() if line.startswith("saved ")]
    path = Path(saved.removeprefix("saved ").strip())
    assert path.is_file() and path.name == "tiny-Q8_0.gguf"  # not "saved" and the path in pieces


def test_a_command_quoted_in_a_hint_is_never_split_across_lines():
    repo = "acme/a-rather-long-repository-name-for-a-model-GGUF"
    code, screen = screen_of("bench", repo)
    assert code == 3, screen
    command = f"`localrun pull {repo}:Q4_K_M`"
    assert any(command in line for line in screen.splitlines()), screen  # whole, on one line, to copy
    assert all(len(line) <= 80 for line in screen.splitlines())  # and the prose around it still wraps


@pytest.mark.parametrize("columns", [80, 120])
def test_show_prints_the_path_whole_on_a_terminal(pulled, columns):
    code, screen = screen_of("show", f"{REPO}:Q8_0", columns=columns)
    assert code == 0, screen
    [line] = [line for line in screen.splitlines() if line.startswith("Path")]
    path = Path(line.removeprefix("Path").strip())
    assert path.is_file() and "…" not in line and len(line) > columns
    # prose still wraps under itself
    assert all(len(line) <= columns for line in screen.splitlines() if not line.startswith(("Path", "Files")))


# -- bench across models ----------------------------------------------------------------------------
SPEED = ["--no-quality", "--reps", "1", "--pp", "16", "--tg", "4"]


def bench(*args: object):
    return runner.invoke(app, ["bench", *map(str, args)])


def test_bench_of_two_models_labels_each_row_with_its_model_and_ranks_within_each(tiny):
    files = (tiny.quants["Q8_0"], tiny.quants["Q4_K_M"], tiny.no_template)
    table = bench(*files, *SPEED)
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.splitlines()
    rows = lines[1 : lines.index("")] + lines[lines.index("") + 1 : lines.index("") + 2]
    assert [row.lstrip("* ").split()[0] for row in rows] == [f.name for f in files]  # model by model, then apart
    assert "no other quant of the same model both faster" in table.stdout
    assert all(" ± " not in row for row in rows)  # one repetition: no spread to print

    data = json.loads(bench(*files, *SPEED, "--json").stdout)
    assert [(c["label"], c["model"]) for c in data["candidates"]] == [
        ("tiny-llama-Q8_0.gguf", "tiny-llama"),
        ("tiny-llama-Q4_K_M.gguf", "tiny-llama"),
        ("tiny-notemplate-Q8_0.gguf", "tiny-notemplate"),
    ]
    assert [m["model"] for m in data["models"]] == ["tiny-llama", "tiny-notemplate"]
    pareto = {c["label"] for c in data["candidates"] if c["pareto"]}
    assert {"tiny-llama-Q8_0.gguf", "tiny-notemplate-Q8_0.gguf"} <= pareto  # each model's most precise


def test_bench_of_two_models_measures_kld_and_recommends_within_each_model(tiny):
    quality = ["--reps", "1", "--pp", "16", "--tg", "4", "--ppl-ctx", "64", "--ppl-chunks", "1", "--json"]
    result = bench(tiny.no_template, tiny.quants["Q8_0"], tiny.quants["Q4_K_M"], *quality)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    c = {c["label"]: c for c in data["candidates"]}
    # each model's most precise quant is its own reference: no KLD across models
    assert c["tiny-notemplate-Q8_0.gguf"]["reference"] and c["tiny-llama-Q8_0.gguf"]["reference"]
    assert c["tiny-llama-Q4_K_M.gguf"]["kld"] > 0 and not c["tiny-llama-Q4_K_M.gguf"]["reference"]
    assert data["reference"] is None and data["recommendation"] is None  # nothing chosen across models
    models = {m["model"]: m for m in data["models"]}
    assert models["tiny-notemplate"]["reference"] == "tiny-notemplate-Q8_0.gguf"
    assert models["tiny-notemplate"]["recommendation"] is None  # one quant: nothing to choose between
    assert models["tiny-llama"]["recommendation"]["label"].startswith("tiny-llama-")


def test_bench_columns_share_one_precision_and_one_repetition_has_no_spread():
    from localrun.bench.results import BenchResult, CandidateResult, Stat
    from localrun.commands.bench import table_rows

    results = []
    for label, tg, sd, n in (("Q8_0", 79.8, 10.2, 3), ("Q4_K_M", 183.0, 29.0, 3), ("Q2_K", 79.0, 0.0, 1)):
        r = CandidateResult(label, f"{label}.gguf", label, 1000, status="ok")
        r.tg = Stat(tg, sd, n)
        results.append(r)
    cells = [row["tg t/s"] for row in table_rows(BenchResult({}, {}, results)) if row]
    assert cells == ["79.8 ± 10.2", "183.0 ± 29.0", "79.0"]


def test_bench_refuses_two_output_formats():
    from localrun.commands.bench import output_format
    from localrun.errors import UsageError

    with pytest.raises(UsageError, match="--json and --markdown are different formats"):
        output_format(json=True, markdown=True)
    assert output_format(csv=True) == "csv" and output_format() == "table"


def test_bench_json_and_markdown_together_is_a_usage_error(tiny):
    result = bench(tiny.quants["Q8_0"], "--json", "--markdown")
    assert result.exit_code == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1


def test_bench_progress_line_stays_one_line_with_long_labels():
    import io

    from rich.console import Console

    from localrun.bench.results import CandidateResult
    from localrun.commands.bench import ProgressDisplay
    from localrun.output import Output

    console = Console(file=io.StringIO(), force_terminal=True, width=60, no_color=True)
    progress = ProgressDisplay(Output(stderr_tty=True, _err=console))
    label = "acme/a-long-repository-name-GGUF:Q4_K_M"
    progress([CandidateResult(label, "q.gguf", "Q4_K_M", 1000)], 0, {"event": "phase", "phase": "load"})
    lines = console.render_lines(progress, console.options)  # as Live renders it, on every refresh
    assert len(lines) == 1  # a live line redrawn in place never wraps onto a second line


def test_bench_records_last_use(tiny):
    from localrun.store.usage import last_used

    assert last_used(tiny.quants["Q2_K"]) is None
    assert bench(tiny.quants["Q2_K"], *SPEED).exit_code == 0
    assert last_used(tiny.quants["Q2_K"]) is not None


# -- cache ls, pull, rm -----------------------------------------------------------------------------
def test_cache_ls_tells_entries_apart_by_how_they_begin_and_dates_them_as_list_does(tiny):
    from datetime import datetime

    for material in ("Invoice 2041 from ACME. " * 30, "Minutes of the board meeting. " * 30):
        asked = runner.invoke(app, ["run", str(tiny.quants["Q8_0"]), "sum up", "-n", "1", "--json"], input=material)
        assert asked.exit_code == 0, asked.output
    listed = runner.invoke(app, ["cache", "ls"])
    assert listed.exit_code == 0, listed.output
    header, *rows = listed.stdout.splitlines()
    assert header.split()[:2] == ["MODEL", "BEGINS"] and len(rows) == 2
    assert any("Invoice 2041" in row for row in rows) and any("Minutes of the" in row for row in rows)
    data = json.loads(runner.invoke(app, ["cache", "ls", "--json"]).stdout)
    for entry in data["entries"]:
        assert "ACME" in entry["begins"] or "board" in entry["begins"]
        assert datetime.fromisoformat(entry["used"]).utcoffset().total_seconds() == 0  # ISO 8601, UTC
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", entry["used"])


def test_pulling_a_projector_by_name_is_a_usage_error(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "mmproj-tiny-F16.gguf": tiny.mmproj})
    result = runner.invoke(app, ["pull", f"{REPO}:mmproj-tiny-F16.gguf"])
    assert result.exit_code == 2 and "is a vision projector" in result.stderr  # not 3, "not found"


def test_rm_answered_no_exits_1(pulled):
    child = on_terminal("rm", f"{REPO}:Q8_0", until=r"\[y/N\] ")
    child.sendline("n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "nothing removed" in child.before
    assert runner.invoke(app, ["list", "--json"]).stdout.count(f'"{REPO}:Q8_0"') == 1  # still there


def test_bench_of_two_repos_labels_rows_repo_quant(hub, tiny):
    for repo in ("acme/one-GGUF", "acme/two-GGUF"):
        hub.add_repo(repo, {f"tiny-llama-{q}.gguf": tiny.quants[q] for q in ("Q8_0", "Q2_K")})
    result = bench("acme/one-GGUF", "acme/two-GGUF", "--quants", "Q8_0,Q2_K", *SPEED)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    labels = [line.lstrip("* ").split()[0] for line in lines[1:6] if line]
    assert labels == ["acme/one-GGUF:Q8_0", "acme/one-GGUF:Q2_K", "acme/two-GGUF:Q8_0", "acme/two-GGUF:Q2_K"]
    assert lines[3] == ""  # the two models' rows apart
