"""`localrun search` against the Hub emulator's model search, through the real huggingface_hub."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from localrun.cli import app
from localrun.commands.pull import pull
from localrun.commands.search import search, show_search
from localrun.fit import ram_headroom
from localrun.hardware import Machine
from localrun.model.refs import parse_ref
from localrun.output import Output
from support.hub import refusing_endpoint, unanswering_endpoint
from support.serving import ServerProcess

runner = CliRunner()
GiB = 2**30
MiB = 2**20
ROOMY = Machine(64 * GiB, 60 * GiB, [])


@pytest.fixture
def hub_repos(hub, tiny, big_model):
    """Repos of different sizes: small quants, one that only fits with its small quant, one that is
    only big, a gated one, one by another author, and one without GGUF (which the search leaves out)."""
    hub.add_repo(
        "acme/tiny-GGUF",
        {f"tiny-llama-{q}.gguf": tiny.quants[q] for q in ("F16", "Q8_0", "Q4_K_M", "Q2_K")},
        downloads=5000,
        likes=40,
    )
    hub.add_repo(
        "acme/mixed-GGUF",
        {"mixed-F32.gguf": big_model, "mixed-Q2_K.gguf": tiny.quants["Q2_K"]},
        downloads=3000,
        likes=90,
    )
    hub.add_repo("acme/huge-GGUF", {"huge-F32.gguf": big_model}, downloads=2000, likes=5, trending=9.0)
    hub.add_repo("meta/gated-GGUF", {"gated-Q4_K_M.gguf": tiny.quants["Q4_K_M"]}, gated=True, downloads=1000)
    hub.add_repo("bob/notemplate-GGUF", {"tiny-notemplate-Q8_0.gguf": tiny.no_template}, downloads=10, likes=1)
    hub.add_repo("acme/safetensors-only", {"model.safetensors": tiny.quants["Q8_0"]}, downloads=9000)
    return hub


def quiet() -> Output:
    return Output()


def tight_machine() -> Machine:
    """Room for mixed-GGUF's Q2_K and not for its F32 (nor for huge-GGUF's only file)."""
    found = {f.model.repo_id: f for f in search(None, quiet(), machine=ROOMY).found}
    q2k = next(r for r in found["acme/mixed-GGUF"].plan.rows if r.quant.label == "Q2_K")
    probe = Machine(4 * GiB, 4 * GiB, [])
    return Machine(4 * GiB, ram_headroom(probe) + q2k.plan.estimate.ram + MiB, [])


def best_label(found) -> str | None:
    return found.best.quant.label if found.best else None


# -- the choice ----------------------------------------------------------------------------------
def test_each_repo_gets_the_quant_pull_dry_run_chooses(hub_repos):
    tight = tight_machine()
    for machine in (ROOMY, tight):
        result = search(None, quiet(), machine=machine)
        assert [f.model.repo_id for f in result.found] == [
            "acme/tiny-GGUF",
            "acme/mixed-GGUF",
            "acme/huge-GGUF",
            "meta/gated-GGUF",
            "bob/notemplate-GGUF",
        ]  # by downloads, and the repo without GGUF left out
        for found in result.found:
            if found.model.gated:
                continue
            planned = pull(parse_ref(found.model.repo_id), quiet(), dry_run=True, machine=machine)
            chosen = planned.rows[planned.chosen].quant.label if planned.chosen is not None else None
            assert best_label(found) == chosen, found.model.repo_id
            assert found.plan.why == planned.why
    found = {f.model.repo_id: f for f in search(None, quiet(), machine=tight).found}
    assert best_label(found["acme/mixed-GGUF"]) == "Q2_K"  # only its small quant fits
    assert best_label(found["acme/huge-GGUF"]) is None and not found["acme/huge-GGUF"].fits
    assert found["acme/huge-GGUF"].smallest.quant.label == "F32"


def test_the_cli_choice_is_the_one_pull_dry_run_shows(hub_repos):
    searched = runner.invoke(app, ["search", "--json"])
    assert searched.exit_code == 0, searched.output
    results = {r["repo_id"]: r for r in json.loads(searched.stdout)["results"]}
    for repo in ("acme/tiny-GGUF", "acme/mixed-GGUF", "bob/notemplate-GGUF"):
        pulled = runner.invoke(app, ["pull", repo, "--dry-run", "--json"])
        assert pulled.exit_code == 0, pulled.output
        assert results[repo]["best"]["quant"] == json.loads(pulled.stdout)["chosen"], repo


def test_fits_keeps_only_the_repos_with_a_quant_that_fits(hub_repos):
    tight = tight_machine()
    kept = search(None, quiet(), machine=tight, fits_only=True)
    assert [f.model.repo_id for f in kept.shown] == ["acme/tiny-GGUF", "acme/mixed-GGUF", "bob/notemplate-GGUF"]
    assert all(f.fits for f in kept.shown)
    assert [f.model.repo_id for f in search(None, quiet(), machine=tight).shown][2] == "acme/huge-GGUF"


def test_query_author_sort_and_limit_reach_the_hub(hub_repos):
    def listed(*args: str) -> list[str]:
        result = runner.invoke(app, ["search", *args, "--json"])
        assert result.exit_code == 0, result.output
        return [r["repo_id"] for r in json.loads(result.stdout)["results"]]

    assert listed("TINY") == ["acme/tiny-GGUF"]  # the name contains the words, in any case
    assert listed("--author", "bob") == ["bob/notemplate-GGUF"]
    assert listed("--sort", "likes", "--limit", "2") == ["acme/mixed-GGUF", "acme/tiny-GGUF"]
    assert listed("--sort", "trending", "-n", "1") == ["acme/huge-GGUF"]
    assert listed("nothing-like-it") == []
    searches = [r for r in hub_repos.log if r.path == "/api/models"]
    assert len(searches) == 5


def test_params_and_arch_narrow_the_search(hub_repos):
    def listed(*args: str) -> list[str]:
        result = runner.invoke(app, ["search", *args, "--json"])
        assert result.exit_code == 0, result.output
        return [r["repo_id"] for r in json.loads(result.stdout)["results"]]

    nothing = runner.invoke(app, ["search", "--arch", "qwen3"])
    assert nothing.stdout == "" and nothing.stderr == "no GGUF repos of architecture qwen3 found on the Hub\n"
    assert not hub_repos.header_reads()  # the Hub's summary said llama: nothing was read
    small = ["acme/tiny-GGUF", "meta/gated-GGUF", "bob/notemplate-GGUF"]
    assert listed("--params", "-5M") == small  # the tiny models have 1.6M parameters
    assert listed("--params", "10m-1b") == ["acme/mixed-GGUF", "acme/huge-GGUF"]  # the big one 13.5M
    assert listed("--params", "1M-2M", "--arch", "LLAMA") == small
    bad = runner.invoke(app, ["search", "--params", "8B"])
    assert bad.exit_code == 2 and one_error(bad) == "error: not a parameter range: '8B'"


def test_json_gives_every_figure(hub_repos, tiny):
    result = runner.invoke(app, ["search", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["query"] == "tiny" and data["sort"] == "downloads" and data["machine"]["ram_available"] > 0
    (repo,) = data["results"]
    assert repo["repo_id"] == "acme/tiny-GGUF" and len(repo["commit"]) == 40
    assert (repo["downloads"], repo["likes"], repo["gated"]) == (5000, 40, False)
    assert repo["architecture"] == "llama" and repo["n_params"] > 0 and repo["context_length"] > 0
    assert repo["chat_template"] is True and repo["last_modified"]
    assert repo["fits"] is True and repo["why"].startswith(repo["best"]["quant"])
    best = repo["best"]
    assert best["size"] == tiny.quants[best["quant"]].stat().st_size
    assert best["ram"] > 0 and best["max_ctx"] > 0 and best["placement"] == "cpu"
    assert [c["quant"] for c in repo["candidates"]] == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]
    assert result.stderr == ""


def test_a_second_search_reads_nothing_of_the_repos_again(hub_repos):
    first = runner.invoke(app, ["search"])
    assert first.exit_code == 0, first.output
    reads, requests = len(hub_repos.header_reads()), len(hub_repos.log)
    assert reads > 0
    second = runner.invoke(app, ["search"])
    assert second.exit_code == 0, second.output
    assert second.stdout == first.stdout
    again = json.loads(runner.invoke(app, ["search", "--json"]).stdout)["results"]
    assert [r["from_cache"] for r in again] == [True, True, True, False, True]  # the gated repo was never read
    assert len(hub_repos.header_reads()) == reads  # no header read again
    assert [r.path for r in hub_repos.log[requests:]] == ["/api/models"] * 2  # the list, and nothing else


def test_a_new_commit_is_read_afresh(hub_repos, tiny):
    search("tiny", quiet(), machine=ROOMY)
    reads = len(hub_repos.header_reads())
    hub_repos.add_repo("acme/tiny-GGUF", {"tiny-llama-Q3_K_M.gguf": tiny.quants["Q3_K_M"]}, downloads=5000)
    (found,) = search("tiny", quiet(), machine=ROOMY).found
    assert [r.quant.label for r in found.plan.rows] == ["Q3_K_M"] and not found.cached
    assert len(hub_repos.header_reads()) > reads  # a file not read before


def test_a_pull_after_a_search_reads_no_header_again(hub_repos):
    """Headers are kept by their files' content: search and pull share what either read."""
    assert runner.invoke(app, ["search"]).exit_code == 0
    reads = len(hub_repos.header_reads())
    planned = runner.invoke(app, ["pull", "acme/tiny-GGUF", "--dry-run", "--json"])
    assert planned.exit_code == 0, planned.output
    assert len(hub_repos.header_reads()) == reads


