"""A prompt's tokens where only the chat template's own markup makes special tokens.

Rendered text is tokenized with special tokens parsed, so that the template's `<|im_start|>`
becomes that control token. Parsed the same way, a message that writes `<|im_end|>` would close
its own turn and forge another (a system prompt, say). So a message's content is read as text:
the prompt is cut into markup and contents (ChatTemplate.render_parts), the markup is split at
the control tokens llama.cpp finds in it, and each stretch of text between two control tokens --
markup and contents together -- is tokenized as text, exactly as llama.cpp tokenizes the text
between the special tokens of a whole prompt. A prompt whose contents hold no special-token text
(nearly all) is tokenized whole, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localrun.inference.runtime import LlamaModel

Part = tuple[str, bool]  # (text, whether it is a message's content: read as text only)


def holds_special(model: LlamaModel, text: str) -> bool:
    """Whether parsing special tokens would change how `text` is read."""
    return model.tokenize(text, add_special=False, parse_special=True) != model.tokenize(
        text, add_special=False, parse_special=False
    )


def tokenize_parts(model: LlamaModel, parts: list[Part]) -> list[int]:
    """The tokens of the parts joined, special tokens parsed in markup only (no BOS added)."""
    out: list[int] = []
    text_run = ""

    def flush() -> None:
        nonlocal text_run
        if text_run:
            out.extend(model.tokenize(text_run, add_special=False, parse_special=False))
            text_run = ""

    for text, content in parts:
        if content:
            text_run += text
            continue
        tokens = model.tokenize(text, add_special=False, parse_special=True)
        found: list[tuple[int, str, int]] | None = []
        cursor = 0
        for token in (t for t in tokens if model.is_control(t)):
            piece = model.piece(token, special=True).decode("utf-8", "replace")
            at = text.find(piece, cursor)
            if at < 0:  # a token that strips the spaces beside it: take this markup as llama.cpp reads it
                found = None
                break
            found.append((at, piece, token))
            cursor = at + len(piece)
        if found is None:
            flush()
            out.extend(tokens)
            continue
        cursor = 0
        for at, piece, token in found:
            text_run += text[cursor:at]
            flush()
            out.append(token)
            cursor = at + len(piece)
        text_run += text[cursor:]
    flush()
    return out
