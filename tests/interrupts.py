"""Child processes that a test interrupts with SIGINT must start with SIGINT's default action.

A shell starts background jobs (`cmd &` without job control: CI wrappers, nohup) with SIGINT
ignored, children inherit that, and Python then installs no KeyboardInterrupt handler: the
Ctrl-C tests would measure the launcher's environment instead of difftest.
"""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """preexec_fn for subprocess.Popen: SIGINT back to its default, whatever the test runner had."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
