"""A thinking model's reasoning followed token by token as the core generates it (the core's
Watch): its tokens counted, and once a budget of them is spent, its closing marker forced so the
answer follows (`--reasoning-budget N`; 0 closes it at once).

The reasoning is told apart by the one reply parser, fed each token's text: a token counts as
reasoning when the reasoning was open before it (so its closing marker counts, and an opening
marker the model writes does not)."""

from __future__ import annotations

from localrun.inference.prompting.families import ReasoningFormat
from localrun.inference.prompting.reply_parser import ReplyParser


class ReasoningWatch:
    def __init__(
        self,
        fmt: ReasoningFormat,
        *,
        starts_in_reasoning: bool,
        budget: int | None = None,
        closing: list[int] | None = None,
    ):
        """`budget`: reasoning tokens the model may write before `closing` (the tokens of the
        format's closing marker) is forced; None: no limit, only counted."""
        self._parser = ReplyParser(fmt, None, starts_in_reasoning=starts_in_reasoning)
        self.budget = budget
        self.closing = list(closing or [])
        self.spent = 0  # reasoning tokens the model wrote
        self._closing = 0  # forced tokens not yet seen

    def start(self) -> list[int]:
        return self._due()

    def see(self, text: str) -> tuple[bool, list[int]]:
        was = self._parser.reasoning
        self._parser.feed(text)
        if self._closing:
            self._closing -= 1
        elif was:
            self.spent += 1
        return was, self._due()

    def _due(self) -> list[int]:
        """The closing marker, when the budget is spent with the reasoning open (again, in a
        format that may open it later: harmony)."""
        if self._closing or self.budget is None or not self.closing:
            return []
        if self._parser.reasoning and self.spent >= self.budget:
            self._closing = len(self.closing)
            return list(self.closing)
        return []
