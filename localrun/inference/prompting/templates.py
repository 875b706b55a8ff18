"""Chat templates: the model's own (Jinja from the GGUF metadata, rendered in a sandbox) or a
named built-in format, chosen explicitly and announced when the model has none."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError

from localrun.errors import BadModel, LocalrunError, UsageError
from localrun.inference.prompting import sandbox
from localrun.text import safe

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}

# Built-in formats for models without a template. Each is a Jinja template in the same
# dialect as the ones shipped in GGUF files, plus the text that ends a turn.
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_GEMMA = (
    "{{ bos_token }}{% set sys = namespace(text='') %}"
    "{% for m in messages %}{% if m.role == 'system' %}{% set sys.text = m.content + '\n\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
    "{% if m.role == 'user' %}{{ sys.text }}{% set sys.text = '' %}{% endif %}"
    "{{ m.content | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_PLAIN = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% else %}{{ 'User' if m.role == 'user' else 'Assistant' }}: {{ m.content | trim }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
_RAW = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"


@dataclass(frozen=True)
class Format:
    name: str
    source: str
    stop: tuple[str, ...] = ()  # turn-ending text, for models that do not mark it as end-of-generation
    marker: str | None = None  # a special token whose presence in the vocabulary suggests this format


FORMATS: dict[str, Format] = {
    "chatml": Format("chatml", _CHATML, ("<|im_end|>", "<|im_start|>"), "<|im_start|>"),
    "gemma": Format("gemma", _GEMMA, ("<end_of_turn>", "<start_of_turn>"), "<start_of_turn>"),
    "llama3": Format("llama3", _LLAMA3, ("<|eot_id|>", "<|start_header_id|>"), "<|start_header_id|>"),
    "plain": Format("plain", _PLAIN, ("\nUser:", "\n\nUser")),
    "raw": Format("raw", _RAW),
}


def _raise(message: str) -> None:
    raise UsageError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@dataclass
class ChatTemplate:
    """A compiled template and where it came from (for /model and the fallback notice)."""

    source: str
    origin: str  # "model", "file PATH", or "built-in NAME"
    bos_token: str = ""
    eos_token: str = ""
    stop: tuple[str, ...] = ()
    _compiled: Template | None = field(default=None, repr=False)

    def _broken(self, what: str) -> LocalrunError:
        """A template that fails is a bad model when it came with the model, else a bad argument."""
        hint = "use --chat-format NAME or --template FILE"
        if self.origin == "model":
            return BadModel(f"the model's chat template {what}", hint=hint)
        return UsageError(f"the chat template ({self.origin}) {what}", hint=hint)

    def render_parts(
        self, messages: list[Message], add_generation_prompt: bool = True, **context: Any
    ) -> list[tuple[str, bool]]:
        """The render cut into markup (False) and the messages' contents (True): rendered with a
        marker for each content, then checked to give the real render once the contents are put
        back (as written, or stripped, as templates that trim them do). UsageError when the
        template reshapes contents beyond that, so they cannot be told apart from its markup."""
        real = self.render(messages, add_generation_prompt, **context)
        marked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        shape = self.render(marked, add_generation_prompt, **context)
        for strip in (False, True):
            parts = _parts_of(shape, messages, strip)
            if "".join(text for text, _ in parts) == real:
                return parts
        raise UsageError(
            "a message writes one of the model's special tokens, and this chat template changes messages "
            "so that localrun cannot keep that text apart from the template's own markup",
            hint="leave the special token out of the message, or choose --chat-format or --template",
        )

    def render(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, object]] | None = None,
        variables: dict[str, object] | None = None,
    ) -> str:
        """The prompt; `tools` as template_tools shapes them, `variables` the template's own
        switches (such as enable_thinking)."""
        if self._compiled is None:
            env = sandbox.environment({"raise_exception": _raise, "strftime_now": _strftime_now})
            try:
                self._compiled = env.from_string(self.source)
            except TemplateError as exc:
                raise self._broken(f"does not compile: {safe(exc)}") from None
        try:
            return sandbox.render(
                self._compiled,
                **(variables or {}),
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=tools,
                documents=None,
            )
        except sandbox.TemplateLimit as exc:
            raise self._broken(f"was stopped: {exc}") from None
        except (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError) as exc:
            raise self._broken(f"failed: {safe(exc)}") from None


_MARK = re.compile("\ue000(\\d+)\ue001")  # where a message's content stands in a render (private-use code points)


def _parts_of(shape: str, messages: list[Message], strip: bool) -> list[tuple[str, bool]]:
    pieces = _MARK.split(shape)  # markup, index, markup, index, ..., markup
    parts = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            parts.append((piece, False))
        else:
            content = messages[int(piece)]["content"]
            parts.append((content.strip() if strip else content, True))
    return [part for part in parts if part[0]]


def guess_format(has_token: Callable[[str], bool]) -> Format:
    """The built-in format whose special tokens the vocabulary has; plain text otherwise."""
    for fmt in FORMATS.values():
        if fmt.marker and has_token(fmt.marker):
            return fmt
    return FORMATS["plain"]


def choose(
    model_template: str | None,
    *,
    chat_format: str | None,
    template_file: Path | None,
    has_token: Callable[[str], bool],
    bos_token: str = "",
    eos_token: str = "",
    notify: Callable[[str], None] | None = None,
) -> ChatTemplate:
    """The template to use: --template FILE, else --chat-format NAME, else the model's own, else a
    guessed built-in format -- announced through notify, never silently."""
    if template_file is not None:
        try:
            source = Path(template_file).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read the template file {template_file}: {exc.strerror}") from None
        return ChatTemplate(source, f"file {template_file}", bos_token, eos_token)
    if chat_format is not None:
        fmt = FORMATS.get(chat_format.lower())
        if fmt is None:
            raise UsageError(
                f"unknown chat format {chat_format!r}",
                hint="choose one of " + ", ".join(FORMATS) + ", or pass --template FILE",
            )
        return ChatTemplate(fmt.source, f"built-in {fmt.name}", bos_token, eos_token, fmt.stop)
    if model_template:
        return ChatTemplate(model_template, "model", bos_token, eos_token)
    fmt = guess_format(has_token)
    if notify:
        why = f"its vocabulary has {fmt.marker}" if fmt.marker else "no known chat tokens in its vocabulary"
        notify(
            f"this model has no chat template; using the built-in '{fmt.name}' format ({why}). "
            f"Override with --chat-format {'/'.join(FORMATS)} or --template FILE."
        )
    return ChatTemplate(fmt.source, f"built-in {fmt.name} (fallback)", bos_token, eos_token, fmt.stop)
