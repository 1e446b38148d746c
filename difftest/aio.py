"""`run(coro)`: asyncio.run for the CLI's event loops, quiet about the signal that ends them.

SIGTERM / SIGHUP become `server_shim.launch.Terminated` (a SystemExit) raised wherever the main
thread is, which can be inside a task of its own: anyio's happy-eyeballs connect, say. asyncio.run
then propagates it and, at shutdown, reports that task's exception ("unhandled exception during
asyncio.run() shutdown") with a whole traceback group on stderr, above the CLI's one-line
"difftest: interrupted (SIGTERM)". The exit is already under way and said; anything else reported
at shutdown is still reported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner() as runner:
        runner.get_loop().set_exception_handler(_quiet_about_exits)
        return runner.run(coro)


def is_exit(exc: BaseException | None) -> bool:
    """A SystemExit / KeyboardInterrupt, or a group holding nothing else (pure)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_exit(e) for e in exc.exceptions)
    return isinstance(exc, SystemExit | KeyboardInterrupt)


def _quiet_about_exits(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if is_exit(context.get("exception")):
        return
    loop.default_exception_handler(context)
