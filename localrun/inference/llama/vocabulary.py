"""The vocabulary as text: which tokens are whole UTF-8, and a prompt's tokens where only the
chat template's own markup makes special tokens.

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

import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localrun.inference.llama.runtime import LlamaModel

Part = tuple[str, bool]  # (text, whether it is a message's content: read as text only)
_partial: weakref.WeakKeyDictionary[LlamaModel, list[int]] = weakref.WeakKeyDictionary()


def partial_utf8_tokens(model: LlamaModel) -> list[int]:
    """Tokens whose bytes are not whole UTF-8 characters (byte-fallback pieces, bytes that no
    UTF-8 text holds). llama.cpp's grammar decodes a character from its lead byte without
    checking what follows, so a reply built with them can pass a grammar's character counts
    and still not be the text it counted: a grammar bans them."""
    found = _partial.get(model)
    if found is None:
        found = _partial[model] = [t for t in range(model.n_vocab) if not _whole_utf8(model.piece(t))]
    return found


def _whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


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
