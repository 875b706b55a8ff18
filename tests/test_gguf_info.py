"""GGUF headers read locally and remotely (HTTP Range against the Hub emulator), and validation."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from localrun.errors import BadModel, ExitCode, NotFound
from localrun.hub.ranges import read_remote_header
from localrun.model.files import shard_paths
from localrun.model.header import read_header, swa_layers
from localrun.model.tiny import CHATML_TEMPLATE, vocabulary
from localrun.model.validate import validate

ROOT = Path(__file__).resolve().parents[1]
N_VOCAB = len(vocabulary()[0])
# the tiny llama: token_embd + output (872 x 256), output_norm, and per block two norms, q/o
# (256 x 256), k/v (128 x 256), gate/up/down (512 x 256)
TINY_PARAMS = 2 * N_VOCAB * 256 + 256 + 2 * (2 * 256 + 2 * 256 * 256 + 2 * 128 * 256 + 3 * 512 * 256)


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"])
def test_tiny_quant_headers(tiny, quant):
    h = read_header(tiny.quants[quant])
    assert (h.architecture, h.name, h.file_type) == ("llama", "tiny-llama", quant)
    assert (h.n_layer, h.n_embd, h.n_head, h.n_head_kv) == (2, 256, 4, [2, 2])
    assert (h.key_length, h.value_length, h.n_ctx_train, h.n_ff) == (64, 64, 2048, 512)
    assert (h.sliding_window, h.swa_layers, h.n_expert, h.n_expert_used) == (None, [False, False], 0, 0)
    assert h.n_vocab == N_VOCAB and h.n_params == TINY_PARAMS
    assert h.chat_template == CHATML_TEMPLATE and h.license is None and not h.output_tied
    assert h.n_shards == 1 and h.file_size == tiny.quants[quant].stat().st_size
    assert sum(h.layer_bytes) + h.embd_bytes + h.output_bytes + h.other_bytes == h.tensor_bytes
    assert h.file_size - 64 * 1024 < h.tensor_bytes < h.file_size  # the header is small
    assert h.metadata["tokenizer.ggml.tokens"] == f"[{N_VOCAB} items]"
    assert h.metadata["llama.block_count"] == 2
    assert h.to_dict()["n_head_kv"] == [2, 2]


def test_parser_agrees_with_gguf_reader(tiny):
    """Our parser and the gguf package's GGUFReader see the same tensors and values."""
    from gguf import GGUFReader

    path = tiny.quants["Q4_K_M"]
    reader = GGUFReader(path)
    h = read_header(path)
    per_layer = [0, 0]
    for t in reader.tensors:
        if t.name.startswith("blk."):
            per_layer[int(t.name.split(".")[1])] += int(t.n_bytes)
    assert h.layer_bytes == per_layer
    assert h.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert h.n_params == sum(int(t.n_elements) for t in reader.tensors)
    for key in ("llama.context_length", "llama.attention.head_count_kv", "general.file_type", "general.name"):
        assert h.metadata[key] == reader.fields[key].contents()
    assert h.chat_template == reader.fields["tokenizer.chat_template"].contents()


def test_gemma_header(gemma):
    h = read_header(gemma)
    assert (h.architecture, h.file_type, h.license) == ("gemma3", "Q4_K_M", "gemma")
    assert (h.n_layer, h.n_embd, h.n_head, h.n_ff) == (18, 640, 4, 2048)
    assert h.n_head_kv == [1] * 18 and (h.key_length, h.value_length) == (256, 256)
    assert (h.n_ctx_train, h.n_vocab) == (32768, 262144)
    # gemma3: every 6th layer is global, the others use the 512-token sliding window
    assert h.sliding_window == 512
    assert [i for i, swa in enumerate(h.swa_layers) if not swa] == [5, 11, 17]
    assert h.output_tied and h.chat_template is None  # the base model: no template, tied output
    assert h.embd_bytes == 262144 * 640 * 34 // 32  # Q8_0 embeddings
    assert 268_000_000 < h.n_params < 268_200_000


