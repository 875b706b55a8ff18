"""Ctrl-C during a llama.cpp call made from the main thread.

Python runs a signal's handler only between bytecodes, so a Ctrl-C during a long llama_decode
(a prompt chunk of a large model on a CPU takes seconds) would wait for the call to end. While an
`Interruptible` block runs, the signal also wakes a watcher thread (through the wakeup fd Python
writes from its C-level handler), which calls `abort` at once: llama.cpp checks it between graph
nodes. The signal's own handler, whatever it was, is run when the block ends, at a point the
caller chose rather than in the middle of its bookkeeping.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import TracebackType


class Interruptible:
    """A reusable context manager around decodes that Ctrl-C must stop. Off the main thread
    (where no signal arrives) or with Ctrl-C ignored, it does nothing."""

    def __init__(self, abort: Callable[[], None]):
        self.abort = abort
        self._write_fd: int | None = None
        self._saved: tuple[object, int] | None = None
        self._hit = False
        self._active = False  # a block is running: a late-read byte must not abort the next one

    def __enter__(self) -> Interruptible:
        self._saved = None
        if threading.current_thread() is not threading.main_thread():
            return self
        handler = signal.getsignal(signal.SIGINT)
        if handler in (signal.SIG_IGN, None):  # ignored (a background job), or not set from Python
            return self
        if self._write_fd is None:
            read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._write_fd, False)  # the wakeup fd must not block the signal handler
            threading.Thread(target=self._watch, args=(read_fd,), name="localrun-ctrl-c", daemon=True).start()
        self._hit, self._active = False, True
        signal.signal(signal.SIGINT, self._record)
        self._saved = handler, signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._saved is None:
            return
        handler, wakeup_fd = self._saved
        self._saved, self._active = None, False
        signal.set_wakeup_fd(wakeup_fd)
        signal.signal(signal.SIGINT, handler)  # type: ignore[arg-type]
        if self._hit:
            signal.raise_signal(signal.SIGINT)  # now handled as it would have been: KeyboardInterrupt

    def close(self) -> None:
        """End the watcher (it closes its end when it reads the end of the pipe)."""
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def _record(self, signum: int, frame: object) -> None:
        self._hit = True
        self.abort()

    def _watch(self, read_fd: int) -> None:
        try:
            while data := os.read(read_fd, 64):
                if signal.SIGINT in data and self._active:
                    self.abort()
        finally:
            os.close(read_fd)
