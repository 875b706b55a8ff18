"""Speculative decoding, exact: drafts proposed cheaply, verified by the model in one batch.

A verify batch holds the last sampled token and K drafted ones, with logits at every position.
The target's sampler then samples each position in turn, exactly as plain decoding would (the
same chain, the same random draws in the same order), and stops at the first token that differs
from the draft: that token is the correction, the drafted tokens after it are dropped from the KV
cache. Every token emitted is one plain decoding would emit from those logits, so the output's
distribution is unchanged, at any temperature. For a deterministic draft this accepts drafted
token x with probability p(x), the same as the min(1, p/q) rule with q a point mass.

Drafts come from the prompt and the reply so far (prompt lookup: what followed the last earlier
occurrence of the current n-gram) or from a small draft model that shares the vocabulary. Each
sequence's Controller keeps it paying: the CostCurve (one per context) measures what a batch of
each size costs, the Controller how often its drafts are accepted; it picks the K with the best
expected tokens per unit of time for the whole batch -- when other sequences already fill it, a
verify row slows their tokens too -- and drafts nothing while no K beats plain decoding.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from localrun.inference.generation.sampler import Sampler
from localrun.inference.generation.settings import SamplingOptions
from localrun.inference.llama.runtime import Batch, LlamaContext, LlamaModel, common_prefix

Mode = Literal["auto", "lookup", "draft", "off"]
K_MAX = 32  # drafted tokens per verify batch at most (the context reserves K_MAX + 1 logits rows)
K_FIXED = 8  # drafted tokens per verify batch where the controller does not judge (lookup, draft)
NGRAM_MAX, NGRAM_MIN = 4, 2


@dataclass(frozen=True)
class Evidence:
    """What a draft stands on: drafts standing on the same are accepted alike (Controller), and
    until they have been judged, with probability `prior` per token."""

    kind: str
    prior: float = 0.6


MODEL = Evidence("a draft model")


class Drafter(Protocol):
    free: bool  # drafting costs nothing worth counting (a lookup)

    def follow(self, history: list[int]) -> None:
        """Catch up with the history (read what it has not): not part of a draft's cost."""

    def draft(self, history: list[int], k: int) -> list[int]: ...
    def evidence(self) -> Evidence:
        """What its last draft stands on."""

    def close(self) -> None: ...


class LookupDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the last n tokens
    (n from NGRAM_MAX down to NGRAM_MIN) in the prompt and the reply so far. The n-gram index grows
    with the history, so a lookup costs a dictionary access, not a scan."""

    free = True
    MATCH_CAP = 32  # a match is followed back at most this far

    def __init__(self) -> None:
        self.seen = 0  # history length indexed
        self.match = 0  # how many tokens before the last draft agree with those before its source
        # n-gram -> (end of its latest occurrence, end of the one before), ends exclusive
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}

    def _index(self, history: list[int]) -> None:
        if len(history) < self.seen:  # a new history (another turn): start over
            self.seen, self.index = 0, {}
        for end in range(self.seen + 1, len(history) + 1):
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end >= n:
                    gram = tuple(history[end - n : end])
                    latest = self.index.get(gram)
                    self.index[gram] = (end, latest[0] if latest else -1)
        self.seen = len(history)

    def follow(self, history: list[int]) -> None:
        self._index(history)

    def draft(self, history: list[int], k: int) -> list[int]:
        self._index(history)
        end = len(history)
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            found = self.index.get(tuple(history[end - n :])) if end >= n else None
            if found is None:
                continue
            earlier = found[1] if found[0] == end else found[0]
            if earlier > 0:
                m = n
                while m < min(self.MATCH_CAP, earlier) and history[earlier - m - 1] == history[end - m - 1]:
                    m += 1
                self.match = m
                return history[earlier : earlier + k]
        return []

    def evidence(self) -> Evidence:
        """What the last draft stands on: its match's length, in classes of 2-3, 4-7, 8-15, ...
        tokens (a copy being followed matches far back, a common phrase a few tokens only, and
        their drafts are accepted very differently); until drafts of a class are judged, the rule
        of succession on its shortest match: m tokens in a row agreed, so the next agrees with
        probability (m + 1) / (m + 2)."""
        shortest = 1 << max(0, self.match.bit_length() - 1)
        return Evidence(f"a match of {shortest}+", (shortest + 1) / (shortest + 2))

    def close(self) -> None:
        pass


class ModelDrafter:
    """A small model of the same vocabulary, loaded once, drafting for every sequence of the
    target: its context has as many sequences, each following one of them (see SeqDrafter)."""

    free = False

    def __init__(self, model: LlamaModel, ctx: LlamaContext, n_seq: int = 1):
        self.model, self.ctx = model, ctx
        self.batch = Batch(ctx.n_batch, n_seq)
        self.sampler = Sampler(model, SamplingOptions(temperature=0, repeat_penalty=1.0), n_ctx=ctx.n_ctx)

    def close(self) -> None:
        self.batch.close()
        self.sampler.close()
        self.ctx.close()
        self.model.close()


class SeqDrafter:
    """The draft model's view of one sequence: its KV cells follow the sequence's history (only
    what changed is decoded, what the target rejected is dropped), then it proposes K tokens
    greedily."""

    free = False

    def __init__(self, drafter: ModelDrafter, seq: int):
        self.drafter, self.seq = drafter, seq
        self.cached: list[int] = []
        self.room = drafter.ctx.n_ctx // max(1, drafter.batch.n_seq)

    def _decode(self, tokens: list[int], start: int) -> None:
        d = self.drafter
        for at in range(0, len(tokens), d.batch.capacity):
            chunk = tokens[at : at + d.batch.capacity]
            d.batch.clear()
            for i, token in enumerate(chunk):
                d.batch.add(token, start + at + i, self.seq, at + i == len(tokens) - 1)
            d.ctx.decode_batch(d.batch)

    def follow(self, history: list[int]) -> None:
        """Its cells brought to the history, the last token decoded again if need be: the draft
        samples from the logits of this sequence's last decode."""
        if len(history) >= self.room:
            return
        keep = common_prefix(self.cached, history[:-1])
        if not self.drafter.ctx.drop(self.seq, keep, -1):
            self.drafter.ctx.drop(self.seq, 0, -1)
            keep = 0
        self._decode(history[keep:], keep)
        self.cached = list(history)

    def draft(self, history: list[int], k: int) -> list[int]:
        """Up to k tokens after the history (which follow() has brought its cache to)."""
        k = min(k, self.room - len(history) - 1)
        if k <= 0 or self.cached != history:
            return []
        d = self.drafter
        out: list[int] = []
        for _ in range(k):
            token = d.sampler.sample(d.ctx, d.batch.n_tokens - 1)
            out.append(token)
            if d.model.is_eog(token) or len(out) == k:
                break
            self._decode([token], len(self.cached))
            self.cached.append(token)
        return out

    def evidence(self) -> Evidence:
        return MODEL

    def close(self) -> None:
        pass


@dataclass
class SpecStats:
    drafted: int = 0  # tokens proposed and verified
    accepted: int = 0  # of those, the ones the target agreed with
    verify_batches: int = 0


