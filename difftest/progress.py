"""Progress for anything that runs longer than a few seconds: a rich bar on a terminal, plain log
lines (one per ~10% of a task) when output is a file or a CI log, so that logs stay readable."""

from __future__ import annotations

import logging
import sys
from types import TracebackType

log = logging.getLogger("difftest.progress")


class Progress:
    def __init__(self, *, enabled: bool | None = None) -> None:
        self._tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._plain: dict[int, list] = {}  # task -> [description, total, done, next report]

    def __enter__(self) -> Progress:
        if self._tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description:<16}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=False,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, et: type | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.__exit__(et, ev, tb)

    def add(self, description: str, total: int) -> int:
        if self._bar is not None:
            return self._bar.add_task(description, total=total)
        task = len(self._plain)
        self._plain[task] = [description, total, 0, max(1, total // 10)]
        log.info("%s: 0/%d", description, total)
        return task

    def advance(self, task: int, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(task, n)
            return
        entry = self._plain[task]
        entry[2] += n
        if entry[2] >= entry[3] or entry[2] == entry[1]:
            log.info("%s: %d/%d", entry[0], entry[2], entry[1])
            entry[3] = entry[2] + max(1, entry[1] // 10)
