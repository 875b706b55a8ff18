"""llama.cpp's sampler chains, typed: one Sampler per sequence (its own penalties, grammar and
random state)."""

from __future__ import annotations

import ctypes
import math
from typing import TYPE_CHECKING, Any

from localrun.errors import UsageError
from localrun.inference.generation.settings import SamplingOptions, check_bounds, check_structure, llama_seed
from localrun.inference.llama.build import llama
from localrun.inference.llama.vocabulary import partial_utf8_tokens

if TYPE_CHECKING:
    from localrun.inference.llama.runtime import LlamaContext, LlamaModel


# The head: the tokens within a margin of the best logit; widened through these margins until it
# decides, but never past HEAD_MOST tokens (the biases' search on a head costs its size times
# their count: a grammar bans hundreds of byte tokens).
HEAD_MARGINS = (4.0, 8.0, 16.0, 32.0, 64.0)
HEAD_MOST = 4096


class Sampler:
    """A chain: ban end-of-text (fixed-length runs), repeat penalties, then greedy, or top-k, top-p,
    min-p, temperature and a seeded draw; and a grammar beside it. sample() applies them to one
    logits row and accepts the token into their state (penalties, grammar).

    The grammar is checked against the chain's choice first, as llama.cpp's own samplers do:
    masking a 262k-token vocabulary costs more than a decode step, checking one token nearly
    nothing. Only when the choice breaks the grammar is the row masked and sampled again. At
    temperature 0 the token is the one masking first gives. With sampling and no truncation its
    probability is p(t) + (1 - Z) p(t) / Z = p(t) / Z, the masked distribution (Z: the mass the
    grammar allows); top-k, top-p and min-p cut the row before the check, which shifts it a
    little, as in llama.cpp's own sampler.

    The chain is two: `pre` (biases, penalties: they change logits) and `post` (the choice, and
    the cuts before it). Scanning a 262k-token row costs about a millisecond, several percent of
    a small model's step, so a pick hands the chain only the row's head, the tokens within some
    margin of its best logit (and any a bias raises), and widens it until what the chain chooses
    there provably is what it would choose over the whole row: penalties only lower a logit, so
    no token outside the head ends above the margin's floor (see `_decides`). At temperature 0,
    and for a draw cut to the top k or by min-p alone, that holds; a draw that needs the whole
    row's mass (top-p, no cut) is sampled over the whole row, by llama.cpp as before."""

    def __init__(
        self,
        model: LlamaModel,
        s: SamplingOptions,
        grammar: str | None = None,
        *,
        n_ctx: int,
        triggers: tuple[str, ...] = (),
    ):
        """`n_ctx`: the context the sequence lives in, which bounds what the settings may ask.
        `grammar`: GBNF as the grammar module gives it, checked against llama.cpp's limits there.
        `triggers`: the grammar is lazy -- the reply is free until its text matches one of these
        patterns (regular expressions over the whole reply so far; the first group, or the match,
        is where the constrained text starts): a tool call after free text, an answer after the
        reasoning."""
        check_structure(s, grammar)
        check_bounds(s, n_ctx, model.n_vocab)
        lc = self._lc = llama()
        self.options, self.grammar = s, grammar
        self.rule: Any = None
        self._cells: Any = None  # llama_token_data for every token, allocated on first use
        self._ids: Any = None  # 0..n_vocab-1, to put back in the cells
        self._n_vocab = model.n_vocab
        chain = self.ptr = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        # two chains in the one (it owns them): what changes logits, what chooses
        self._pre = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        self._post = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, self._pre)
        lc.llama_sampler_chain_add(chain, self._post)
        self._raised = sorted({t for t, b in s.logit_bias if b > 0})  # tokens a bias may lift into the head
        # The head's floor bounds every other token's final logit only while nothing raises one;
        # and it decides only a choice that takes no mass from the row's tail.
        lowers_only = s.repeat_penalty >= 1.0 and s.frequency_penalty >= 0 and s.presence_penalty >= 0
        self._heads = lowers_only and (s.greedy or s.top_k > 0 or (s.top_p >= 1.0 and s.min_p > 0))
        banned = [*(model.eog_tokens() if s.ban_eog else ()), *(partial_utf8_tokens(model) if grammar else ())]
        # one entry per token (a ban wins): llama.cpp applies only a token's first entry when it
        # has to search for it, as in a row's head
        merged: dict[int, float] = {}
        for t, b in s.logit_bias:
            merged[t] = merged.get(t, 0.0) + b
        merged |= dict.fromkeys(banned, float("-inf"))
        bias = list(merged.items())
        if bias:
            cells = (lc.llama_logit_bias * len(bias))(*[lc.llama_logit_bias(t, b) for t, b in bias])
            lc.llama_sampler_chain_add(self._pre, lc.llama_sampler_init_logit_bias(model.n_vocab, len(bias), cells))
        if s.repeat_penalty != 1.0 or s.frequency_penalty or s.presence_penalty:
            # -1: every token so far (llama.cpp's own sampler would read it as none)
            last_n = s.repeat_last_n if s.repeat_last_n >= 0 else max(n_ctx, 1)
            penalties = (last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty)
            lc.llama_sampler_chain_add(self._pre, lc.llama_sampler_init_penalties(model.n_vocab, *penalties))
        if grammar:
            if triggers:
                patterns = (ctypes.c_char_p * len(triggers))(*(t.encode() for t in triggers))
                self.rule = lc.llama_sampler_init_grammar_lazy_patterns(
                    model.vocab, grammar.encode(), b"root", patterns, len(triggers), None, 0
                )
            else:
                self.rule = lc.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
            if not self.rule:
                self.close()
                raise UsageError("llama.cpp could not parse the grammar", hint="check it with --verbose")
        if s.greedy:
            lc.llama_sampler_chain_add(self._post, lc.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                lc.llama_sampler_chain_add(self._post, lc.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                lc.llama_sampler_chain_add(self._post, lc.llama_sampler_init_top_p(s.top_p, 1))
            if s.min_p > 0:
                lc.llama_sampler_chain_add(self._post, lc.llama_sampler_init_min_p(s.min_p, 1))
            lc.llama_sampler_chain_add(self._post, lc.llama_sampler_init_temp(s.temperature))
            lc.llama_sampler_chain_add(self._post, lc.llama_sampler_init_dist(llama_seed(s.seed)))

    def sample(self, ctx: LlamaContext, index: int = -1) -> int:
        """The token for logits row `index` of ctx's last decode (accepted into the chain)."""
        if not self.rule and not self._heads:
            return int(self._lc.llama_sampler_sample(self.ptr, ctx.ptr, index))
        return self.sample_row(ctx.logits(index))

    def sample_row(self, logits: Any) -> int:
        """The token for a row of logits (a numpy array; a copy may outlive the decode it came
        from, so that a costly grammar can be sampled beside the next decodes)."""
        lc = self._lc
        token = self._pick(logits, masked=False)
        if self.rule:
            if not self._allowed(token):
                token = self._pick(logits, masked=True)
            lc.llama_sampler_accept(self.rule, token)
        lc.llama_sampler_accept(self.ptr, token)
        return token

    def force(self, token: int) -> bool:
        """Accept a token the caller inserts instead of sampling (a reasoning's forced end) into the
        chain's state; False, accepting nothing, when the grammar rules it out here (accepting it
        would make llama.cpp's grammar throw)."""
        lc = self._lc
        if self.rule:
            if not self._allowed(token):
                return False
            lc.llama_sampler_accept(self.rule, token)
        lc.llama_sampler_accept(self.ptr, token)
        return True

    def _pick(self, logits: Any, *, masked: bool) -> int:
        """The chain's choice over the whole row (the grammar applied first when `masked`): from
        the row's head where that decides it, else over every token."""
        import numpy as np

        # the best logit only where a head is tried; NaN or inf: no margin below it means anything
        if self._heads and math.isfinite(best := float(logits.max())):
            for margin in HEAD_MARGINS:
                head = np.flatnonzero(logits >= best - margin)
                if len(head) > HEAD_MOST:  # the whole row, in llama.cpp, costs no more
                    break
                if self._raised:
                    head = np.union1d(head, self._raised)
                cells = self._cells_for(head, logits[head])
                array = self._shaped(cells, masked)
                if self._decides(cells["logit"], best - margin):
                    return self._chosen(array, masked)
        if self._cells is None:
            self._ids = np.arange(self._n_vocab, dtype=np.int32)
            self._cells = self._cells_for(self._ids, logits)
        else:  # again each time: the chain reorders the cells in place
            self._cells["id"], self._cells["logit"], self._cells["p"] = self._ids, logits, 0.0
        return self._chosen(self._shaped(self._cells, masked), masked)

    @staticmethod
    def _cells_for(ids: Any, logits: Any) -> Any:
        import numpy as np

        cells = np.zeros(len(ids), dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        cells["id"], cells["logit"] = ids, logits
        return cells

    def _shaped(self, cells: Any, masked: bool) -> Any:
        """The cells as llama.cpp's array, their logits as the chain's first part (and the grammar,
        when `masked`) leave them, in place."""
        lc = self._lc
        data = cells.ctypes.data_as(ctypes.POINTER(lc.llama_token_data))
        array = lc.llama_token_data_array(data, len(cells), -1, False)
        lc.llama_sampler_apply(self._pre, ctypes.byref(array))
        if masked:
            lc.llama_sampler_apply(self.rule, ctypes.byref(array))
        return array

    def _decides(self, finals: Any, floor: float) -> bool:
        """Whether cells whose logits are now `finals` (the row's head: every other token is
        below `floor`) hold everything the choice can take: the best the grammar allows at
        temperature 0; the top k for a draw that cuts to them; for a min-p cut alone, every
        token within its ratio of the best. A draw cut only by top-p needs the whole row's mass."""
        import numpy as np

        s = self.options
        allowed = finals[np.isfinite(finals)]
        if s.greedy or s.top_k > 0:
            need = 1 if s.greedy else s.top_k
            return len(allowed) >= need and float(np.partition(allowed, len(allowed) - need)[-need]) >= floor
        if s.top_p >= 1.0 and s.min_p > 0:
            return len(allowed) > 0 and floor <= float(allowed.max()) + math.log(s.min_p)
        return False

    def _chosen(self, array: Any, masked: bool) -> int:
        """The choice of the chain's second part over a shaped array."""
        lc = self._lc
        lc.llama_sampler_apply(self._post, ctypes.byref(array))
        chosen = array.data[array.selected] if 0 <= array.selected < array.size else None
        if masked and (chosen is None or not math.isfinite(chosen.logit)):
            # Every token is ruled out (a character only byte pieces spell, a surrogate): accepting
            # one anyway would make llama.cpp's grammar throw, which aborts the process.
            raise UsageError(
                "the grammar allows no token of this model here",
                hint="it asks for text this model's vocabulary cannot write; simplify it",
            )
        return int(chosen.id) if chosen is not None else 0

    def _allowed(self, token: int) -> bool:
        lc = self._lc
        one = lc.llama_token_data(token, 1.0, 0.0)
        array = lc.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        lc.llama_sampler_apply(self.rule, ctypes.byref(array))
        return array.data[0].logit != float("-inf")

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self._lc.llama_sampler_free(self.ptr)
            self.ptr = None
        if getattr(self, "rule", None):
            self._lc.llama_sampler_free(self.rule)
            self.rule = None

    def __del__(self) -> None:
        self.close()
