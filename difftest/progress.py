"""Progress for anything that runs longer than a few seconds: a rich bar on a terminal, plain log
lines (one per ~10% of a task) when output is a file or a CI log, so that logs stay readable."""

from __future__ import annotations

import logging
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server_shim.launch import StartupStatus

log = logging.getLogger("difftest.progress")


def _live_bar() -> Any:
    """A started rich bar: description, bar, done / total, time elapsed (both displays' look)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    bar = RichProgress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    )
    bar.__enter__()
    return bar


class Progress:
    def __init__(self, *, enabled: bool | None = None) -> None:
        self._tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._plain: dict[int, list] = {}  # task -> [description, total, done, next report]

    def __enter__(self) -> Progress:
        if self._tty:
            self._bar = _live_bar()
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


class ServersUp:
    """A launch's health wait (`server_shim.launch.launch_servers`' on_status) shown while it lasts:
    a cold GPU server tunes its kernels for minutes before /health answers, and a wait that shows
    nothing looks hung. On a terminal a bar of the servers up with the time elapsed, closed once the
    last one answers (before the run's own bars start: one live display at a time); otherwise a
    line when the wait begins, one every LINE_EVERY_S naming what is awaited, and one at the end."""

    LINE_EVERY_S = 30.0
    NAMES_SHOWN = 4

    def __init__(self, *, enabled: bool | None = None) -> None:
        self._tty = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._task = 0
        self._said_at: float | None = None

    def __enter__(self) -> ServersUp:
        return self

    def __exit__(self, et: type | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._close(et, ev, tb)

    def __call__(self, status: StartupStatus) -> None:
        if status.total == 0:
            return
        if self._tty:
            self._show_bar(status)
            return
        done = not status.pending
        if self._said_at is None or done or status.elapsed_s - self._said_at >= self.LINE_EVERY_S:
            self._said_at = status.elapsed_s
            log.info("servers up: %d/%d after %.0fs%s", len(status.healthy), status.total, status.elapsed_s,
                     self._waiting(status.pending))  # fmt: skip

    def _waiting(self, pending: tuple[str, ...]) -> str:
        if not pending:
            return ""
        more = len(pending) - self.NAMES_SHOWN
        return (
            "; waiting for "
            + ", ".join(pending[: self.NAMES_SHOWN])
            + (f" and {more} more" if more > 0 else "")
        )

    def _show_bar(self, status: StartupStatus) -> None:
        if self._bar is None and status.pending:
            self._bar = _live_bar()
            self._task = self._bar.add_task("servers up", total=status.total)
        if self._bar is not None:
            self._bar.update(self._task, completed=len(status.healthy))
            if not status.pending:
                self._close(None, None, None)

    def _close(self, et: type | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.__exit__(et, ev, tb)