class CostCurve:
    """What a decode of n tokens (each with its logits row) costs against one, measured as the
    batches go: per size, the median of its latest decodes (a decode slowed once by something
    else on the machine is outvoted, not averaged in and then trusted for as long as that size
    goes unmeasured); linear between sizes seen. Beyond the largest size seen the slope grows no
    faster than the guess of ROW per row: the small batches seen first are the least efficient per
    row (matrix-vector kernels; Gemma's 262k-row output layer is read again for every few rows),
    and their slope extended would price a wide verify batch at twice what it costs, so that it
    is never tried and never measured. Priced so, a wide batch is tried once where the acceptance
    makes it pay, and that try measures it."""

    KEEP = 5  # decodes remembered per size
    ROW = 0.3  # a guess: what one more row costs against a plain step (until measured)

    def __init__(self) -> None:
        self.seen: dict[int, deque[float]] = {}  # batch size -> its latest decodes' seconds
        self.times: dict[int, float] = {}  # batch size -> seconds per decode (their median)

    def observe(self, size: int, seconds: float) -> None:
        kept = self.seen.setdefault(size, deque(maxlen=self.KEEP))
        kept.append(seconds)
        self.times[size] = statistics.median(kept)

    def cost(self, n: int) -> float:
        """time(batch of n) / time(batch of 1); before any measurement the guess."""
        times = self.times
        one = times.get(1)
        if one is None or n <= 1:
            return 1.0 + self.ROW * max(0, n - 1)
        if n in times:
            return times[n] / one
        sizes = sorted(s for s in times if s > 1)
        below = max((s for s in sizes if s < n), default=1)
        above = min((s for s in sizes if s > n), default=None)
        if above is None:  # beyond the largest measured: its slope, at most the guess's
            slope = min((times[below] - one) / (below - 1) if below > 1 else self.ROW * one, self.ROW * one)
            return (times[below] + max(0.0, slope) * (n - below)) / one
        t_below = times[below]
        return (t_below + (times[above] - t_below) * (n - below) / (above - below)) / one


