"""difftest.progress.ServersUp: what a command shows while its servers start. Without a terminal,
a line when the wait begins, one every LINE_EVERY_S naming what is awaited (at most NAMES_SHOWN
names), and one when the last server answers; on a terminal, a bar that closes itself before the
run's own bars start."""

from __future__ import annotations

import logging

import pytest

from difftest.progress import ServersUp
from server_shim.launch import StartupStatus


def status(healthy: tuple[str, ...], pending: tuple[str, ...], at: float) -> StartupStatus:
    return StartupStatus(healthy=healthy, pending=pending, elapsed_s=at)


def test_plain_lines_at_start_every_30_s_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    names = tuple(f"s{i}" for i in range(6))
    shown = ServersUp(enabled=False)
    with caplog.at_level(logging.INFO, logger="difftest.progress"):
        shown(status((), names, 0.0))
        shown(status(("s0",), names[1:], 10.0))  # a change inside 30 s: no line
        shown(status(("s0",), names[1:], 15.0))
        shown(status(("s0", "s1"), names[2:], 31.0))  # 31 s after the last line
        shown(status(("s0", "s1"), names[2:], 45.0))
        shown(status(names, (), 52.0))  # the end is always said
    assert [r.getMessage() for r in caplog.records] == [
        "servers up: 0/6 after 0s; waiting for s0, s1, s2, s3 and 2 more",
        "servers up: 2/6 after 31s; waiting for s2, s3, s4, s5",
        "servers up: 6/6 after 52s",
    ]


def test_no_servers_no_lines(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="difftest.progress"):
        ServersUp(enabled=False)(status((), (), 0.0))
    assert caplog.records == []


def test_the_terminal_bar_closes_itself_when_the_last_server_answers() -> None:
    shown = ServersUp(enabled=True)
    with shown:
        shown(status((), ("a", "b"), 0.0))
        bar = shown._bar
        assert bar is not None and bar.live.is_started
        assert bar.tasks[0].completed == 0 and bar.tasks[0].total == 2
        shown(status(("a",), ("b",), 1.0))
        assert bar.tasks[0].completed == 1
        shown(status(("a", "b"), (), 2.0))
        assert shown._bar is None and not bar.live.is_started  # before the run's own bars start


def test_a_failed_launch_stops_the_bar() -> None:
    shown = ServersUp(enabled=True)
    with pytest.raises(RuntimeError), shown:
        shown(status((), ("a",), 0.0))
        bar = shown._bar
        raise RuntimeError("server 'a' exited with code 1 while starting")
    assert bar is not None and not bar.live.is_started
