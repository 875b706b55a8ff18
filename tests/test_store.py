"""`localrun list`, `show` and `rm` on an HF cache populated over HTTP from the Hub emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir
from typer.testing import CliRunner

from localrun.cli import app
from localrun.hub import settings as lhub
from localrun.store import usage

runner = CliRunner()
REPO = "org/tiny-GGUF"


def fetch(repo_id: str, filename: str, revision: str = "main") -> Path:
    """Download one file the way any other tool would (`hf download`): straight through huggingface_hub."""
    return Path(
        hf_hub_download(repo_id, filename, revision=revision, endpoint=lhub.endpoint(), cache_dir=lhub.cache_dir())
    )


def blobs() -> list[Path]:
    return sorted(p for p in lhub.cache_dir().glob("models--*/blobs/*") if not p.name.endswith(".incomplete"))


def listing() -> list[dict]:
    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["models"]


@pytest.fixture
def pulled(hub, tiny):
    """REPO with two quants, a split model and a projector; Q8_0, the split and the projector fetched."""
    hub.add_repo(
        REPO,
        {
            "tiny-Q8_0.gguf": tiny.quants["Q8_0"],
            "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"],
            "mmproj-tiny-F16.gguf": tiny.mmproj,
            **{f"split/{p.name}": p for p in tiny.split},
        },
    )
    for name in (
        "tiny-Q8_0.gguf",
        "tiny-Q4_K_M.gguf",
        "mmproj-tiny-F16.gguf",
        *(f"split/{p.name}" for p in tiny.split),
    ):
        fetch(REPO, name)
    return hub


def test_list_shows_files_fetched_by_other_tools_grouped_by_quant(pulled, tiny):
    models = listing()
    by_label = {m["model"]: m for m in models}
    assert set(by_label) == {f"{REPO}:Q8_0", f"{REPO}:Q4_K_M", f"{REPO}:F32", f"{REPO}:mmproj-tiny-F16.gguf"}
    assert by_label[f"{REPO}:Q8_0"]["size"] == tiny.quants["Q8_0"].stat().st_size
    split = by_label[f"{REPO}:F32"]
    assert split["n_shards"] == len(tiny.split) > 1
    assert split["size"] == sum(p.stat().st_size for p in tiny.split)
    assert split["files"][0]["name"].startswith("split/") and "00001-of-" in split["files"][0]["name"]
    assert by_label[f"{REPO}:mmproj-tiny-F16.gguf"]["kind"] == "mmproj"
    assert all(m["revision"] == "main" and m["last_used"] is None and m["pulled"] for m in models)
    # Best quant first within a repo, the projector last.
    assert [m["quant"] for m in models][:2] == ["F32", "Q8_0"] and models[-1]["kind"] == "mmproj"

    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "SIZE", "FILES", "PULLED", "LAST", "USED"]
    assert any(f"{REPO}:F32" in line and f"{len(tiny.split)} shards" in line for line in lines)
    assert lines[-1].startswith(f"{REPO}:mmproj-tiny-F16.gguf ")
    assert "\x1b[" not in result.stdout


def test_list_on_an_empty_cache_says_how_to_pull():
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert result.stdout == ""
    assert "no models pulled yet" in result.stderr and "localrun pull" in result.stderr
    result = runner.invoke(app, ["list", "--json"])
    assert json.loads(result.stdout)["models"] == []


def test_touch_records_last_use(pulled):
    q8 = fetch(REPO, "tiny-Q8_0.gguf")  # the snapshot path, as the resolver hands it to the engine
    usage.touch(q8, when=1_700_000_000.0)
    by_label = {m["model"]: m for m in listing()}
    assert by_label[f"{REPO}:Q8_0"]["last_used"] == "2023-11-14T22:13:20+00:00"
    assert by_label[f"{REPO}:Q4_K_M"]["last_used"] is None
    assert "never" in runner.invoke(app, ["list"]).stdout


def test_rm_one_quant_keeps_the_others(pulled, tiny):
    q8_size = tiny.quants["Q8_0"].stat().st_size
    before = blobs()
    result = runner.invoke(app, ["rm", f"{REPO}:q8_0", "--yes"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"removed {REPO}:Q8_0"
    assert f"{REPO}:Q8_0: 1 file" in result.stderr and "freed" in result.stderr
    assert len(blobs()) == len(before) - 1
    labels = {m["model"] for m in listing()}
    assert labels == {f"{REPO}:Q4_K_M", f"{REPO}:F32", f"{REPO}:mmproj-tiny-F16.gguf"}
    assert not scan_cache_dir(lhub.cache_dir()).warnings
    # The other quants still load from the cache offline.
    assert Path(hf_hub_download(REPO, "tiny-Q4_K_M.gguf", cache_dir=lhub.cache_dir(), local_files_only=True)).exists()
    assert q8_size > 0


def test_rm_json_reports_freed_space_and_the_last_model_takes_its_projector(pulled, tiny):
    result = runner.invoke(app, ["rm", REPO, "--yes", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    expected = sum(p.stat().st_size for p in (tiny.quants["Q8_0"], tiny.quants["Q4_K_M"], tiny.mmproj, *tiny.split))
    assert report["freed"] == expected
    assert len(report["removed"]) == 4
    assert listing() == []
    assert not any(lhub.cache_dir().glob("models--org--tiny-GGUF"))  # refs, snapshots, blobs: all gone


def test_rm_split_removes_every_shard(pulled, tiny):
    result = runner.invoke(app, ["rm", f"{REPO}:split/{tiny.split[0].name}", "-y"])
    assert result.exit_code == 0, result.stderr
    assert f"{len(tiny.split)} files" in result.stderr
    assert not list(lhub.cache_dir().glob("models--org--tiny-GGUF/snapshots/*/split"))
    assert f"{REPO}:F32" not in {m["model"] for m in listing()}


def test_split_with_missing_shards_is_listed_and_removable(hub, tiny):
    hub.add_repo(REPO, {f"split/{p.name}": p for p in tiny.split})
    fetch(REPO, f"split/{tiny.split[0].name}")  # an interrupted multi-file download by another tool
    [entry] = listing()
    assert (entry["kind"], entry["model"]) == ("incomplete", f"{REPO}:split/{tiny.split[0].name}")
    assert "split, shards missing" in runner.invoke(app, ["list"]).stdout
    result = runner.invoke(app, ["rm", REPO, "--yes"])
    assert result.exit_code == 0, result.stderr
    assert listing() == [] and blobs() == []


def test_blob_shared_by_two_revisions_survives_removing_one(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]}, revision="main")
    dev_commit = hub.add_repo(REPO, {"tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]}, revision="dev")
    main_path, dev_path = fetch(REPO, "tiny-Q4_K_M.gguf"), fetch(REPO, "tiny-Q4_K_M.gguf", "dev")
    assert main_path != dev_path and main_path.resolve() == dev_path.resolve() and len(blobs()) == 1
    assert sorted(m["revision"] for m in listing()) == ["dev", "main"]
    assert "REVISION" in runner.invoke(app, ["list"]).stdout

    result = runner.invoke(app, ["rm", f"{REPO}:Q4_K_M", "--revision", "dev", "--yes", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["freed"] == 0
    assert "freed 0 B (keeping 1 file that another revision also uses)" in result.stderr
    assert len(blobs()) == 1 and main_path.read_bytes() == tiny.quants["Q4_K_M"].read_bytes()
    assert not dev_path.exists()
    assert [(m["revision"], m["commit"] != dev_commit) for m in listing()] == [("main", True)]
    cache = scan_cache_dir(lhub.cache_dir())
    assert not cache.warnings  # refs/dev went with its snapshot

    result = runner.invoke(app, ["rm", f"{REPO}:Q4_K_M", "--yes", "--json"])
    assert json.loads(result.stdout)["freed"] == tiny.quants["Q4_K_M"].stat().st_size
    assert blobs() == []


def test_rm_unknown_model_is_a_clear_error(pulled):
    result = runner.invoke(app, ["rm", "org/nothing-here", "--yes"])
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == "error: org/nothing-here is not pulled"
    result = runner.invoke(app, ["rm", f"{REPO}:Q2_K", "--yes"])
    assert result.exit_code == 3
    assert f"pulled from that repo: {REPO}:F32, {REPO}:Q4_K_M" in result.stderr
    result = runner.invoke(app, ["rm", "not a ref"])
    assert result.exit_code == 2 and "not a model reference" in result.stderr


def test_piped_rm_without_yes_refuses_and_deletes_nothing(pulled):
    before = blobs()
    exe = Path(sys.executable).with_name("localrun")
    proc = subprocess.run(
        [str(exe), "rm", f"{REPO}:Q8_0"], capture_output=True, text=True, input="y\n", env=os.environ.copy()
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"{REPO}:Q8_0: 1 file" in proc.stderr  # what would go, even when refusing
    assert "error: refusing to ask for confirmation: not on a terminal" in proc.stderr
    assert "--yes" in proc.stderr
    assert blobs() == before


# -- show ----------------------------------------------------------------------------------------
def show_json(*args: str) -> dict:
    result = runner.invoke(app, ["show", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_show_pulled_model_reads_the_cache_only(pulled, tiny):
    requests = len(pulled.log)
    d = show_json(f"{REPO}:Q8_0")
    assert len(pulled.log) == requests  # no network for a pulled model
    assert (d["source"], d["model"], d["quant"]) == ("pulled", f"{REPO}:Q8_0", "Q8_0")
    assert (d["architecture"], d["n_layer"], d["n_ctx_train"], d["n_params"]) == ("llama", 2, 2048, 1627392)
    assert d["chat_template"] and "<|im_start|>" in d["chat_template"]
    assert d["size"] == tiny.quants["Q8_0"].stat().st_size
    assert Path(d["files"][0]["path"]).resolve().read_bytes()[:4] == b"GGUF"
    assert d["plan"]["fits"] is True and d["plan"]["placement"] == "cpu" and d["plan"]["n_ctx"] <= 2048
    assert d["plan"]["ram"] > d["size"]
    assert {o["model"] for o in d["other_quants"]} == {f"{REPO}:Q4_K_M", f"{REPO}:F32"}

    result = runner.invoke(app, ["show", f"{REPO}:Q8_0"])
    assert result.exit_code == 0 and result.stderr == ""
    text = result.stdout
    assert text.splitlines()[0] == f"{REPO}:Q8_0  (pulled)"
    for label, value in (
        ("Architecture", "llama (tiny-llama)"),
        ("Parameters", "1.6M"),
        ("Quantization", "Q8_0"),
        ("Trained context", "2048 tokens"),
        ("Layers", "2"),
        ("Chat template", "yes"),
        ("Memory plan", "fits: CPU"),
        ("Last used", "never"),
        ("Also pulled", "F32"),
    ):
        assert any(line.startswith(label) and value in line for line in text.splitlines()), (label, text)
    assert "Licence" not in text  # the tiny models carry none


def test_show_without_tag_picks_what_chat_would_load_and_split_counts_shards(pulled, tiny):
    d = show_json(REPO)
    assert d["quant"] == "F32" and len(d["files"]) == len(tiny.split)  # best quality pulled first
    assert d["header"]["n_shards"] == len(tiny.split)
    assert f"{len(tiny.split)} shards" in runner.invoke(app, ["show", REPO]).stdout


def test_show_local_file_without_template(tiny):
    d = show_json(str(tiny.no_template))
    assert (d["source"], d["quant"], d["chat_template"]) == ("local", "Q8_0", None)
    text = runner.invoke(app, ["show", str(tiny.no_template)]).stdout
    assert any(
        line.startswith("Chat template") and "none: chat falls back to a built-in format" in line
        for line in text.splitlines()
    )
    result = runner.invoke(app, ["show", str(tiny.folder / "missing.gguf")])
    assert result.exit_code == 3 and "no such model file" in result.stderr


def test_show_remote_repo_reads_headers_only(hub, tiny):
    hub.add_repo(
        REPO,
        {
            "tiny-Q8_0.gguf": tiny.quants["Q8_0"],
            "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"],
            **{f"split/{p.name}": p for p in tiny.split},
        },
    )
    d = show_json(f"{REPO}:Q4_K_M")
    assert (d["source"], d["quant"], d["n_layer"]) == ("remote", "Q4_K_M", 2)
    assert d["files"] == [{"name": "tiny-Q4_K_M.gguf", "size": tiny.quants["Q4_K_M"].stat().st_size, "path": None}]
    assert d["plan"]["fits"] is True
    d = show_json(REPO)  # no tag: the best quant that fits, with the others listed
    assert d["quant"] == "F32" and len(d["files"]) == len(tiny.split)
    assert {o["model"] for o in d["other_quants"]} == {f"{REPO}:Q8_0", f"{REPO}:Q4_K_M"}

    fetches = [r for r in hub.log if "/resolve/" in r.path]
    assert fetches and all(r.method == "GET" and r.range and r.status == 206 for r in fetches)
    assert blobs() == [] and not list(lhub.cache_dir().glob("**/*.incomplete"))
    assert runner.invoke(app, ["list", "--json"]).stdout.count('"model"') == 0
    text = runner.invoke(app, ["show", f"{REPO}:Q8_0"]).stdout
    assert "(on the Hub, not pulled: header read only)" in text.splitlines()[0]


def test_show_unknown_repo_and_quant_are_clear_errors(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"]})
    result = runner.invoke(app, ["show", "org/none"])
    assert result.exit_code == 3 and result.stdout == "" and "not found" in result.stderr
    result = runner.invoke(app, ["show", f"{REPO}:Q2_K"])
    assert result.exit_code == 3 and "available: Q8_0" in result.stderr


def _rm_on_a_terminal(ref: str, answer: bytes) -> tuple[int, str]:
    """Run `localrun rm` in a pseudo-terminal, answer its prompt, return the exit code and the screen."""
    import pty
    import select

    master, slave = pty.openpty()
    exe = Path(sys.executable).with_name("localrun")
    proc = subprocess.Popen([str(exe), "rm", ref], stdin=slave, stdout=slave, stderr=slave, env=os.environ.copy())
    os.close(slave)
    screen, answered = b"", False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, f"no output from rm: {screen!r}"
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
            if not answered and b"[y/N]" in screen:
                os.write(master, answer)
                answered = True
    finally:
        os.close(master)
    return proc.wait(timeout=30), screen.decode().replace("\r\n", "\n")


def test_rm_on_a_terminal_asks_and_respects_the_answer(pulled, tiny):
    from localrun.text import human_bytes

    before = blobs()
    code, screen = _rm_on_a_terminal(f"{REPO}:Q8_0", b"n\n")
    size = human_bytes(tiny.quants["Q8_0"].stat().st_size)
    assert code == 1 and f"Remove it and free {size}? [y/N]" in screen and "nothing removed" in screen
    assert blobs() == before
    code, screen = _rm_on_a_terminal(f"{REPO}:Q8_0", b"y\n")
    assert code == 0 and f"removed {REPO}:Q8_0" in screen
    assert len(blobs()) == len(before) - 1


def test_round_trip_through_localrun_pull(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]})
    result = runner.invoke(app, ["pull", f"{REPO}:Q4_K_M"])
    assert result.exit_code == 0, result.stderr
    [entry] = listing()
    assert (entry["model"], entry["size"]) == (f"{REPO}:Q4_K_M", tiny.quants["Q4_K_M"].stat().st_size)
    requests = len(hub.log)
    d = show_json(REPO)  # the pulled quant, read from the cache: no network
    assert (d["source"], d["quant"], len(hub.log)) == ("pulled", "Q4_K_M", requests)
    result = runner.invoke(app, ["rm", REPO, "--yes"])
    assert result.exit_code == 0, result.stderr
    assert listing() == [] and blobs() == []
    assert show_json(REPO)["source"] == "remote"  # gone from the cache, still on the Hub


def test_a_blob_deleted_by_hand_is_reported_and_rm_repairs_the_repo(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"], "tiny-Q4_K_M.gguf": tiny.quants["Q4_K_M"]})
    fetch(REPO, "tiny-Q8_0.gguf").resolve().unlink()  # a dangling link: huggingface_hub skips the whole repo
    fetch(REPO, "tiny-Q4_K_M.gguf")
    assert scan_cache_dir(lhub.cache_dir()).repos == frozenset()
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    assert f"warning: {REPO}:Q8_0: a file is missing from the cache" in result.stderr
    assert f"localrun rm {REPO}:Q8_0" in result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "damaged: file missing" in rows[f"{REPO}:Q8_0"] and "1 file" in rows[f"{REPO}:Q4_K_M"]
    result = runner.invoke(app, ["show", f"{REPO}:Q8_0"])
    assert result.exit_code == 7 and "a file is missing" in result.stderr

    result = runner.invoke(app, ["rm", f"{REPO}:Q8_0", "--yes"])
    assert result.exit_code == 0, result.stderr
    cache = scan_cache_dir(lhub.cache_dir())
    assert not cache.warnings and [r.repo_id for r in cache.repos] == [REPO]
    assert [m["model"] for m in listing()] == [f"{REPO}:Q4_K_M"]


def test_a_ref_to_a_missing_snapshot_does_not_hide_the_repo(hub, tiny):
    hub.add_repo(REPO, {"tiny-Q8_0.gguf": tiny.quants["Q8_0"]})
    fetch(REPO, "tiny-Q8_0.gguf")
    # What an interrupted first download of another revision leaves: a ref, no snapshot.
    (lhub.cache_dir() / "models--org--tiny-GGUF" / "refs" / "dev").write_text("0" * 40)
    assert scan_cache_dir(lhub.cache_dir()).warnings  # huggingface_hub gives up on the repo...
    result = runner.invoke(app, ["list"])
    assert result.stderr == "" and f"{REPO}:Q8_0" in result.stdout  # ...localrun does not
    assert runner.invoke(app, ["rm", REPO, "--yes"]).exit_code == 0
    assert listing() == [] and not (lhub.cache_dir() / "models--org--tiny-GGUF").exists()


def test_show_flags_a_file_llama_cpp_would_abort_on(tiny):
    result = runner.invoke(app, ["show", str(tiny.corrupt_vocab)])
    assert result.exit_code == 0, result.output
    assert "Architecture" in result.stdout
    assert result.stderr.startswith("warning: this file will not load: tiny-dupvocab-F16.gguf has a corrupt vocabulary")
    data = json.loads(runner.invoke(app, ["show", str(tiny.corrupt_vocab), "--json"]).stdout)
    assert "appears twice" in data["problem"]
    assert json.loads(runner.invoke(app, ["show", str(tiny.quants["Q2_K"]), "--json"]).stdout)["problem"] is None