def test_a_gated_repo_says_so_and_is_not_read_without_a_token(hub_repos, monkeypatch):
    (found,) = search("gated", quiet(), machine=ROOMY).found
    assert found.plan is None and found.note.startswith("gated") and not found.fits
    assert not [r for r in hub_repos.log if "gated-GGUF" in r.path]
    table = runner.invoke(app, ["search", "gated"])
    assert table.exit_code == 0 and table.stdout.splitlines()[1].split()[6] == "gated"
    monkeypatch.setenv("HF_TOKEN", "hf_testtoken")
    (found,) = search("gated", quiet(), machine=ROOMY).found
    assert best_label(found) == "Q4_K_M" and found.note is None


def test_a_hostile_search_answer_is_no_crash(hub, tiny):
    hub.add_repo("acme/tiny-GGUF", {"tiny-llama-Q2_K.gguf": tiny.quants["Q2_K"]})
    hub.add_repo("acme/../x\x1b[31m", {"x-Q2_K.gguf": tiny.quants["Q2_K"]})
    repo = hub.repos["acme/tiny-GGUF"]
    repo.downloads, repo.likes, repo.gguf = float("nan"), "many", {"total": "huge", "architecture": 5}
    result = runner.invoke(app, ["search", "--json"])
    assert result.exit_code == 0, result.output
    tiny_repo, bad = json.loads(result.stdout)["results"]
    assert (tiny_repo["downloads"], tiny_repo["likes"], tiny_repo["n_params"], tiny_repo["architecture"]) == (
        0,
        0,
        None,
        None,
    )
    assert tiny_repo["best"]["quant"] == "Q2_K"  # the header still says what it is
    assert bad["note"] == "not a repo name localrun can use" and bad["candidates"] == []
    table = runner.invoke(app, ["search"])
    assert table.exit_code == 0 and "\x1b" not in table.stdout + table.stderr


