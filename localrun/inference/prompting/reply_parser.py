"""The one incremental parser of a model's reply: reasoning, the answer, and tool calls, streamed
as deltas from text that arrives in pieces of any size.

Why the split does not depend on where the pieces are cut: every decision is taken at a position
of the whole text, on the text before it and the markers at it. Text from the first position
where a marker could still begin (a proper prefix of one) is held back until the marker is
complete or ruled out, so a partial tag is never emitted; whitespace at the end of a stretch of
text is held until the next character shows whether it touches a marker (whitespace touching a
marker is dropped, as the `\\n` around `<think>` and between calls). A tool call is held whole
until its end, then read: well-formed, it streams as its id and name, then its arguments; not,
its text comes back as content beside a MalformedCall -- never an exception, never lost text.
Holding a call whole is what lets a malformed one be given back; a caller that constrains calls
with a grammar gets well-formed ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from localrun.inference.prompting.call_formats import CallError, Schemas
from localrun.inference.prompting.families import CallSyntax, ReasoningFormat, ToolFormat, openai_call_id
from localrun.inference.prompting.markers import PARTIAL, Literal, Marker, earliest
from localrun.inference.prompting.replies import (
    ContentText,
    Delta,
    MalformedCall,
    ParsedReply,
    ReasoningText,
    ToolCallArguments,
    ToolCallStart,
    assemble,
    merged,
)


class _Mode(Enum):
    REASONING = "reasoning"
    CONTENT = "content"
    CALL = "call"


class _Act(Enum):
    OPEN_REASONING = "open reasoning"
    CLOSE_REASONING = "close reasoning"
    FRAMING = "framing"
    CALL = "call"


@dataclass(frozen=True)
class _Rule:
    marker: Marker
    act: _Act
    call: CallSyntax | None = None


class ReplyParser:
    """Feed it the reply's text as it comes; it returns what can be told for certain so far."""

    def __init__(
        self,
        reasoning: ReasoningFormat | None,
        tools: ToolFormat | None,
        *,
        starts_in_reasoning: bool = False,
        schemas: Schemas | None = None,
        make_id: Callable[[int], str] | None = None,
    ) -> None:
        """`reasoning` and `tools` as detected (None: not parsed; pass tools=None when the request
        has none); `starts_in_reasoning` when the prompt left the reasoning open; `schemas` the
        tools' parameter schemas by name (some formats write values untyped); `make_id` the id of
        a call the model gave none (by default, the family's)."""
        self._schemas: Schemas = schemas or {}
        self._make_id = make_id or (tools.make_id if tools else openai_call_id)
        framing = tuple(dict.fromkeys((reasoning.framing if reasoning else ()) + (tools.framing if tools else ())))
        frame_rules = tuple(_Rule(Literal(f), _Act.FRAMING) for f in framing)
        syntaxes = tools.calls if tools else ()
        call_rules = tuple(_Rule(c.trigger, _Act.CALL, c) for c in syntaxes if not c.anchored)
        open_rules = tuple(_Rule(Literal(s), _Act.OPEN_REASONING) for s in (reasoning.start if reasoning else ()))
        self._before_answer = open_rules + frame_rules + call_rules
        self._after_answer = (
            (open_rules if reasoning and not reasoning.only_at_start else ()) + frame_rules + call_rules
        )
        self._in_reasoning = tuple(
            _Rule(Literal(e), _Act.CLOSE_REASONING) for e in (reasoning.end if reasoning else ())
        )
        self._anchored = tuple(c for c in syntaxes if c.anchored)
        self._next_triggers = tuple(c.trigger for c in syntaxes if not c.anchored)

        self._mode = _Mode.REASONING if starts_in_reasoning and reasoning else _Mode.CONTENT
        self._pending = ""  # text not yet told
        self._held = ""  # whitespace at the end of the text told so far
        self._after_marker = self._mode is _Mode.REASONING  # the prompt's own marker counts
        self._answered = False  # content or a call has come: no reasoning opens now
        self._calls = 0
        self._out: list[Delta] = []
        # the call being read
        self._call: CallSyntax | None = None
        self._call_head = ""  # its trigger
        self._call_lead = ""  # the whitespace before it, given back with a malformed call
        self._call_scanned = 0  # where the search for its end resumes

    @property
    def reasoning(self) -> bool:
        """Whether the text so far leaves the model inside its reasoning."""
        return self._mode is _Mode.REASONING

    def feed(self, text: str) -> list[Delta]:
        self._pending += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        """The rest, once the reply has ended: held text is told, an open call is read or given back."""
        self._advance(final=True)
        if self._held:
            self._emit_text(self._held)
            self._held = ""
        return self._take()

    def _take(self) -> list[Delta]:
        out, self._out = merged(self._out), []
        return out

    def _advance(self, final: bool) -> None:
        while self._pending or (final and self._mode is _Mode.CALL):
            if self._mode is _Mode.CALL:
                if not self._advance_call(final):
                    return
                continue
            if not self._answered and self._anchored and self._mode is _Mode.CONTENT:
                if not self._try_anchored(final):
                    return
                if self._mode is _Mode.CALL:
                    continue
            rules = self._rules()
            found = earliest(self._pending, 0, tuple(r.marker for r in rules), final)
            if found is None:
                self._text(self._pending)
                self._pending = ""
                return
            pos, end, index = found
            self._text(self._pending[:pos])
            if end == PARTIAL:
                self._pending = self._pending[pos:]
                return
            if self._rules() is not rules:  # the text just told began the answer: other markers count now
                self._pending = self._pending[pos:]
                continue
            head, self._pending = self._pending[pos:end], self._pending[end:]
            self._apply(rules[index], head)

    def _rules(self) -> tuple[_Rule, ...]:
        if self._mode is _Mode.REASONING:
            return self._in_reasoning
        return self._after_answer if self._answered else self._before_answer

    def _try_anchored(self, final: bool) -> bool:
        """A trigger that counts only at the start of the answer; False to wait for more text."""
        stripped = self._pending.lstrip()
        if not stripped:
            return True
        at = len(self._pending) - len(stripped)
        for syntax in self._anchored:
            end = syntax.trigger.match(self._pending, at)
            if end == PARTIAL and not final:
                self._text(self._pending[:at])
                self._pending = self._pending[at:]
                return False
            if end is not None and end != PARTIAL:
                self._text(self._pending[:at])
                head, self._pending = self._pending[at:end], self._pending[end:]
                self._open_call(syntax, head)
                return True
        return True

    def _apply(self, rule: _Rule, head: str) -> None:
        if rule.act is _Act.CALL:
            assert rule.call is not None
            self._open_call(rule.call, head)
            return
        self._boundary()
        if rule.act is _Act.OPEN_REASONING:
            self._mode = _Mode.REASONING
        elif rule.act is _Act.CLOSE_REASONING:
            self._mode = _Mode.CONTENT

    def _boundary(self) -> None:
        """A marker: whitespace touching it on either side is dropped."""
        self._held = ""
        self._after_marker = True

    def _open_call(self, syntax: CallSyntax, head: str) -> None:
        self._call, self._call_head, self._call_lead = syntax, head, self._held
        self._call_scanned = 0
        self._held = ""
        self._answered = True
        self._mode = _Mode.CALL

    def _advance_call(self, final: bool) -> bool:
        """Look for the call's end; read the call when found (or at the reply's end). False to wait."""
        syntax = self._call
        assert syntax is not None
        if syntax.close is not None:
            at = self._pending.find(syntax.close, self._call_scanned)
            if at >= 0:
                body, self._pending = self._pending[:at], self._pending[at + len(syntax.close) :]
                self._end_call(body, syntax.close, closed=True)
                return True
            self._call_scanned = max(0, len(self._pending) - len(syntax.close) + 1)
            if not final:
                return False
            body, self._pending = self._pending, ""
            self._end_call(body, "", closed=syntax.close_optional)
            return True
        found = earliest(self._pending, self._call_scanned, self._next_triggers, final)
        if found is not None and found[1] != PARTIAL:
            body, self._pending = self._pending[: found[0]], self._pending[found[0] :]
            self._end_call(body, "", closed=True)
            return True
        if not final:
            self._call_scanned = found[0] if found is not None else len(self._pending)
            return False
        body, self._pending = self._pending, ""
        self._end_call(body, "", closed=True)
        return True

    def _end_call(self, body: str, close: str, closed: bool) -> None:
        syntax = self._call
        assert syntax is not None
        raw = self._call_head + body + close
        self._call = None
        self._mode = _Mode.CONTENT
        if not closed:
            self._malformed(f"the call was not closed by {syntax.close}", raw)
            return
        try:
            calls = syntax.reader(self._call_head + body if syntax.keep_trigger else body, self._schemas)
        except CallError as exc:
            self._malformed(str(exc), raw)
            return
        except RecursionError:  # JSON nested deeper than Python's decoder goes
            self._malformed("the call nests too deeply", raw)
            return
        for call in calls:
            index = self._calls
            self._calls += 1
            self._out.append(ToolCallStart(index, call.id or self._make_id(index), call.name))
            self._out.append(ToolCallArguments(index, json.dumps(call.arguments, ensure_ascii=False)))
        self._boundary()

    def _malformed(self, reason: str, raw: str) -> None:
        """The call's text comes back as content, as the model wrote it."""
        self._out.append(MalformedCall(reason, raw))
        self._after_marker = False
        self._text(self._call_lead + raw)

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._after_marker:
            text = text.lstrip()
            if not text:
                return
            self._after_marker = False
        text = self._held + text
        core = text.rstrip()
        self._held = text[len(core) :]
        if core:
            self._emit_text(core)

    def _emit_text(self, text: str) -> None:
        if self._mode is _Mode.REASONING:
            self._out.append(ReasoningText(text))
        else:
            self._out.append(ContentText(text))
            if text.strip():
                self._answered = True


def parse(
    text: str,
    reasoning: ReasoningFormat | None,
    tools: ToolFormat | None,
    *,
    starts_in_reasoning: bool = False,
    schemas: Schemas | None = None,
    make_id: Callable[[int], str] | None = None,
) -> ParsedReply:
    """A whole reply at once, by the same parser."""
    parser = ReplyParser(reasoning, tools, starts_in_reasoning=starts_in_reasoning, schemas=schemas, make_id=make_id)
    return assemble(parser.feed(text) + parser.finish())
