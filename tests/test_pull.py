"""`localrun pull` and the model resolver, against the Hub emulator through the real huggingface_hub."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localrun.cli import app
from localrun.commands.loading import resolve_or_pull
from localrun.commands.progress import RichDownloadProgress
from localrun.commands.pull import pull
from localrun.errors import BadModel, NetworkError, NoSpace, NotFound
from localrun.fit import GPU_RESERVE, ram_headroom
from localrun.hardware import GPU, Machine
from localrun.hub import download as hub_download
from localrun.hub.listing import list_quants
from localrun.hub.settings import cache_dir
from localrun.model.files import ModelFiles
from localrun.model.refs import ModelRef, parse_ref
from localrun.output import Output
from localrun.store.resolve import resolve
from localrun.text import human_bytes
from support.hub import refusing_endpoint, unanswering_endpoint

runner = CliRunner()
REPO = "acme/tiny-GGUF"
GiB = 2**30
MiB = 2**20
CHUNK = 10 * MiB  # huggingface_hub writes downloads in 10 MiB chunks: a partial file keeps whole ones


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def blobs() -> list[Path]:
    return [p for p in cache_dir().rglob("blobs/*") if p.is_file() and p.suffix != ".incomplete"]


def incomplete() -> list[Path]:
    return list(cache_dir().rglob("*.incomplete"))


def localrun(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a child process: huggingface_hub imported afresh there, its log on the real stderr."""
    return subprocess.run(
        [sys.executable, "-m", "localrun", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def quiet() -> Output:
    return Output()


def download(listing, quant, out: Output | None = None, **kwargs) -> list[Path]:
    return hub_download.download(listing, quant, RichDownloadProgress(out or quiet()), **kwargs)


def pulled(ref: ModelRef) -> ModelFiles | None:
    """What the resolver finds in the cache for `ref`, offline; None when it is not pulled."""
    found = resolve(ref, Machine(64 * GiB, 60 * GiB))
    return found.model if found else None


def loaded(ref: ModelRef) -> ModelFiles:
    """What a command that loads `ref` gets: found in the cache, or pulled first."""
    return resolve_or_pull(ref, quiet()).model


@pytest.fixture
def repo(hub, tiny):
    """Quants at the top and in a subfolder, a split in a subfolder, and files that are not models."""
    files = {f"tiny-llama-{q}.gguf": tiny.quants[q] for q in ("F16", "Q6_K", "Q4_K_M", "Q2_K")}
    files.update({f"more/tiny-llama-{q}.gguf": tiny.quants[q] for q in ("Q8_0", "Q5_K_M")})
    files.update({f"split/{p.name}": p for p in tiny.split})
    files["mmproj-tiny-F16.gguf"] = tiny.mmproj
    files["tiny-llama.imatrix.gguf"] = tiny.quants["Q2_K"]
    files["draft/tiny-draft-Q8_0.gguf"] = tiny.quants["Q8_0"]
    hub.add_repo(REPO, files)
    return hub


# -- listing -------------------------------------------------------------------------------------
def test_listing_groups_quants_splits_and_subfolders_and_notes_mmproj(repo, tiny):
    listing = list_quants(parse_ref(REPO))
    assert [c.label for c in listing.quants] == ["F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q2_K"]
    split = listing.quants[0]
    assert split.files == [f"split/{p.name}" for p in tiny.split] and len(split.files) == 3
    assert split.size == sum(p.stat().st_size for p in tiny.split)
    assert listing.quants[2].files == ["more/tiny-llama-Q8_0.gguf"]
    assert listing.quants[2].sha256["more/tiny-llama-Q8_0.gguf"] == sha256(tiny.quants["Q8_0"])
    assert listing.mmproj == ["mmproj-tiny-F16.gguf"]
    assert len(listing.commit) == 40
    assert listing.quants[listing.select(tag="q4_k_m")].label == "Q4_K_M"
    assert listing.select(filename="more/tiny-llama-Q5_K_M.gguf") == 4


# -- the choice ------------------------------------------------------------------------------------
def test_automatic_choice_follows_the_described_memory(repo, capsys):
    def plan_for(ram_available: int, gpus: list[GPU] | None = None):
        return pull(
            parse_ref(REPO), quiet(), dry_run=True, n_ctx=512, machine=Machine(4 * GiB, ram_available, gpus or [])
        )

    headroom = ram_headroom(Machine(4 * GiB, 4 * GiB, []))
    roomy = plan_for(64 * GiB)
    assert roomy.chosen == 0 and roomy.rows[0].plan.placement == "cpu"
    assert roomy.why == "F32: the best quality here, and it fits in RAM with 512 ctx"
    for k, row in enumerate(roomy.rows):
        # Room for exactly this quant's estimate: it is chosen, and every better (bigger) one won't fit.
        result = plan_for(headroom + row.plan.estimate.ram)
        assert result.chosen == k, (row.quant.label, result.why)
        assert [r.fits for r in result.rows] == [i >= k for i in range(len(result.rows))]
        if k:
            assert result.why.startswith(f"{row.quant.label}: the best quality that fits in RAM")
    starved = plan_for(headroom + MiB)
    assert starved.chosen is None and starved.why.startswith("nothing fits")
    with pytest.raises(NoSpace):
        pull(parse_ref(REPO), quiet(), n_ctx=512, machine=Machine(4 * GiB, headroom + MiB, []))
    capsys.readouterr()
    forced = pull(
        parse_ref(f"{REPO}:F32"), quiet(), dry_run=True, n_ctx=512, machine=Machine(4 * GiB, headroom + MiB, [])
    )
    assert forced.chosen == 0 and forced.forced and "won't fit" in forced.why
    assert "warning: F32 will not fit in memory (needs about" in capsys.readouterr().err

    big_gpu = plan_for(12 * GiB, [GPU("Test GPU", 24 * GiB, 24 * GiB)])
    assert big_gpu.chosen == 0 and big_gpu.rows[0].plan.placement == "gpu"
    assert big_gpu.why == "F32: the best quality here, and it runs fully on the GPU with 512 ctx"
    # A GPU without room for half of F32's weights: F32 would run split, so a smaller quant that fits
    # whole on the GPU wins.
    half = GPU_RESERVE + big_gpu.rows[0].plan.estimate.vram - big_gpu.rows[0].quant.size // 2
    small_gpu = plan_for(12 * GiB, [GPU("Test GPU", half, half)])
    assert small_gpu.rows[0].plan.placement == "partial"
    assert small_gpu.rows[0].placement().startswith("GPU ") and small_gpu.rows[0].placement().endswith("+ CPU")
    assert small_gpu.chosen > 0 and small_gpu.rows[small_gpu.chosen].plan.placement == "gpu"
    assert not blobs()


def test_dry_run_shows_the_table_and_downloads_nothing(repo):
    result = runner.invoke(app, ["pull", REPO, "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(REPO) and lines[0].endswith("· KV cache f16")  # what the figures assume
    for word in ("quant", "size", "est. RAM", "est. VRAM", "placement", "verdict"):
        assert word in lines[1]
    chosen = [line for line in lines if line.startswith("▶")]
    assert len(chosen) == 1
    assert lines[-1].startswith(chosen[0].split()[1] + ": ") and "ctx" in lines[-1]
    assert result.stderr == ""
    assert not blobs() and not incomplete()
    gets = repo.downloads()
    assert gets and all(g.range for g in gets)  # header reads only: every GET asked for a range


def test_json_gives_the_same_data(repo):
    result = runner.invoke(app, ["pull", REPO, "--dry-run", "--json", "--ctx", "512"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["repo_id"] == REPO and data["dry_run"] is True and data["files"] == []
    assert [c["quant"] for c in data["candidates"]][:3] == ["F32", "F16", "Q8_0"]
    chosen = [c for c in data["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["quant"] == data["chosen"] and chosen[0]["fits"]
    assert all(c["ram"] > 0 and c["n_ctx"] <= 512 for c in data["candidates"])
    assert data["mmproj"] == ["mmproj-tiny-F16.gguf"] and data["why"].startswith(data["chosen"])


# -- downloads -------------------------------------------------------------------------------------
def test_tag_picks_that_quant_and_a_second_pull_downloads_nothing(repo, tiny):
    result = runner.invoke(app, ["pull", f"{REPO}:q6_k"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "downloading Q6_K: 1 file, 1.3 MiB\n"  # piped: no progress bar
    assert "Q6_K: as asked" in result.stdout
    saved = Path(result.stdout.strip().splitlines()[-1].removeprefix("saved "))
    assert saved.name == "tiny-llama-Q6_K.gguf" and sha256(saved) == sha256(tiny.quants["Q6_K"])
    assert (cache_dir() / "models--acme--tiny-GGUF" / "refs" / "main").read_text() == saved.parent.name
    assert len(repo.downloads("tiny-llama-Q6_K.gguf")) >= 2  # header range + the file
    before = len(repo.downloads("tiny-llama-Q6_K.gguf"))
    again = runner.invoke(app, ["pull", REPO, "--quant", "Q6_K"])
    assert again.exit_code == 0 and again.stderr == ""
    assert all(g.range for g in repo.downloads("tiny-llama-Q6_K.gguf")[before:])  # header reads only


def test_split_model_pulls_every_shard_into_one_snapshot_folder(repo, tiny):
    result = pull(parse_ref(f"{REPO}:F32"), quiet())
    assert [p.name for p in result.files] == [p.name for p in tiny.split]
    assert len({p.parent for p in result.files}) == 1
    assert [sha256(p) for p in result.files] == [sha256(p) for p in tiny.split]
    model = pulled(parse_ref(f"{REPO}:F32"))
    assert model.path == result.files[0] and list(model.files) == result.files and model.quant == "F32"


def test_file_in_a_subfolder_is_found_by_name_and_resolved_offline(repo, tiny, monkeypatch):
    ref = parse_ref(f"{REPO}:more/tiny-llama-Q5_K_M.gguf")
    result = pull(ref, quiet())
    assert result.files[0].as_posix().endswith("more/tiny-llama-Q5_K_M.gguf")
    assert sha256(result.files[0]) == sha256(tiny.quants["Q5_K_M"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = len(repo.log)
    assert loaded(ref).path == result.files[0]
    assert loaded(parse_ref(REPO)).quant == "Q5_K_M"  # the only quant present
    offline = runner.invoke(app, ["pull", REPO])
    assert offline.exit_code == 0 and "already in the cache" in offline.stdout
    assert len(repo.log) == requests  # nothing asked of the network
    assert pulled(parse_ref(f"{REPO}:Q2_K")) is None


def test_resolve_model_pulls_a_repo_ref_once_then_finds_it(repo, tiny, capsys):
    model = loaded(parse_ref(f"{REPO}:Q2_K"))
    assert model.quant == "Q2_K" and sha256(model.path) == sha256(tiny.quants["Q2_K"])
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout belongs to the command that needed the model
    assert "Q2_K: as asked" in captured.err and f"saved {model.path}" in captured.err
    gets = len(repo.downloads())
    assert loaded(parse_ref(f"{REPO}:Q2_K")).path == model.path
    assert len(repo.downloads()) == gets


def test_local_paths_are_validated(tiny, tmp_path):
    model = loaded(parse_ref(str(tiny.quants["Q4_K_M"])))
    assert model.path == tiny.quants["Q4_K_M"] and model.quant == "Q4_K_M" and model.repo_id is None
    shard2 = loaded(parse_ref(str(tiny.split[1])))
    assert shard2.path == tiny.split[0] and list(shard2.files) == tiny.split
    with pytest.raises(NotFound):
        loaded(parse_ref(str(tmp_path / "missing.gguf")))
    with pytest.raises(BadModel):
        loaded(parse_ref(str(tiny.corrupt_vocab)))


def test_reset_mid_body_retries_then_resumes_on_the_next_pull(hub, big_model, monkeypatch, capsys):
    monkeypatch.setattr(hub_download, "RETRY_DELAY", 0.0)
    hub.add_repo("acme/big-GGUF", {"tiny-big-F32.gguf": big_model})
    size = big_model.stat().st_size
    assert size > 4 * CHUNK
    # Every body is cut 15 MiB in: each attempt keeps one more whole 10 MiB chunk, three attempts.
    fault = hub.inject("reset", "tiny-big-F32.gguf", times=-1, after_bytes=15 * MiB)
    with pytest.raises(NetworkError) as failed:
        pull(parse_ref("acme/big-GGUF"), quiet(), machine=Machine(64 * GiB, 60 * GiB, []))
    assert "run the same command again" in failed.value.hint
    assert capsys.readouterr().err.count("resuming (attempt") == 2
    body_gets = [g for g in hub.downloads("tiny-big-F32.gguf") if g.range is None or g.range.endswith("-")]
    assert [g.range for g in body_gets] == [None, f"bytes={CHUNK}-", f"bytes={2 * CHUNK}-"]
    (partial,) = incomplete()
    assert partial.stat().st_size == 3 * CHUNK and not blobs()
    fault.times = 0
    result = pull(parse_ref("acme/big-GGUF"), quiet(), machine=Machine(64 * GiB, 60 * GiB, []))
    last = [g for g in hub.downloads("tiny-big-F32.gguf") if g.range is None or g.range.endswith("-")][-1]
    assert last.range == f"bytes={3 * CHUNK}-" and last.status == 206
    assert sha256(result.files[0]) == sha256(big_model) and not incomplete()


def test_one_reset_is_retried_within_the_pull(hub, big_model, monkeypatch, capsys):
    monkeypatch.setattr(hub_download, "RETRY_DELAY", 0.0)
    hub.add_repo("acme/big-GGUF", {"tiny-big-F32.gguf": big_model})
    listing = list_quants(parse_ref("acme/big-GGUF"))
    hub.inject("reset", "tiny-big-F32.gguf", times=1, after_bytes=15 * MiB)
    (saved,) = download(listing, listing.quants[0])
    assert "connection lost (ReadError); resuming (attempt 2 of 3)" in capsys.readouterr().err
    assert [g.range for g in hub.downloads()] == [None, f"bytes={CHUNK}-"]
    assert sha256(saved) == sha256(big_model)


def test_ctrl_c_keeps_the_partial_file_and_the_next_pull_resumes(hub, big_model):
    hub.add_repo("acme/big-GGUF", {"tiny-big-F32.gguf": big_model})
    slow = hub.inject("slow", "tiny-big-F32.gguf", times=-1, delay=0.01)
    exe = Path(sys.executable).with_name("localrun")
    child = subprocess.Popen(
        [str(exe), "pull", "acme/big-GGUF"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.stat().st_size >= CHUNK for p in incomplete()):
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=30)
    assert child.returncode == 130, stderr
    assert stderr.strip().splitlines()[-2:] == [
        "error: interrupted: the download of F32 stopped",
        "hint: run the same command again: it resumes where it stopped",
    ]
    assert "Traceback" not in stderr
    (partial,) = incomplete()
    kept = partial.stat().st_size
    assert kept >= CHUNK and kept % CHUNK == 0
    slow.times = 0
    result = pull(parse_ref("acme/big-GGUF"), quiet(), machine=Machine(64 * GiB, 60 * GiB, []))
    last = [g for g in hub.downloads("tiny-big-F32.gguf") if g.range is None or g.range.endswith("-")][-1]
    assert last.range == f"bytes={kept}-"
    assert sha256(result.files[0]) == sha256(big_model)


def test_progress_bar_on_a_terminal_counts_every_shard(repo, tiny, capsys):
    out = Output(stderr_tty=True)
    listing = list_quants(parse_ref(REPO))
    cand = listing.quants[listing.select(tag="F32")]
    download(listing, cand, out)
    err = capsys.readouterr().err
    total = sum(p.stat().st_size for p in tiny.split) / MiB
    assert f"{total:.1f}/{total:.1f} MiB" in err and "MiB/s" in err  # all three shards counted
    assert "downloading F32: 3 files" in err


# -- faults and bad input: one line, the documented exit code, nothing corrupt left -------------
def error_lines(stderr: str) -> list[str]:
    """The error and its hint: the last lines on stderr, after at most a 'downloading' line."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert all(line.startswith("downloading ") for line in lines[:start]), stderr
    assert len(lines) - start <= 2 and (len(lines) - start == 1 or lines[-1].startswith("hint: ")), stderr
    return lines[start:]


@pytest.mark.parametrize(
    "ref, code, words",
    [
        ("acme/no-such-repo", 3, "repository acme/no-such-repo not found"),
        ("acme/docs-only", 3, "has no GGUF"),
        (f"{REPO}:Q3_K_S", 3, "available: F32, F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q2_K"),
        (f"{REPO}:nope/missing.gguf", 3, "no GGUF model file"),
        ("acme/gated-GGUF", 4, "HF_TOKEN"),
        ("acme/not-gguf", 7, "not a GGUF"),
        ("./local-file.gguf", 2, "local file"),
    ],
)
def test_bad_input_is_one_clear_line(repo, tmp_path, ref, code, words, tiny):
    docs = tmp_path / "README.md"
    docs.write_text("# docs\n")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"<html>not a model</html>" * 100)
    repo.add_repo("acme/docs-only", {"README.md": docs, "config.json": docs})
    repo.add_repo("acme/gated-GGUF", {"tiny-llama-Q2_K.gguf": tiny.quants["Q2_K"]}, gated=True)
    repo.add_repo("acme/not-gguf", {"model-Q4_K_M.gguf": fake})
    result = runner.invoke(app, ["pull", ref])
    assert result.exit_code == code, result.output
    assert words in "\n".join(error_lines(result.stderr))
    assert result.stdout == "" or code == 7
    assert not blobs()


def test_gated_repo_works_with_a_token(repo, tiny, monkeypatch):
    repo.add_repo("acme/gated-GGUF", {"tiny-llama-Q2_K.gguf": tiny.quants["Q2_K"]}, gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_testtoken")
    result = runner.invoke(app, ["pull", "acme/gated-GGUF"])
    assert result.exit_code == 0, result.output
    assert sha256(Path(result.stdout.strip().splitlines()[-1].removeprefix("saved "))) == sha256(tiny.quants["Q2_K"])


def test_wrong_token_for_a_gated_repo(repo, tiny, monkeypatch):
    repo.add_repo("acme/gated-GGUF", {"tiny-llama-Q2_K.gguf": tiny.quants["Q2_K"]}, gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_not_accepted")
    result = runner.invoke(app, ["pull", "acme/gated-GGUF"])
    assert result.exit_code == 4, result.output
    assert "gated" in error_lines(result.stderr)[0] and not blobs()


def test_revision_and_hf_home_are_honoured(repo, tiny, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    dev = repo.add_repo(REPO, {"dev/tiny-llama-Q3_K_M.gguf": tiny.quants["Q3_K_M"]}, revision="dev")
    result = runner.invoke(app, ["pull", REPO, "--revision", "dev"])
    assert result.exit_code == 0, result.output
    saved = Path(result.stdout.strip().splitlines()[-1].removeprefix("saved "))
    assert (
        saved
        == tmp_path
        / "elsewhere"
        / "hub"
        / "models--acme--tiny-GGUF"
        / "snapshots"
        / dev
        / "dev"
        / "tiny-llama-Q3_K_M.gguf"
    )
    assert "Q3_K_M: the best quality here" in result.stdout and "F16" not in result.stdout
    assert pulled(parse_ref(REPO, revision=dev[:10])).path == saved


def test_offline_with_nothing_cached(repo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["pull", REPO])
    assert result.exit_code == 5
    assert "HF_HUB_OFFLINE" in error_lines(result.stderr)[0]
    with pytest.raises(NetworkError):
        loaded(parse_ref(REPO))
    assert not repo.log


def test_http_500_is_retried_then_reported(repo, monkeypatch, capsys):
    monkeypatch.setattr(hub_download, "RETRY_DELAY", 0.0)
    listing = list_quants(parse_ref(REPO))
    repo.inject("500", "tiny-llama-Q2_K.gguf", times=1)
    (saved,) = download(listing, listing.quants[listing.select(tag="Q2_K")])
    assert "HTTP 500; trying again (attempt 2 of 3)" in capsys.readouterr().err and saved.is_file()
    repo.inject("500", "tiny-llama-Q4_K_M.gguf", times=-1)
    failed = runner.invoke(app, ["pull", f"{REPO}:Q4_K_M"])
    assert failed.exit_code == 5, failed.output
    assert "HTTP 500" in error_lines(failed.stderr)[0]
    assert not any("Q4_K_M" in str(p) for p in cache_dir().rglob("*.gguf"))


def test_disk_without_room_is_refused_before_downloading(repo):
    listing = list_quants(parse_ref(REPO))
    cand = listing.quants[listing.select(tag="F16")]
    with pytest.raises(NoSpace) as refused:
        download(listing, cand, free_space=lambda path: cand.size - 1)
    assert "to download" in refused.value.message and "free" in refused.value.message
    assert not repo.downloads() and not blobs()
    assert download(listing, cand, free_space=lambda path: cand.size)  # exactly enough is enough


def test_corrupt_download_is_deleted(hub, tiny, tmp_path):
    served = tmp_path / "tiny-Q2_K.gguf"
    served.write_bytes(tiny.quants["Q2_K"].read_bytes())
    hub.add_repo("acme/corrupt-GGUF", {"tiny-Q2_K.gguf": served})
    data = bytearray(served.read_bytes())
    data[-100] ^= 0xFF  # same size, different bytes than the listing's sha256
    served.write_bytes(bytes(data))
    result = runner.invoke(app, ["pull", "acme/corrupt-GGUF"])
    assert result.exit_code == 7
    assert "sha256" in error_lines(result.stderr)[0]
    assert not blobs() and not list(cache_dir().rglob("*.gguf"))
    assert pulled(parse_ref("acme/corrupt-GGUF")) is None


@pytest.mark.parametrize(
    "name", ["../escape-Q4_K_M.gguf", "/etc/abs-Q4_K_M.gguf", "sub\\win-Q4_K_M.gguf", "a/../../up-Q4_K_M.gguf"]
)
def test_hostile_listing_is_rejected(hub, tiny, tmp_path, name):
    hub.add_repo("acme/hostile-GGUF", {name: tiny.quants["Q4_K_M"], "ok-Q2_K.gguf": tiny.quants["Q2_K"]})
    result = runner.invoke(app, ["pull", "acme/hostile-GGUF"])
    assert result.exit_code == 7
    assert "unsafe file name" in error_lines(result.stderr)[0]
    assert not hub.downloads() and not blobs()


# -- the network failing: one line naming the endpoint, exit 5, in bounded time --------------------
@contextmanager
def dead_endpoint(kind: str):
    if kind == "refused":
        with refusing_endpoint() as url:
            yield url
    elif kind == "unanswering":
        with unanswering_endpoint() as url:
            yield url
    else:
        yield "http://localrun-test.invalid"  # .invalid never resolves (RFC 2606)


@pytest.mark.parametrize(
    "kind, reason",
    [("refused", "connection refused"), ("unresolvable", "cannot resolve"), ("unanswering", "no answer")],
)
@pytest.mark.parametrize("command", [["pull", REPO], ["show", REPO], ["run", f"{REPO}:Q2_K", "hi"]])
def test_an_unreachable_hub_is_a_network_error_naming_the_endpoint(monkeypatch, command, kind, reason):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")  # the metadata timeout, honoured as huggingface_hub does
    with dead_endpoint(kind) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        started = time.monotonic()
        result = runner.invoke(app, command)
        elapsed = time.monotonic() - started
    assert result.exit_code == 5, result.output
    error, hint = error_lines(result.stderr)
    assert error.startswith(f"error: cannot reach the Hub at {url}: {reason}"), error
    assert "HF_ENDPOINT" in hint and result.stdout == ""
    assert elapsed < 30  # does not hang


# -- retries of our own: bounded in time, one line each, Retry-After honoured ----------------------
def test_http_500_on_head_only_is_a_network_error_not_a_missing_file(repo):
    repo.inject("500", "tiny-llama-Q2_K.gguf", times=-1, method="HEAD")
    failed = localrun("pull", f"{REPO}:Q2_K")
    assert failed.returncode == 5, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert lines[0].startswith("downloading Q2_K: 1 file")
    assert lines[1:3] == [
        f"warning: tiny-llama-Q2_K.gguf: the Hub answered HTTP 500; trying again (attempt {n} of 3)" for n in (2, 3)
    ]
    assert lines[3:] == [
        "error: download of tiny-llama-Q2_K.gguf failed: the Hub answered HTTP 500, 3 attempts",
        "hint: run the same command again: it resumes where it stopped",
    ]
    assert not blobs() and len([r for r in repo.log if r.method == "HEAD"]) == 3
    repo.inject("500", "tiny-llama-Q4_K_M.gguf", times=1, method="HEAD")
    fine = localrun("pull", f"{REPO}:Q4_K_M")
    assert fine.returncode == 0, fine.stderr
    assert "HTTP 500; trying again (attempt 2 of 3)" in fine.stderr and "Retry" not in fine.stderr


def test_a_stall_on_every_attempt_ends_in_bounded_time_with_one_line_per_retry(repo):
    repo.inject("stall", "tiny-llama-Q2_K.gguf", times=-1, method="*", delay=600, downloads_only=True)
    started = time.monotonic()
    failed = localrun("pull", f"{REPO}:Q2_K", env={"HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1"})
    assert time.monotonic() - started < 60  # 3 attempts of 1 s, not huggingface_hub's 6 of 60 s
    assert failed.returncode == 5, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert lines[0].startswith("downloading Q2_K: 1 file") and len(lines) == 5, failed.stderr
    assert lines[1:3] == [
        f"warning: tiny-llama-Q2_K.gguf: no answer (timed out); trying again (attempt {n} of 3)" for n in (2, 3)
    ]
    assert lines[3].startswith("error: download of tiny-llama-Q2_K.gguf failed: no answer (timed out), 3 attempts")
    assert not blobs()


def test_a_stall_before_the_body_is_retried_and_resumed(repo):
    repo.inject("stall", "tiny-llama-Q2_K.gguf", times=1, delay=600, downloads_only=True)  # the first GET
    result = localrun("pull", f"{REPO}:Q2_K", env={"HF_HUB_DOWNLOAD_TIMEOUT": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[1:] == [
        "warning: tiny-llama-Q2_K.gguf: no answer (timed out); trying again (attempt 2 of 3)"
    ]
    assert len(blobs()) == 1


def test_429_waits_as_retry_after_says_within_a_bound(repo, capsys):
    listing = list_quants(parse_ref(REPO))
    repo.inject("429", "tiny-llama-Q2_K.gguf", times=1, method="*", retry_after=2)
    started = time.monotonic()
    (saved,) = download(listing, listing.quants[listing.select(tag="Q2_K")])
    assert time.monotonic() - started >= 2 and saved.is_file()
    assert (
        "tiny-llama-Q2_K.gguf: the Hub is rate-limiting (HTTP 429); waiting 2 s (attempt 2 of 3)"
        in capsys.readouterr().err
    )
    repo.inject("429", "tiny-llama-Q4_K_M.gguf", times=-1, method="*", retry_after=3600, downloads_only=True)
    started = time.monotonic()
    refused = runner.invoke(app, ["pull", f"{REPO}:Q4_K_M"])
    assert time.monotonic() - started < 30  # an hour is beyond the bound: say so, do not wait
    assert refused.exit_code == 5, refused.output
    error, hint = error_lines(refused.stderr)
    assert "rate-limiting" in error and "1 h" in error and "try again in 1 h" in hint


# -- a full disk: the folder named, the partial file kept; bookkeeping never stops a model ---------
@contextmanager
def small_disk(where: Path, size: str):
    """A real filesystem that fills up: a tmpfs of `size` mounted at `where` (needs root; skips otherwise)."""
    where.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Fill `disk` to its last byte with one file, and return the file."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(64 << 10))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_disk_filled_during_a_download_names_the_folder_and_keeps_the_partial_file(
    hub, big_model, tmp_path, monkeypatch
):
    hub.add_repo("acme/big-GGUF", {"tiny-big-F32.gguf": big_model})
    with small_disk(tmp_path / "disk", "64m") as disk:
        monkeypatch.setenv("HF_HUB_CACHE", str(disk / "hub"))
        slow = hub.inject("slow", "tiny-big-F32.gguf", times=-1, delay=0.01, downloads_only=True)
        child = subprocess.Popen(
            [sys.executable, "-m", "localrun", "pull", "acme/big-GGUF"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(p.stat().st_size >= CHUNK for p in incomplete()):
            time.sleep(0.02)
        filler = fill(disk)  # the disk fills while the download runs
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == 6, stderr
        (partial,) = incomplete()
        kept = partial.stat().st_size
        assert kept >= CHUNK and not blobs()
        assert error_lines(stderr) == [
            f"error: no space left on device in {disk / 'hub'}: the download of tiny-big-F32.gguf stopped, "
            f"{human_bytes(kept)} kept",
            "hint: free some space (or set HF_HUB_CACHE to a bigger disk), then run the same command again: "
            "it resumes where it stopped",
        ]
        filler.unlink()
        slow.times = 0
        result = pull(parse_ref("acme/big-GGUF"), quiet(), machine=Machine(64 * GiB, 60 * GiB, []))
        last = [g for g in hub.downloads("tiny-big-F32.gguf") if g.range is None or g.range.endswith("-")][-1]
        assert last.range == f"bytes={kept}-" and sha256(result.files[0]) == sha256(big_model)


def test_a_full_disk_under_localrun_home_never_stops_a_model_from_running(repo, tmp_path, monkeypatch):
    assert runner.invoke(app, ["pull", f"{REPO}:Q2_K"]).exit_code == 0
    with small_disk(tmp_path / "full", "1m") as disk:
        home = disk / "home"
        home.mkdir()
        shutil.copy(Path(os.environ["LOCALRUN_HOME"]) / "probe.json", home)  # the self-test's verdict
        monkeypatch.setenv("LOCALRUN_HOME", str(home))
        fill(disk)
        ran = runner.invoke(app, ["run", f"{REPO}:Q2_K", "hi", "-n", "2"])
        assert ran.exit_code == 0, ran.output
        assert ran.stdout.strip() and "Traceback" not in ran.stderr
        pulled_too = runner.invoke(app, ["pull", f"{REPO}:Q4_K_M"])
        assert pulled_too.exit_code == 0, pulled_too.output
        assert runner.invoke(app, ["list"]).exit_code == 0
        assert not [p for p in home.rglob("*") if p.name.endswith(".tmp")]  # no half-written files left
        assert not (home / "usage.json").exists()  # could not be written: the run went on without it


# -- a pull killed while checking a file: the file is checked again before it is kept or loaded ----
KILLED_WHILE_CHECKING = """
import os, signal
from localrun.cli import main

symlink = os.symlink


def symlink_then_die(src, dst, *args, **kwargs):
    symlink(src, dst, *args, **kwargs)
    if "snapshots" in str(dst):  # huggingface_hub has placed the file: die during localrun's check
        os.kill(os.getpid(), signal.SIGKILL)


os.symlink = symlink_then_die
main()
"""


def pull_killed_while_checking(ref: str) -> Path:
    """`localrun pull ref`, killed (SIGKILL) once huggingface_hub has placed the downloaded file
    (renamed to its final name, linked into the snapshot), before localrun's sha256 check ends;
    the blob it leaves."""
    child = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_CHECKING, "pull", ref], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    (blob,) = blobs()
    return blob


@pytest.fixture
def corrupt_repo(hub, tiny, tmp_path):
    """acme/corrupt-GGUF, whose one file the emulator serves with a byte changed (sha256 not the
    listing's) until the test writes the right bytes back to `served`."""
    served = tmp_path / "tiny-Q2_K.gguf"
    good = tiny.quants["Q2_K"].read_bytes()
    served.write_bytes(good)
    hub.add_repo("acme/corrupt-GGUF", {"tiny-Q2_K.gguf": served})
    served.write_bytes(good[:-100] + bytes([good[-100] ^ 0xFF]) + good[-99:])
    return served, good


def test_a_corrupt_file_left_by_a_killed_check_is_never_listed_loaded_or_kept(corrupt_repo):
    served, good = corrupt_repo
    blob = pull_killed_while_checking("acme/corrupt-GGUF")
    assert sha256(blob) != blob.name  # corrupt, under its final name
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and "not verified" in listed.stdout
    assert "acme/corrupt-GGUF:Q2_K: not verified" in listed.stderr
    assert json.loads(runner.invoke(app, ["list", "--json"]).stdout)["models"][0]["unverified"] is True

    ran = runner.invoke(app, ["run", "acme/corrupt-GGUF", "hi", "-n", "2"])
    assert ran.exit_code == 7, ran.output
    assert error_lines(ran.stderr) == [
        "error: acme/corrupt-GGUF:Q2_K: tiny-Q2_K.gguf was corrupt (a pull stopped while checking it); it was deleted",
        "hint: pull it again: `localrun pull acme/corrupt-GGUF:Q2_K`",
    ]
    assert not blobs() and pulled(parse_ref("acme/corrupt-GGUF")) is None

    pull_killed_while_checking("acme/corrupt-GGUF")
    served.write_bytes(good)  # the Hub serves the right bytes again
    again = runner.invoke(app, ["pull", "acme/corrupt-GGUF"])
    assert again.exit_code == 0, again.output
    assert again.stderr.splitlines()[:2] == [
        "checking tiny-Q2_K.gguf: a pull stopped before its sha256 was checked",
        "warning: tiny-Q2_K.gguf was corrupt: deleted, downloading it again",
    ]
    (blob,) = blobs()
    assert sha256(blob) == blob.name
    assert json.loads(runner.invoke(app, ["list", "--json"]).stdout)["models"][0]["unverified"] is False


def test_a_whole_file_left_by_a_killed_check_is_checked_once_then_runs(repo, tiny):
    blob = pull_killed_while_checking(f"{REPO}:Q2_K")
    assert sha256(blob) == sha256(tiny.quants["Q2_K"])
    assert "not verified" in runner.invoke(app, ["list"]).stdout
    ran = runner.invoke(app, ["run", f"{REPO}:Q2_K", "hi", "-n", "2"])
    assert ran.exit_code == 0, ran.output
    assert "not verified" not in runner.invoke(app, ["list"]).stdout and blobs() == [blob]


def test_marks_that_cannot_be_written_cost_one_line_not_the_pull(repo, tiny):
    (Path(os.environ["LOCALRUN_HOME"]) / "unverified").write_text("in the way of the marks' folder")
    result = runner.invoke(app, ["pull", f"{REPO}:F32"])  # three shards, one line
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: cannot record sha256 checks in $LOCALRUN_HOME (")
    assert warnings[0].endswith("a pull stopped while checking a file would go unnoticed")
    assert sorted(sha256(p) for p in blobs()) == sorted(sha256(p) for p in tiny.split)
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and "not verified" not in listed.stdout