# -- the table -----------------------------------------------------------------------------------
def test_the_table_fits_80_columns(hub_repos):
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, no_color=True, highlight=False)
    out = Output(stdout_tty=True, _out=console, _err=Console(file=io.StringIO(), width=80))
    result = search(None, out, machine=tight_machine())
    show_search(out, result)
    lines = re.sub(r"\x1b\[[0-9;]*m", "", buffer.getvalue()).splitlines()  # the header is bold
    assert lines and all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert "acme/mixed-GGUF" in lines and "too big" in buffer.getvalue()


def test_on_a_terminal_a_progress_line_shows_on_stderr(hub_repos):
    screen = io.StringIO()
    console = Console(file=screen, width=80, force_terminal=True, no_color=True)
    out = Output(stderr_tty=True, _err=console)
    assert len(search(None, out, machine=ROOMY).found) == 5
    assert "fitting 5 repos to this machine: " in screen.getvalue()


def test_piped_the_table_is_one_line_per_repo(hub_repos):
    result = runner.invoke(app, ["search", "--author", "acme"])
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["repo", "params", "arch", "downloads", "likes", "updated", "fit", "size", "needs", "ctx"]
    assert [row.split()[0] for row in rows] == ["acme/tiny-GGUF", "acme/mixed-GGUF", "acme/huge-GGUF"]
    assert rows[0].split()[2:5] == ["llama", "5.0K", "40"]
    assert result.stderr.startswith("fit: the quantization `localrun pull` chooses here")


