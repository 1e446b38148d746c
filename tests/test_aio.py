"""difftest.aio.run: a SIGTERM turned into SystemExit inside a task group (anyio's happy-eyeballs
connect) printed a whole exception-group traceback above "difftest: interrupted (SIGTERM)"
(tests/test_differ_process_faults.py failed on it once, 2026-12-07); anything else is still reported."""

from __future__ import annotations

import asyncio
import logging

import anyio
import pytest

from difftest import aio


def _main(exc: BaseException):
    async def child() -> None:
        await anyio.sleep(0.01)
        raise exc

    async def holder() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            await anyio.sleep(10)

    async def main() -> None:
        asyncio.ensure_future(holder())
        await asyncio.sleep(10)

    return main()


def test_an_exit_inside_a_task_group_is_not_reported_at_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="asyncio"), pytest.raises(SystemExit):
        aio.run(_main(SystemExit(143)))
    assert caplog.records == []
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"), pytest.raises(SystemExit):
        asyncio.run(_main(SystemExit(143)))  # what asyncio.run said
    assert "unhandled exception during asyncio.run() shutdown" in caplog.text


def test_other_exceptions_at_shutdown_are_still_reported() -> None:
    assert aio.is_exit(SystemExit(1)) and aio.is_exit(BaseExceptionGroup("g", [KeyboardInterrupt()]))
    assert not aio.is_exit(BaseExceptionGroup("g", [SystemExit(1), ValueError()]))
    assert not aio.is_exit(ValueError()) and not aio.is_exit(None)
    assert aio.run(asyncio.sleep(0, result=7)) == 7
