"""Speculative decoding, exact: drafts proposed cheaply, verified by the model in one batch.

A verify batch holds the last sampled token and K drafted ones, with logits at every position.
The target's sampler then samples each position in turn, exactly as plain decoding would (the
same chain, the same random draws in the same order), and stops at the first token that differs
from the draft: that token is the correction, the drafted tokens after it are dropped from the KV
cache. Every token emitted is one plain decoding would emit from those logits, so the output's
distribution is unchanged, at any temperature. For a deterministic draft this accepts drafted
token x with probability p(x), the same as the min(1, p/q) rule with q a point mass.

Drafts come from the prompt and the reply so far (prompt lookup: what followed the last earlier
occurrence of the current n-gram) or from a small draft model that shares the vocabulary. The
Controller keeps it paying: it measures what a verify batch of each size costs against one plain
step and how often drafts are accepted, picks the K with the best expected tokens per unit of
time, and drafts nothing while no K beats plain decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from localrun.inference.runtime import LlamaContext, LlamaModel, common_prefix
from localrun.inference.sampler import Batch, Sampler
from localrun.inference.sampling import SamplingOptions

Mode = Literal["auto", "lookup", "draft", "off"]
K_MAX = 8  # drafted tokens per verify batch at most (the context reserves K_MAX + 1 logits rows)
NGRAM_MAX, NGRAM_MIN = 4, 2


class Drafter(Protocol):
    free: bool  # drafting costs nothing worth counting (a lookup)

    def follow(self, history: list[int]) -> None:
        """Catch up with the history (read what it has not): not part of a draft's cost."""

    def draft(self, history: list[int], k: int) -> list[int]: ...
    def close(self) -> None: ...


class LookupDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the last n tokens
    (n from NGRAM_MAX down to NGRAM_MIN) in the prompt and the reply so far. The n-gram index grows
    with the history, so a lookup costs a dictionary access, not a scan."""

    free = True

    def __init__(self) -> None:
        self.seen = 0  # history length indexed
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
                return history[earlier : earlier + k]
        return []

    def close(self) -> None:
        pass


class ModelDrafter:
    """A small model of the same vocabulary proposes K tokens greedily; its own KV cache follows
    the conversation (only what changed is decoded) and drops what the target rejected."""

    free = False

    def __init__(self, model: LlamaModel, ctx: LlamaContext):
        self.model, self.ctx = model, ctx
        self.cached: list[int] = []
        self.sampler = Sampler(model, SamplingOptions(temperature=0, repeat_penalty=1.0), n_ctx=ctx.n_ctx)

    def follow(self, history: list[int]) -> None:
        """Its KV cache brought to the history: what the target rejected dropped, the rest read."""
        if len(history) >= self.ctx.n_ctx or self.cached == history:
            return
        keep = common_prefix(self.cached, history[:-1])
        if not self.ctx.truncate(keep):
            keep = 0
        self.ctx.decode(history[keep:])
        self.cached = list(history)

    def draft(self, history: list[int], k: int) -> list[int]:
        """Up to k tokens after the history (which follow() has brought its cache to)."""
        k = min(k, self.ctx.n_ctx - len(history) - 1)
        if k <= 0:
            return []
        out: list[int] = []
        for _ in range(k):
            token = self.sampler.sample(self.ctx)
            out.append(token)
            if self.model.is_eog(token) or len(out) == k:
                break
            self.ctx.decode([token])
            self.cached.append(token)
        return out

    def close(self) -> None:
        self.sampler.close()
        self.ctx.close()
        self.model.close()


@dataclass
class SpecStats:
    drafted: int = 0  # tokens proposed and verified
    accepted: int = 0  # of those, the ones the target agreed with
    verify_batches: int = 0


@dataclass
class Controller:
    """Chooses how many tokens to draft. Tokens per verify batch of K drafts, with acceptance a per
    drafted token: E(K) = (1 - a^(K+1)) / (1 - a); its cost c(K) = time(batch of K+1) / time(one
    step), measured as it goes. Drafts K maximising E/c, none while that is below 1 (then it
    probes again now and then, for the text may change)."""

    adaptive: bool = True
    accept: float = 0.6  # running estimate of the acceptance per drafted token
    times: dict[int, float] = field(default_factory=dict)  # batch size -> running seconds per decode
    idle: int = 0  # plain steps since drafting was last judged not to pay
    PROBE_EVERY: int = 32
    SMOOTH: float = 0.15

    def cost(self, k: int) -> float:
        """A batch of k+1 tokens against one, from what was measured (linear between sizes seen)."""
        one = self.times.get(1)
        if one is None:
            return 1.0 + 0.3 * k  # before any measurement: a mild guess
        sizes = sorted(n for n in self.times if n > 1)
        n = k + 1
        if n in self.times:
            return self.times[n] / one
        below = max((s for s in sizes if s < n), default=1)
        above = min((s for s in sizes if s > n), default=None)
        if above is None:  # beyond the largest measured: extend the slope seen so far
            slope = (self.times[below] - one) / (below - 1) if below > 1 else 0.3 * one
            return (self.times[below] + slope * (n - below)) / one
        t_below = self.times[below]
        return (t_below + (self.times[above] - t_below) * (n - below) / (above - below)) / one

    def gain(self, k: int) -> float:
        """Expected tokens per unit of time with k drafts, against a plain step (1.0)."""
        one = self.times.get(1)
        drafting = k * self.draft_cost / one if one else 0.0
        return self.expected(k) / (self.cost(k) + drafting)

    def expected(self, k: int) -> float:
        a = min(self.accept, 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def choose(self, available: int) -> int:
        """How many of the `available` drafted tokens to verify (0: a plain step)."""
        if available <= 0:
            return 0
        if not self.adaptive:
            return min(available, K_MAX)
        best_k, best = 0, 1.0
        for k in range(1, min(available, K_MAX) + 1):
            gain = self.gain(k)
            if gain > best:
                best_k, best = k, gain
        if best_k == 0:
            self.idle += 1
            if self.idle >= self.PROBE_EVERY:  # look again: acceptance may have changed
                self.idle = 0
                return min(available, 2)
        return best_k

    draft_cost: float = 0.0  # seconds a drafted token costs (a draft model; prompt lookup is free)

    def observe_draft(self, seconds_per_token: float) -> None:
        self.draft_cost += self.SMOOTH * (seconds_per_token - self.draft_cost)

    def observe(self, batch_size: int, seconds: float, drafted: int = 0, accepted: int = 0) -> None:
        old = self.times.get(batch_size)
        self.times[batch_size] = seconds if old is None else old + self.SMOOTH * (seconds - old)
        if drafted:
            rate = accepted / drafted
            self.accept += self.SMOOTH * min(drafted, 4) / 4 * (rate - self.accept)


def timed_decode(ctx: LlamaContext, batch: Batch) -> float:
    started = time.perf_counter()
    ctx.decode_batch(batch)
    return time.perf_counter() - started


class Speculator:
    """Plain steps and verify steps for one engine: decides whether to draft (the Controller),
    asks the drafters (prompt lookup first: it is free; then the draft model), verifies."""

    def __init__(self, mode: Mode, drafters: list[Drafter]):
        self.drafters = drafters
        self.controller = Controller(adaptive=mode == "auto")
        self.batch = Batch(K_MAX + 1)
        self.stats = SpecStats()

    def close(self) -> None:
        for drafter in self.drafters:
            drafter.close()
        self.batch.close()

    def _draft(self, history: list[int], k: int) -> list[int]:
        """The first drafter's proposal; what a costly one spends per token is measured (not the
        reading it does to catch up: a long prompt would look like slow drafting)."""
        for drafter in self.drafters:
            drafter.follow(history)
            started = time.perf_counter()
            proposed = drafter.draft(history, k)
            if proposed:
                if not drafter.free:
                    self.controller.observe_draft((time.perf_counter() - started) / len(proposed))
                return proposed
        return []

    def step(
        self, ctx: LlamaContext, sampler: Sampler, cached: list[int], pending: int, history: list[int], room: int
    ) -> list[int]:
        """Decode `pending` (with a draft after it when that pays) and return the tokens sampled: one
        on a plain step, up to K+1 on a verify. `cached` (what the KV cache holds) is kept true."""
        k = min(K_MAX, room - 1, ctx.n_ctx - len(cached) - 2)
        draft: list[int] = []
        want = self.controller.choose(k) if k > 0 else 0  # how many drafted tokens would pay
        if want:
            draft = self._draft(history, want)[:want]
        if not draft:
            started = time.perf_counter()
            ctx.decode([pending])
            self.controller.observe(1, time.perf_counter() - started)
            cached.append(pending)
            return [sampler.sample(ctx, -1)]
        batch = self.batch
        batch.clear()
        start = len(cached)
        for i, token in enumerate([pending, *draft]):
            batch.add(token, start + i, 0, True)
        seconds = timed_decode(ctx, batch)
        out: list[int] = []
        for i in range(len(draft) + 1):
            token = sampler.sample(ctx, i)
            out.append(token)
            if i == len(draft) or token != draft[i]:
                break
        accepted = len(out) - 1
        cached += [pending, *draft[:accepted]]
        if accepted < len(draft) and not ctx.drop(0, len(cached)):
            raise RuntimeError("the KV cache cannot drop rejected draft tokens")  # checked at load: never
        self.stats.drafted += len(draft)
        self.stats.accepted += accepted
        self.stats.verify_batches += 1
        self.controller.observe(len(draft) + 1, seconds, len(draft), accepted)
        return out