# -- errors --------------------------------------------------------------------------------------
def one_error(result) -> str:
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2 and all(line.startswith("hint: ") for line in lines[1:])
    return lines[0]


def test_offline_is_one_clean_error(hub_repos, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["search", "tiny"])
    assert result.exit_code == 5
    assert one_error(result) == "error: offline (HF_HUB_OFFLINE=1): cannot search the Hub"
    assert not [r for r in hub_repos.log if r.path == "/api/models"]


@pytest.mark.parametrize("kind, reason", [("refused", "connection refused"), ("unanswering", "no answer")])
def test_an_unreachable_hub_is_one_clean_error(monkeypatch, kind, reason):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with refusing_endpoint() if kind == "refused" else unanswering_endpoint() as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        started = time.monotonic()
        result = runner.invoke(app, ["search"])
        elapsed = time.monotonic() - started
    assert result.exit_code == 5, result.output
    assert one_error(result).startswith(f"error: cannot reach the Hub at {url}: {reason}")
    assert elapsed < 10  # no hang


@pytest.mark.parametrize(
    "args, words", [(["--sort", "stars"], "unknown sort 'stars'"), (["--limit", "0"], "--limit must be between")]
)
def test_bad_options_are_usage_errors(hub_repos, args, words):
    result = runner.invoke(app, ["search", *args])
    assert result.exit_code == 2 and words in one_error(result)
    assert not hub_repos.log


# -- names of your own ---------------------------------------------------------------------------
def localrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localrun", *args], capture_output=True, text=True, timeout=timeout)


def test_an_alias_is_set_listed_replaced_and_removed():
    assert runner.invoke(app, ["alias"]).stderr.startswith("no aliases yet")
    assert runner.invoke(app, ["alias", "coder", "acme/tiny-GGUF:Q2_K"]).stderr == "coder -> acme/tiny-GGUF:Q2_K\n"
    # an alias given as the model stands for its reference; a name may carry a tag, as Ollama's do
    assert runner.invoke(app, ["alias", "qwen3:8b", "coder"]).exit_code == 0
    replaced = runner.invoke(app, ["alias", "coder", "acme/other-GGUF"])
    assert replaced.stderr == "coder -> acme/other-GGUF (it was acme/tiny-GGUF:Q2_K)\n"
    listed = runner.invoke(app, ["alias", "--list"])
    assert listed.stdout.splitlines() == [
        "ALIAS     MODEL",
        "coder     acme/other-GGUF",
        "qwen3:8b  acme/tiny-GGUF:Q2_K",
    ]
    data = json.loads(runner.invoke(app, ["alias", "--json"]).stdout)
    assert data["aliases"] == {"coder": "acme/other-GGUF", "qwen3:8b": "acme/tiny-GGUF:Q2_K"}
    assert runner.invoke(app, ["alias", "--rm", "coder"]).stderr == "removed coder (it was acme/other-GGUF)\n"
    missing = runner.invoke(app, ["alias", "--rm", "coder"])
    assert missing.exit_code == 3 and one_error(missing) == "error: no alias named 'coder'"


