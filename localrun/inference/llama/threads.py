"""Work in a thread that ends with it, waited on so that Ctrl-C still reaches the caller."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def interruptibly(work: Callable[[], T], cancel: Callable[[], None], release: Callable[[T], None]) -> T:
    """`work()` in a thread that ends with it, waited on here, so that Ctrl-C reaches this thread
    (never a ctypes callback, the log's, where it would be lost): `cancel()` asks the work to stop,
    and once it is done what it made is `release`d and KeyboardInterrupt raised. A thread that
    ends also takes its OpenMP team with it (see runtime.load)."""
    done = threading.Event()
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed to the caller
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="localrun-load", daemon=True).start()
    interrupted = False
    while not done.is_set():
        try:
            done.wait()
        except KeyboardInterrupt:
            interrupted = True
            cancel()
    if interrupted:
        if result:
            release(result[0])
        raise KeyboardInterrupt
    if failure:
        raise failure[0]
    return result[0]
