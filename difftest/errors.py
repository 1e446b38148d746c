"""Typed errors of the differ, each mapped to an exit code (docs/design.md "Errors and exit codes").

    DifftestError                   base
    ├── UsageError          (2)     bad CLI arguments, bad config, bad prompts file
    │   └── ConfigError     (2)     a TOML key / type problem, naming the key and line
    ├── ConformanceError    (2)     the servers cannot be compared (tokenizers differ, no completions)
    └── InfraError          (3)     a server died, timed out, or the error rate passed the limit
        └── ServerError     (3)     one request failed for reasons on the server's side

A verdict failure is not an exception: it is exit code 1 from `main()`.
"""

from __future__ import annotations


class DifftestError(Exception):
    exit_code = 2


class UsageError(DifftestError):
    exit_code = 2


class ConfigError(UsageError):
    pass


class ConformanceError(DifftestError):
    exit_code = 2


class InfraError(DifftestError):
    exit_code = 3


class ServerError(InfraError):
    """A request that failed on the server's side (5xx, connection lost, timeout, bad body)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class RequestRejected(DifftestError):
    """The server answered 4xx: the request itself was refused (not retried)."""

    exit_code = 2

    def __init__(self, message: str, *, status_code: int, body: dict | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body or {}