@pytest.mark.parametrize(
    "args",
    [["a/b", "acme/x"], ["x.gguf", "acme/x"], ["a:b:c", "acme/x"], ["ok", "not a ref"], ["ok"], ["--rm", "x", "y"]],
)
def test_a_bad_alias_is_a_usage_error(args):
    result = runner.invoke(app, ["alias", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.strip().splitlines()[0].startswith(("error: ", "Usage:"))
    assert not (Path(os.environ["LOCALRUN_HOME"]) / "aliases.json").exists()


def test_an_alias_works_in_pull_show_run_list_and_rm(hub, tiny):
    hub.add_repo("acme/tiny-GGUF", {f"tiny-llama-{q}.gguf": tiny.quants[q] for q in ("Q8_0", "Q2_K")})
    assert runner.invoke(app, ["alias", "coder", "acme/tiny-GGUF:Q2_K"]).exit_code == 0
    pulled = runner.invoke(app, ["pull", "coder"])
    assert pulled.exit_code == 0, pulled.output
    assert "tiny-llama-Q2_K.gguf" in pulled.stdout
    shown = runner.invoke(app, ["show", "coder", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["quant"] == "Q2_K"
    ran = localrun("run", "coder", "hi", "-n", "2")
    assert ran.returncode == 0, ran.stderr
    listed = runner.invoke(app, ["list"]).stdout.splitlines()
    assert listed[0].split()[-1] == "ALIASES" and listed[1].startswith("acme/tiny-GGUF:Q2_K")
    assert listed[1].split()[-1] == "coder"
    models = json.loads(runner.invoke(app, ["list", "--json"]).stdout)["models"]
    assert [m["aliases"] for m in models] == [["coder"]]
    removed = runner.invoke(app, ["rm", "coder", "--yes"])
    assert removed.exit_code == 0, removed.output
    assert runner.invoke(app, ["list", "--json"]).stdout.count("tiny-llama-Q2_K") == 0


def test_serve_answers_to_an_alias(hub, tiny):
    runner.invoke(app, ["alias", "qwen3:8b", str(tiny.quants["Q2_K"])])
    with ServerProcess(["qwen3:8b"]) as server:
        client = server.client()
        reply = client.chat.completions.create(
            model="qwen3:8b", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.choices[0].message is not None
    hub.add_repo("acme/tiny-GGUF", {"tiny-llama-Q2_K.gguf": tiny.quants["Q2_K"]})
    assert runner.invoke(app, ["pull", "acme/tiny-GGUF"]).exit_code == 0
    runner.invoke(app, ["alias", "coder", "acme/tiny-GGUF"])
    with ServerProcess([]) as server:  # every pulled model: the alias reaches it too
        reply = server.client().completions.create(model="coder", prompt="hi", max_tokens=2)
        assert reply.choices[0].text is not None
    with ServerProcess(["acme/tiny-GGUF:Q2_K"]) as server:  # and a model served by its name
        reply = server.client().completions.create(model="coder", prompt="hi", max_tokens=2)
        assert reply.choices[0].text is not None


def test_an_aliases_file_that_does_not_read_is_never_overwritten():
    assert runner.invoke(app, ["alias", "coder", "acme/tiny-GGUF:Q2_K"]).exit_code == 0
    path = Path(os.environ["LOCALRUN_HOME"]) / "aliases.json"
    broken = path.read_text().replace("}", ",}")  # a hand edit with a trailing comma
    path.write_text(broken)
    for args in (["alias", "new", "acme/other-GGUF"], ["alias", "--rm", "coder"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "cannot be read as aliases" in result.stderr, result.output
    assert path.read_text() == broken


# -- did you mean --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command", [["pull", "acme/tiny-GUFF"], ["pull", "acmee/tiny-GGUF", "--dry-run"], ["run", "acme/tiny-gguff", "hi"]]
)
def test_a_misspelt_repo_suggests_the_closest_names(hub_repos, command):
    result = runner.invoke(app, command)
    assert result.exit_code == 3, result.output
    error, hint = result.stderr.strip().splitlines()[-2:]
    assert error == f"error: repository {command[1]} not found (or private)"
    assert hint.startswith("hint: did you mean acme/tiny-GGUF")
    assert "Traceback" not in result.stderr


def test_a_missing_repo_with_nothing_close_keeps_the_plain_hint(hub_repos):
    result = runner.invoke(app, ["pull", "zed/qqqqqq-xyz"])
    assert result.exit_code == 3
    assert one_error(result) == "error: repository zed/qqqqqq-xyz not found (or private)"
    assert result.stderr.strip().endswith("hint: check the name; for a private repo set HF_TOKEN")