def test_split_header_reads_every_shard(tiny):
    first, second, third = tiny.split
    h = read_header(first)
    assert h.n_shards == 3 and h.file_size == sum(p.stat().st_size for p in tiny.split)
    assert h.file_type == "F32" and h.tensor_bytes == 4 * h.n_params == 4 * TINY_PARAMS
    assert read_header(second) == h  # any shard finds the others
    assert shard_paths(third) == [first, second, third]


def test_split_with_a_missing_shard(tiny, tmp_path):
    for shard in tiny.split[:2]:
        shutil.copy(shard, tmp_path / shard.name)
    with pytest.raises(NotFound, match="00003-of-00003"):
        read_header(tmp_path / tiny.split[0].name)


def _only_range_gets(hub, path_glob: str) -> list:
    requests = [r for r in hub.log if "/resolve/" in r.path]
    assert requests, "no request reached the emulator"
    assert all(r.method == "GET" and r.range and r.status == 206 for r in requests), requests
    return [r for r in requests if r.path.endswith(path_glob)]


def _range_bytes(requests) -> int:
    total = 0
    for r in requests:
        start, end = r.range.removeprefix("bytes=").split("-")
        total += int(end) - int(start) + 1
    return total


def test_remote_header_reads_only_the_first_megabytes(hub, gemma):
    hub.add_repo("google/gemma-3-270m-GGUF", {"gemma-3-270m-Q4_K_M.gguf": gemma})
    remote = read_remote_header("google/gemma-3-270m-GGUF", ["gemma-3-270m-Q4_K_M.gguf"])
    assert remote == read_header(gemma)
    fetched = _only_range_gets(hub, ".gguf")
    # the 6.5 MB header of a 253 MB file: a few growing Range requests, never the whole file
    assert 2 <= len(fetched) <= 4
    assert _range_bytes(fetched) <= 16 * 2**20 < gemma.stat().st_size
    assert hub.downloads() == fetched  # no other GET went to a file


def test_remote_header_of_a_split_model_in_a_subfolder(hub, tiny):
    files = {f"Q4/{p.name}": p for p in tiny.split}
    hub.add_repo("acme/tiny-split-GGUF", files)
    remote = read_remote_header("acme/tiny-split-GGUF", list(files), sizes=[p.stat().st_size for p in tiny.split])
    assert remote == read_header(tiny.split[0])
    fetched = _only_range_gets(hub, ".gguf")
    assert sorted(r.path.rsplit("/", 1)[1] for r in fetched) == sorted(p.name for p in tiny.split)


def test_remote_tiny_quant_header(hub, tiny):
    hub.add_repo("acme/tiny-GGUF", {"tiny-llama-Q8_0.gguf": tiny.quants["Q8_0"]})
    assert read_remote_header("acme/tiny-GGUF", ["tiny-llama-Q8_0.gguf"]) == read_header(tiny.quants["Q8_0"])
    _only_range_gets(hub, ".gguf")


def test_remote_errors(hub, tiny):
    hub.add_repo("acme/tiny-GGUF", {"tiny.gguf": tiny.quants["Q2_K"], "fake.gguf": ROOT / "README.md"})
    with pytest.raises(BadModel, match="fake.gguf in acme/tiny-GGUF is not a GGUF file") as bad:
        read_remote_header("acme/tiny-GGUF", ["fake.gguf"])
    assert bad.value.exit_code == ExitCode.BAD_MODEL
    with pytest.raises(NotFound, match="missing.gguf not found in acme/tiny-GGUF"):
        read_remote_header("acme/tiny-GGUF", ["missing.gguf"])
    with pytest.raises(NotFound, match="repository acme/nothing not found"):
        read_remote_header("acme/nothing", ["tiny.gguf"])


