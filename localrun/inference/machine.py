"""This machine as the planner must see it: its hardware, and whether this llama.cpp build may use
extra buffer types on its CPU (the self-test's verdict)."""

from __future__ import annotations

from collections.abc import Callable

from localrun import hardware, workers
from localrun.hardware import Machine
from localrun.inference.safety.selftest import use_extra_bufts


def this_machine(notify: Callable[[str], None] | None = None) -> Machine:
    """This machine as the planner must see it: detected now, with the build's verdict on extra
    buffer types known before any plan is made (a repacked copy of the weights costs memory), and
    the workers this process was told to use (--rpc) with the memory they reported."""
    return hardware.detect().with_extra_bufts(use_extra_bufts(notify)).with_workers(workers.in_use())
