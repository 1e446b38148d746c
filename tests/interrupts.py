"""Child processes that a test interrupts with a signal must start with its default action.

A shell starts background jobs (`cmd &` without job control: CI wrappers) with SIGINT ignored,
`nohup` starts its command with SIGHUP ignored, children inherit both, and Python then installs
no KeyboardInterrupt handler, and the launcher leaves an ignored SIGHUP ignored (as it should,
under nohup): the signal tests would measure the test runner's environment instead of difftest.
"""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """preexec_fn for subprocess.Popen: SIGINT and SIGHUP back to their defaults, whatever the
    test runner had (a suite run under nohup failed the launcher's SIGHUP test)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
