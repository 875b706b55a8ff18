"""A pick from a logits row's head is the pick over the whole row: the same tokens, draw for draw,
as llama.cpp's own chain applied to every token of the row (and, with a grammar, checked first
and masked when refused), whatever the settings, the biases, the penalties' history."""

from __future__ import annotations

import ctypes
from dataclasses import replace

import llama_cpp as lc
import numpy as np
import pytest

from localrun.inference.generation import grammar
from localrun.inference.generation.sampler import Sampler
from localrun.inference.generation.settings import SamplingOptions
from localrun.inference.llama.vocabulary import partial_utf8_tokens
from support.engines import open_engine

SETTINGS = {
    "greedy": SamplingOptions(temperature=0),
    "greedy, a raising bias": SamplingOptions(temperature=0, logit_bias=((5, 9.0), (7, -3.0))),
    "top-k draw": SamplingOptions(seed=7),  # top-k 40, top-p 0.95, min-p 0.05: the defaults
    "min-p alone": SamplingOptions(top_k=0, top_p=1.0, min_p=0.1, seed=7),
    "top-p alone (the whole row)": SamplingOptions(top_k=0, top_p=0.9, min_p=0.0, seed=7),
    "a penalty that raises (the whole row)": SamplingOptions(temperature=0, repeat_penalty=0.8),
    "frequency and presence": SamplingOptions(seed=3, frequency_penalty=0.5, presence_penalty=0.5),
    # the rows favour a banned token (end-of-generation; under a grammar, a byte piece): the ban
    # holds though a bias (given below) names it too
    "a bias on a banned token": SamplingOptions(temperature=0),
}


@pytest.fixture(scope="module")
def model(tiny):
    engine = open_engine(tiny.quants["Q8_0"], n_ctx=512, speculate="off", prompt_cache=False)
    yield engine.model
    engine.close()


def rows(n_vocab: int, count: int, seed: int, favoured: int, broken: bool = False) -> list[np.ndarray]:
    """Rows shaped like a model's: noise, a few favourites that keep coming back (so penalties
    have a history to act on; `favoured` among them), sometimes a near-tie, sometimes a
    flat row; `broken`: now and then a row with an infinite or NaN logit, as an overflowing or
    damaged model gives."""
    rng = np.random.default_rng(seed)
    favourites = np.union1d(rng.choice(n_vocab, size=6, replace=False), [favoured])
    out = []
    for i in range(count):
        row = rng.normal(0.0, 2.0, n_vocab).astype(np.float32)
        if i % 7 != 6:  # every seventh row flat: the head must widen, or give the row up
            row[favourites] += rng.uniform(4.0, 12.0, len(favourites)).astype(np.float32)
        if broken and i % 10 == 3:
            row[favourites[i % len(favourites)]] = np.inf if i % 20 == 3 else np.nan
        out.append(row)
    return out


def whole_row_pick(chain, rule, row: np.ndarray, masked: bool) -> int:
    cells = np.zeros(len(row), dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
    cells["id"], cells["logit"] = np.arange(len(row), dtype=np.int32), row
    array = lc.llama_token_data_array(cells.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), len(row), -1, False)
    if masked:
        lc.llama_sampler_apply(rule, ctypes.byref(array))
    lc.llama_sampler_apply(chain, ctypes.byref(array))
    return int(array.data[array.selected].id)


def refused(rule, token: int) -> bool:
    one = lc.llama_token_data(token, 1.0, 0.0)
    array = lc.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
    lc.llama_sampler_apply(rule, ctypes.byref(array))
    return array.data[0].logit == float("-inf")


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "JSON grammar"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_pick_from_the_rows_head_is_the_whole_rows(model, name, constrained):
    banned = partial_utf8_tokens(model)[0] if constrained else model.eog_tokens()[0]
    options = SETTINGS[name]
    if name == "a bias on a banned token":  # ignore_eos cannot go with a grammar
        options = replace(options, ban_eog=not constrained, logit_bias=((banned, 5.0),))
    sampler = Sampler(model, options, grammar.json_object().gbnf if constrained else None, n_ctx=512)
    # the same chain (its random state and penalties' history too), applied to every token
    chain = lc.llama_sampler_clone(sampler.ptr)
    rule = lc.llama_sampler_clone(sampler.rule) if constrained else None
    try:
        picked, expected = [], []
        # llama.cpp's draws and sorts are not defined over NaN or infinite logits: greedy ones only
        for row in rows(model.n_vocab, 60, seed=len(name), favoured=banned, broken=options.greedy):
            token = whole_row_pick(chain, rule, row, masked=False)
            if rule is not None:
                if refused(rule, token):
                    token = whole_row_pick(chain, rule, row, masked=True)
                lc.llama_sampler_accept(rule, token)
            lc.llama_sampler_accept(chain, token)
            expected.append(token)
            picked.append(sampler.sample_row(row.copy()))
        assert picked == expected
        assert len(set(expected)) > 3  # the rows gave the chain real choices
    finally:
        lc.llama_sampler_free(chain)
        if rule is not None:
            lc.llama_sampler_free(rule)
        sampler.close()
