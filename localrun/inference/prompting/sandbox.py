"""Chat templates come from model files: rendered in Jinja's immutable sandbox, with bounds.

The sandbox stops a template from reaching Python's internals; it does not stop one from
looping for hours (nested ranges), recursing (a macro calling itself) or building gigabytes
('x' * 10**11, a centre width of 10**10). Every render here runs with a step budget and a time
limit (a trace on the template's own frames), size checks on the operators and methods that
multiply strings, and a cap on the output; a template that hits one is a TemplateLimit.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_STEPS = 1_000_000  # template lines run in one render; a real chat template runs a few thousand
MAX_SECONDS = 5.0
MAX_ITEMS = 1_000_000  # characters or items one operation may build
MAX_OUTPUT = 8 << 20  # characters of rendered prompt, far beyond any context
_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill", "expandtabs"}
_PERCENT_WIDTH = re.compile(r"%[-+ #0]*(\d+)")


class TemplateLimit(Exception):
    """The template went past a bound (steps, time, size, recursion)."""


def _size_of(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "%"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                size = _size_of(seq)
                if size is not None and isinstance(times, int) and size * times > MAX_ITEMS:
                    raise TemplateLimit(f"it builds a sequence of {size * times:,} items")
        elif operator == "**" and isinstance(right, int) and abs(right) > 1024 and left not in (0, 1, -1):
            raise TemplateLimit(f"it raises to the power {right}")
        elif operator == "%" and isinstance(left, str):
            widths = [int(w) for w in _PERCENT_WIDTH.findall(left)]
            if any(w > MAX_ITEMS for w in widths):
                raise TemplateLimit(f"it formats a field {max(widths):,} characters wide")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # Jinja's signature
        pads = getattr(__obj, "__name__", "") in _WIDTH_METHODS and isinstance(getattr(__obj, "__self__", None), str)
        if pads and any(isinstance(a, int) and a > MAX_ITEMS for a in (*args, *kwargs.values())):
            raise TemplateLimit(f"it pads a string to more than {MAX_ITEMS:,} characters")
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_width(name: str, filter_: Callable[..., Any]) -> Callable[..., Any]:
    def bounded(value: Any, width: Any = 80, *args: Any, **kwargs: Any) -> Any:
        if isinstance(width, int) and width > MAX_ITEMS:
            raise TemplateLimit(f"its {name} filter asks for {width:,} characters")
        return filter_(value, width, *args, **kwargs)

    return bounded


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """JSON as Hugging Face's template runtime writes it (plain text, keys in order, no HTML
    escaping): Jinja's own filter escapes `<` and `"` once joined to a string, which garbles the
    tool calls a template writes into the prompt."""
    if isinstance(indent, int) and indent > 64:
        raise TemplateLimit(f"its tojson filter indents by {indent:,}")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def environment(globals_: dict[str, Any]) -> BoundedEnvironment:
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    for name in ("center", "indent"):
        env.filters[name] = _bounded_width(name, env.filters[name])
    env.filters["tojson"] = _tojson
    env.globals.update(globals_)
    return env


def render(template: Any, **context: Any) -> str:
    """Render with the bounds above. Raises TemplateLimit, or the template's own errors."""
    steps = 0
    deadline = time.monotonic() + MAX_SECONDS

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > MAX_STEPS:
                raise TemplateLimit(f"it runs more than {MAX_STEPS:,} steps")
            if steps % 10_000 == 0 and time.monotonic() > deadline:
                raise TemplateLimit(f"it runs longer than {MAX_SECONDS:g} s")
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        out: list[str] = []
        size = 0
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise TemplateLimit(f"its output passes {MAX_OUTPUT:,} characters")
            out.append(chunk)
        return "".join(out)
    except RecursionError:
        raise TemplateLimit("it recurses without end") from None
    except MemoryError:
        raise TemplateLimit("it runs out of memory") from None
    except OverflowError as exc:  # the sandbox's own range bound, among others
        raise TemplateLimit(str(exc)) from None
    finally:
        sys.settrace(previous)
