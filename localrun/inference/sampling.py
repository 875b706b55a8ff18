"""Sampling and reply settings, with the one table of their bounds: the command-line options and
the REPL's /set check values against it, so neither accepts what the other refuses."""

from __future__ import annotations

import json
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
    kind: type
    low: float | None = None
    high: float | None = None

    def describe(self) -> str:
        if self.high is not None:
            return f"between {self.low:g} and {self.high:g}"
        return f"at least {self.low:g}"


# name -> its type and range; "seed" also takes "random", "max_tokens" also "none"
BOUNDS: dict[str, Bound] = {
    "temperature": Bound(float, 0.0),
    "top_p": Bound(float, 0.0, 1.0),
    "top_k": Bound(int, 0),
    "min_p": Bound(float, 0.0, 1.0),
    "repeat_penalty": Bound(float, 0.0),
    "repeat_last_n": Bound(int, -1),
    "seed": Bound(int, 0),
    "max_tokens": Bound(int, 1),
}
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

    def set(self, name: str, value: str) -> str:
        """Change one setting from its text; UsageError names the accepted values."""
        key = name.replace("-", "_").lower()
        if key == "stop":  # one stop string (\n for a newline); "none" clears
            self.stop = [] if value.lower() == "none" else [value.replace("\\n", "\n")]
        elif key in ("grammar", "json_schema"):  # a file (or, for a schema, JSON); "none" clears
            from localrun.inference import grammar as grammars  # not at import: --help reads BOUNDS

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
            parsed = self._parse(key, name, value)
            target = self if key == "max_tokens" else self.sampling
            setattr(target, key, parsed)
        else:
            raise UsageError(f"unknown setting {safe(name)!r}", hint="settings: " + ", ".join(SETTABLE))
        return f"{key} = {self.describe()[key]}"

    @staticmethod
    def _parse(key: str, name: str, value: str) -> int | float | None:
        bound = BOUNDS[key]
        unset = UNSET.get(key)
        if unset and value.lower() == unset:
            return None
        try:
            number = bound.kind(value)
        except ValueError:
            raise UsageError(f"bad value for {safe(name)}: {safe(value)!r}") from None
        if (bound.low is not None and number < bound.low) or (bound.high is not None and number > bound.high):
            also = f", or {unset}" if unset else ""
            raise UsageError(f"{key} must be {bound.describe()}{also} (got {safe(value)})")
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
