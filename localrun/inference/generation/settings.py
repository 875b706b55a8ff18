"""Sampling and reply settings, with the one table of their bounds: the command-line options and
the REPL's /set check values against it, so neither accepts what the other refuses."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from localrun.errors import UsageError
from localrun.text import safe


@dataclass
class SamplingOptions:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    repeat_last_n: int = 64
    seed: int | None = None
    ban_eog: bool = False  # never sample end-of-generation tokens (fixed-length runs, benchmarks)
    # OpenAI's penalties, over the last repeat_last_n tokens (as llama-server): minus count * frequency
    # and minus presence for a token seen at all; and additive biases per token id (the server's)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class Bound:
    """A setting's type and range. `limit` names a bound that follows from the loaded model,
    checked once it is known (check_bounds): "n_ctx", its context, or "n_vocab", its vocabulary."""

    kind: type
    low: float | None = None
    high: float | None = None
    limit: str | None = None

    def describe(self, value: float | None = None) -> str:
        """The range, or the side of it that `value` is beyond."""
        high = {"n_ctx": "the context size", "n_vocab": "the vocabulary size"}.get(self.limit or "", self.high)
        high_text = high if isinstance(high, str) else None if high is None else format(high, "g")
        known = value is not None and math.isfinite(value)
        if high_text is None or (known and self.low is not None and value < self.low):  # type: ignore[operator]
            return f"at least {self.low:g}"
        if known and self.limit:  # beyond what this model allows
            return f"at most {high_text}"
        return f"between {self.low:g} and {high_text}"

    def allows(self, value: float, figures: dict[str, int] | None = None) -> bool:
        """Whether `value` is a finite number within the range; a bound that follows from the
        model (`limit`) counts only with the model's `figures`."""
        high = (figures or {}).get(self.limit) if self.limit else self.high
        return math.isfinite(value) and (self.low is None or value >= self.low) and (high is None or value <= high)


SEED_MAX = 2**64 - 1  # OpenAI's seed is a 64-bit integer; llama.cpp's is 32 bits (see llama_seed)
# name -> its type and range, for the command line, /set and every API of the server alike;
# "seed" also takes "random", "max_tokens" also "none"
BOUNDS: dict[str, Bound] = {
    "temperature": Bound(float, 0.0, 100.0),
    "top_p": Bound(float, 0.0, 1.0),
    "top_k": Bound(int, 0, limit="n_vocab"),
    "min_p": Bound(float, 0.0, 1.0),
    "repeat_penalty": Bound(float, 0.0, 100.0),
    "repeat_last_n": Bound(int, -1, limit="n_ctx"),  # -1: every token so far
    "seed": Bound(int, 0, SEED_MAX),
    "max_tokens": Bound(int, 1, 2**31 - 1),
    "presence_penalty": Bound(float, -2.0, 2.0),
    "frequency_penalty": Bound(float, -2.0, 2.0),
}
TOP_LOGPROBS_MAX = 20  # alternatives per token with logprobs (OpenAI's top_logprobs bound)
MAX_STOPS = 16  # stop strings in one request or setting
MAX_STOP_CHARS = 1024  # characters of one stop string (the reply holds back as many while it may be one)


class OutOfBounds(UsageError):
    """A setting outside its range; `name` is the setting."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name

    @classmethod
    def of(cls, name: str, value: object) -> OutOfBounds:
        number = value if isinstance(value, (int, float)) else None
        return cls(name, f"{name} must be {BOUNDS[name].describe(number)} (got {safe(str(value))[:40]})")


def check_bounds(s: SamplingOptions, n_ctx: int, n_vocab: int) -> None:
    """OutOfBounds for a setting outside its range, the model's own limits included: a value
    sizes what llama.cpp allocates (repeat_last_n cells per request), so none may pass unchecked."""
    figures = {"n_ctx": n_ctx, "n_vocab": n_vocab}
    for name, bound in BOUNDS.items():
        value = getattr(s, name, None)
        if value is None:
            continue
        if not bound.allows(value, figures):
            raise OutOfBounds.of(name, value)


def check_stops(stops: list[str]) -> None:
    """UsageError for more stop strings, or a longer one, than a reply can watch for cheaply."""
    if len(stops) > MAX_STOPS:
        raise OutOfBounds("stop", f"at most {MAX_STOPS} stop strings (got {len(stops)})")
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise OutOfBounds("stop", f"a stop string may have at most {MAX_STOP_CHARS} characters (got {longest:,})")


def llama_seed(seed: int | None) -> int:
    """A 64-bit seed folded into llama.cpp's 32 bits; None (and the one value llama.cpp reads as
    "random") becomes its random seed."""
    if seed is None:
        return 0xFFFFFFFF  # LLAMA_DEFAULT_SEED
    folded = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    return min(folded, 0xFFFFFFFE)


UNSET = {"seed": "random", "max_tokens": "none"}  # the word for "no value" where None is allowed
SETTABLE = (*BOUNDS, "stop", "grammar", "json_schema")


def check_structure(sampling: SamplingOptions, grammar: str | None) -> None:
    """A grammar ends a reply where it is complete (only an end-of-text token is left): with end
    of text banned nothing could be sampled, and llama.cpp's grammar would abort the process."""
    if grammar and sampling.ban_eog:
        raise UsageError(
            "ignoring the end of text (--ignore-eos, ignore_eos) cannot go with a grammar: "
            "the reply must be able to end where the grammar is complete"
        )


