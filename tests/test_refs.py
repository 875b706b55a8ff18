"""Model references and quant names: one parser for every command."""

from __future__ import annotations

import pytest

from localrun.errors import UsageError
from localrun.model.quants import info, matches_tag, quant_from_filename, sort_key
from localrun.model.refs import parse_ref


@pytest.mark.parametrize(
    "text, repo, tag, filename, revision",
    [
        ("org/repo", "org/repo", None, None, None),
        ("org/repo:Q4_K_M", "org/repo", "Q4_K_M", None, None),
        ("org/repo:q8_0", "org/repo", "q8_0", None, None),
        ("org/repo:sub/model-Q2_K.gguf", "org/repo", None, "sub/model-Q2_K.gguf", None),
        ("hf.co/org/repo:Q6_K", "org/repo", "Q6_K", None, None),
        ("https://huggingface.co/org/repo", "org/repo", None, None, None),
        ("https://huggingface.co/org/repo/", "org/repo", None, None, None),
        ("https://huggingface.co/org/repo/blob/dev/x-Q4_0.gguf", "org/repo", None, "x-Q4_0.gguf", "dev"),
        ("https://huggingface.co/org/repo/tree/v2", "org/repo", None, None, "v2"),
    ],
)
def test_hub_references(text, repo, tag, filename, revision):
    ref = parse_ref(text)
    assert (ref.repo_id, ref.tag, ref.filename, ref.revision) == (repo, tag, filename, revision)
    assert not ref.is_local


def test_local_paths(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    assert parse_ref(str(model)).path == model
    assert parse_ref("./missing.gguf").is_local
    assert parse_ref("/no/such/file.gguf").is_local


@pytest.mark.parametrize("bad", ["", "repo-without-org", "a/b/c d", "org/repo:"[:-1] + " x"])
def test_bad_references_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_ref(bad)


@pytest.mark.parametrize(
    "name, quant",
    [
        ("gemma-3-270m-it-Q4_K_M.gguf", "Q4_K_M"),
        ("Qwen3-8B-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
        ("model.i1-IQ3_M.gguf", "I1-IQ3_M"),
        ("x-IQ4_XS-00001-of-00002.gguf", "IQ4_XS"),
        ("sub/dir/llama-q8_0.gguf", "Q8_0"),
        ("llama-bf16.gguf", "BF16"),
        ("readme.gguf", None),
    ],
)
def test_quant_from_filename(name, quant):
    assert quant_from_filename(name) == quant


def test_tags_match_whole_tokens_case_insensitively():
    assert matches_tag("m-Q4_K_M.gguf", "q4_k_m")
    assert not matches_tag("m-Q4_K_M.gguf", "Q4_K")
    assert not matches_tag("m-IQ4_XS.gguf", "Q4_XS")
    assert matches_tag("m-UD-Q4_K_XL.gguf", "UD-Q4_K_XL")


def test_quality_order_follows_kld_and_unknown_names_rank_by_size():
    order = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "IQ4_XS", "Q4_0", "Q3_K_M", "Q2_K", "IQ1_S"]
    assert sorted(order, key=lambda q: sort_key(q, 0)) == order
    assert info("UD-Q4_K_XL").quality > info("Q4_K_M").quality
    assert info("i1-Q4_K_M").quality > info("Q4_K_M").quality
    assert info("Q7_X") is None
    ranked = sorted([("Q7_X", 10), ("Q2_K", 1), ("Q9_Y", 20)], key=lambda x: sort_key(*x))
    assert [q for q, _ in ranked] == ["Q2_K", "Q9_Y", "Q7_X"]