@dataclass
class Controller:
    """How many tokens one sequence drafts. With acceptance a per drafted token, K drafts yield
    E(K) = (1 - a^(K+1)) / (1 - a) tokens. In a batch of b rows (this sequence's and the others'),
    a plain step gives b tokens for time(b); K drafts give b - 1 + E(K) for time(b + K) (plus what
    a draft model spends). K maximises the ratio of the two; none while no K beats a plain step
    (then it probes again now and then, for the text may change).

    The acceptance a is that of a drafted token the model got to judge: a verify batch stops at
    the first rejected token, so the drafted tokens after it tell nothing (counted as rejected,
    a batch of 8 with its 5th rejected would read 4/8, not 4/5, and the wider the batch the
    lower the estimate: the controller would talk itself out of the wide batches a long copy
    pays for). It is kept per kind of evidence a draft stands on (a lookup's match length, see
    LookupDrafter.evidence; a draft model's): the draft of a copy being followed is accepted
    almost whole, one found after a common two-token phrase seldom, and one average of the two
    would verify the first too short and the second too long. Counts decay per verify batch, so
    an estimate follows the text; each starts as PRIOR_WEIGHT tokens at its evidence's prior, which decay as any
    count does (a prior kept for ever would cap the estimate of a long copy near 0.985, and with
    it the drafts that pay)."""

    adaptive: bool = True
    # evidence -> [drafted tokens accepted, drafted tokens judged (the accepted and the one
    # rejected)], decaying counts, the prior's first
    counts: dict[Evidence, list[float]] = field(default_factory=dict)
    evidence: Evidence = MODEL  # what the draft being verified stands on
    idle: int = 0  # plain steps since drafting was last judged not to pay
    draft_cost: float = 0.0  # seconds per drafted token, relative to a plain step (a draft model)
    PROBE_EVERY: int = 32
    SMOOTH: float = 0.15
    PRIOR_WEIGHT: float = 2.0
    DECAY: float = 0.85  # per verify batch: the counts of the last few batches decide

    def accept(self, evidence: Evidence = MODEL) -> float:
        """The estimated acceptance of a drafted token standing on `evidence`."""
        hits, judged = self._counts(evidence)
        return hits / judged

    def _counts(self, evidence: Evidence) -> list[float]:
        """[accepted, judged] of drafts standing on `evidence`; the prior's, before any."""
        return self.counts.setdefault(evidence, [evidence.prior * self.PRIOR_WEIGHT, self.PRIOR_WEIGHT])

    def expected(self, k: int, evidence: Evidence = MODEL) -> float:
        a = min(self.accept(evidence), 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def gain(self, k: int, busy: int, curve: CostCurve, evidence: Evidence = MODEL) -> float:
        """Tokens per unit of time with k drafts against a plain step (1.0), in a batch of `busy` rows."""
        plain = busy / curve.cost(busy)
        drafted = busy - 1 + self.expected(k, evidence)
        return drafted / (curve.cost(busy + k) + k * self.draft_cost) / plain

    def choose(self, available: int, busy: int, curve: CostCurve, evidence: Evidence = MODEL) -> int:
        """How many of `available` drafted tokens (standing on `evidence`) to verify (0: a plain
        step), beside busy - 1 other rows in the batch."""
        self.evidence = evidence
        if available <= 0:
            return 0
        if not self.adaptive:  # wider only where judged to pay: a fixed K of 32 wastes most rows
            return min(available, K_FIXED)
        best_k, best = 0, 1.0
        for k in range(1, min(available, K_MAX) + 1):
            gain = self.gain(k, busy, curve, evidence)
            if gain > best:
                best_k, best = k, gain
        if best_k == 0:
            self.idle += 1
            if self.idle >= self.PROBE_EVERY:  # look again: acceptance, or the batch's cost, may have changed
                self.idle = 0
                # as many as would be accepted: a probe also measures the batch size it would use
                return min(available, K_MAX, max(2, round(self.expected(K_MAX, evidence))))
        return best_k

    def observe_draft(self, relative_per_token: float) -> None:
        self.draft_cost += self.SMOOTH * (relative_per_token - self.draft_cost)

    def observe(self, drafted: int, accepted: int) -> None:
        """A verify batch's outcome: `accepted` of its `drafted` tokens, then (if any was not) the
        one rejected; the rest were not judged."""
        if drafted:
            kept = self._counts(self.evidence)
            kept[0] = self.DECAY * kept[0] + accepted
            kept[1] = self.DECAY * kept[1] + accepted + (accepted < drafted)


class Speculator:
    """What speculative decoding may use for a context: prompt lookup (every sequence its own
    index), a draft model (one, with a sequence per target sequence), the cost curve."""

    def __init__(self, mode: Mode, drafters: list):
        self.mode, self.drafters = mode, drafters
        self.stats = SpecStats()  # over every sequence and reply
        self.lookup = any(isinstance(d, LookupDrafter) for d in drafters)
        self.model: ModelDrafter | None = next((d for d in drafters if isinstance(d, ModelDrafter)), None)
        self.curve = CostCurve()

    def close(self) -> None:
        if self.model is not None:
            self.model.close()

    def for_sequence(self, seq: int) -> tuple[LookupDrafter | None, SeqDrafter | None]:
        """Sequence `seq`'s own drafters."""
        lookup = LookupDrafter() if self.lookup else None
        return lookup, SeqDrafter(self.model, seq) if self.model is not None else None

    def draft(self, seq_drafters: tuple, controller: Controller, history: list[int], k: int, busy: int) -> list[int]:
        """The tokens to verify after the history, at most k, beside busy - 1 other rows: the
        first drafter's proposal (prompt lookup first: it is free, so it proposes k and the
        controller, knowing what the proposal stands on, keeps as many as pay), as many as the
        controller wants. What a draft model spends per token is measured against a plain step (not
        the reading it does to catch up: a long prompt would look like slow drafting)."""
        for drafter in seq_drafters:
            if drafter is None:
                continue
            drafter.follow(history)
            if drafter.free:
                proposed = drafter.draft(history, k)
                if proposed:
                    return proposed[: controller.choose(len(proposed), busy, self.curve, drafter.evidence())]
                continue
            want = controller.choose(k, busy, self.curve, drafter.evidence())
            if not want:
                return []
            started = time.perf_counter()
            proposed = drafter.draft(history, want)
            if proposed:
                one = self.curve.times.get(1)
                if one:
                    controller.observe_draft((time.perf_counter() - started) / len(proposed) / one)
                return proposed[:want]
        return []