@dataclass
class Settings:
    """What /set changes: sampling, reply length, stop strings."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_tokens: int | None = None  # None: until end of generation or the context is full
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None  # GBNF the reply must follow (--grammar, --json-schema)
    grammar_source: str = ""  # where it came from, to show
    from_schema: bool = False  # the grammar was made from a JSON schema (shown as json_schema)
    logprobs: int | None = None  # each token's log-probability and this many alternatives (--json)

    def __post_init__(self) -> None:
        check_stops(self.stop)

    def set(self, name: str, value: str, figures: dict[str, int] | None = None) -> str:
        """Change one setting from its text; UsageError names the accepted values. `figures`
        (n_ctx, n_vocab) hold a bound that follows from the loaded model to it at once."""
        key = name.replace("-", "_").lower()
        if key == "stop":  # one stop string (\n for a newline); "none" clears
            stop = [] if value.lower() == "none" else [value.replace("\\n", "\n")]
            check_stops(stop)
            self.stop = stop
        elif key in ("grammar", "json_schema"):  # a file (or, for a schema, JSON); "none" clears
            from localrun.inference.generation import grammar as grammars  # not at import: --help reads BOUNDS

            found = (
                None
                if value.lower() == "none"
                else (
                    grammars.from_file(Path(value).expanduser())
                    if key == "grammar"
                    else grammars.from_json_schema(value)
                )
            )
            check_structure(self.sampling, found.gbnf if found else None)
            self.grammar, self.grammar_source = (found.gbnf, found.source) if found else (None, "")
            self.from_schema = found is not None and key == "json_schema"
        elif key in BOUNDS:
            parsed = self._parse(key, name, value, figures)
            target = self if key == "max_tokens" else self.sampling
            setattr(target, key, parsed)
        else:
            raise UsageError(f"unknown setting {safe(name)!r}", hint="settings: " + ", ".join(SETTABLE))
        return f"{key} = {self.describe()[key]}"

    @staticmethod
    def _parse(key: str, name: str, value: str, figures: dict[str, int] | None) -> int | float | None:
        bound = BOUNDS[key]
        unset = UNSET.get(key)
        if unset and value.lower() == unset:
            return None
        try:
            number = bound.kind(value)
        except ValueError:
            raise UsageError(f"bad value for {safe(name)}: {safe(value)!r}") from None
        if not bound.allows(number, figures):
            also = f", or {unset}" if unset else ""
            raise UsageError(f"{key} must be {bound.describe(number)}{also} (got {safe(value)})")
        return number

    def values(self) -> dict[str, int | float | None]:
        """The numeric settings as they are typed (None where unset)."""
        return {key: getattr(self if key == "max_tokens" else self.sampling, key) for key in BOUNDS}

    def describe(self) -> dict[str, str]:
        """Every setting as it reads: numbers as numbers, words for unset, stop strings quoted."""
        shown = {key: UNSET[key] if value is None else str(value) for key, value in self.values().items()}
        shown["stop"] = ", ".join(json.dumps(s, ensure_ascii=False) for s in self.stop) or "none"
        structure = self.grammar_source or "none"
        shown["grammar"] = "made from the json_schema" if self.from_schema else structure
        shown["json_schema"] = structure if self.from_schema else "none"
        return shown