def test_validate_accepts_good_models(tiny, gemma):
    for path in [*tiny.quants.values(), tiny.split[0], tiny.no_template, gemma]:
        validate(path)


def test_validate_rejects_a_duplicated_vocabulary_token(tiny):
    with pytest.raises(BadModel, match=r"corrupt vocabulary: token .* appears twice") as bad:
        validate(tiny.corrupt_vocab)
    assert bad.value.exit_code == ExitCode.BAD_MODEL and bad.value.hint


def test_validate_rejects_a_truncated_file(tiny, tmp_path):
    source = tiny.quants["Q8_0"]
    data = source.read_bytes()
    cut = tmp_path / source.name
    cut.write_bytes(data[: len(data) // 2])  # the header is whole, the tensor data is not
    assert read_header(cut).n_layer == 2
    with pytest.raises(BadModel, match="is truncated: tensor .* ends past the end of the file"):
        validate(cut)
    cut.write_bytes(data[:2000])  # inside the header (vocabulary)
    for check in (validate, read_header):
        with pytest.raises(BadModel, match="is truncated: the GGUF header ends past the end of the file"):
            check(cut)


def test_validate_rejects_files_that_are_not_gguf(tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("<!doctype html>\n<title>Sign in</title>\n" * 10)
    for check in (validate, read_header):
        with pytest.raises(BadModel, match="model.gguf is not a GGUF file"):
            check(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(BadModel, match="not a GGUF file"):
        validate(empty)


def test_validate_rejects_a_model_without_vocabulary(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "novocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BadModel, match="has no tokenizer vocabulary"):
        validate(path)


@pytest.mark.parametrize(
    "arch, fields, n_layer, window, globals_",
    [
        ("gemma2", {}, 4, 4096, [1, 3]),  # default window, every 2nd layer global
        ("gemma3", {"gemma3.attention.sliding_window": 1024}, 12, 1024, [5, 11]),
        ("gemma3", {}, 12, None, list(range(12))),  # no window key: no SWA
        ("cohere2", {"cohere2.attention.sliding_window": 4096}, 8, 4096, [3, 7]),
        ("gpt-oss", {"gpt-oss.attention.sliding_window": 128}, 4, 128, [1, 3]),
        ("laguna", {"laguna.attention.sliding_window": 512}, 8, 512, [0, 4]),  # dense first
        (
            "gemma3",
            {"gemma3.attention.sliding_window": 512, "gemma3.attention.sliding_window_pattern": 4},
            8,
            512,
            [3, 7],
        ),  # a pattern period overrides the architecture's
        (
            "gemma4",
            {
                "gemma4.attention.sliding_window": 512,
                "gemma4.attention.sliding_window_pattern": [True, True, False, True],
            },
            4,
            512,
            [2],
        ),
        ("llama", {"llama.attention.sliding_window": 4096}, 4, 4096, [0, 1, 2, 3]),  # llama.cpp ignores it
    ],
)
def test_sliding_window_layers_follow_llama_cpp(arch, fields, n_layer, window, globals_):
    got_window, flags = swa_layers(arch, fields, n_layer)
    assert got_window == window
    assert [i for i, swa in enumerate(flags) if not swa] == globals_


def test_parsed_headers_and_verdicts_are_cached_per_file_identity(tiny, tmp_path):
    import os

    model = tmp_path / "model.gguf"
    shutil.copy(tiny.quants["Q2_K"], model)
    before = set((Path(os.environ["LOCALRUN_HOME"]) / "headers").glob("*.json"))
    validate(model)
    cache = set((Path(os.environ["LOCALRUN_HOME"]) / "headers").glob("*.json")) - before
    assert len(cache) == 1
    assert read_header(model).n_layer == read_header(tiny.quants["Q2_K"]).n_layer
    # The same path with other contents (size/mtime change) is parsed and judged again.
    shutil.copy(tiny.corrupt_vocab, model)
    with pytest.raises(BadModel, match="appears twice"):
        validate(model)
