"""Progress shown while a command works: a rich download bar on a terminal, plain lines otherwise."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from localrun.output import Output
from localrun.text import human_bytes


class RichDownloadProgress:
    """One rich progress bar (size, speed, ETA) over every file of a download; quiet when stderr
    is not a terminal. Messages go to stderr either way."""

    def __init__(self, out: Output):
        self.out = out
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> RichDownloadProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()

    def message(self, text: str, *, warning: bool = False) -> None:
        (self.out.warn if warning else self.out.info)(text)

    def begin(self, label: str, total: int, done: int) -> None:
        if self.out.interactive and done < total:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TextColumn("{task.fields[speed]}"),
                TimeRemainingColumn(compact=True, elapsed_when_finished=True),
                console=self.out.err,
            )
            self._progress.start()
            self._task = self._progress.add_task(label, total=total, completed=done, speed="")

    def update(self, done: int, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, description=description)
            speed = self._progress.tasks[0].speed  # in the same binary units as the sizes
            self._progress.update(self._task, speed=f"{human_bytes(int(speed))}/s" if speed else "")

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
