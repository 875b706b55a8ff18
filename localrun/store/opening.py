"""A resolved model opened for use, the steps run, chat and serve share around the load itself:
the plan's estimate said when it does not fit, the file checked in a child process the first
time (a file that would crash llama.cpp is refused here), the load, its last use recorded."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from localrun.fit import Plan
from localrun.inference.safety.filecheck import check_file
from localrun.model.files import ModelFiles
from localrun.store.usage import touch
from localrun.text import human_bytes

T = TypeVar("T")


def open_checked(model: ModelFiles, plan: Plan, load: Callable[[], T], notify: Callable[[str], None], remedy: str) -> T:
    """`load()` the model planned by `plan`, after the checks; `remedy` names what would make it
    fit ("a smaller --ctx or quant")."""
    if not plan.fits:
        notify(
            f"by the estimate this needs more memory than is free ({human_bytes(plan.estimate.ram)}); "
            f"loading anyway: {remedy} helps"
        )
    check_file(model.path, plan.extra_bufts, notify=notify)
    opened = load()
    touch(model.path)  # "last used" in `localrun list`
    return opened
