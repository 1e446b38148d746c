"""Every error the differ raises, one tree; each branch carries its exit code
(docs/design.md "Errors and exit codes").

    DifftestError                       base                                            exit
    ├── UsageError                      the input is wrong: arguments, files, prompts     2
    │   ├── ConfigError                 a config key / type / value (.path .line .key)     2
    │   ├── NoiseFloorError             a noise-floor file that is not one; NaN in an A/A  2
    │   ├── CacheMiss                   offline, and the response cache lacks an answer    2
    │   ├── UnreadableCache             cache.sqlite is no cache of ours (set aside)       2
    │   └── OutputError                 a file of the output folder cannot be written      2
    │                                   (disk full, a folder where a file goes) (.path)
    ├── ConformanceError                the servers cannot be compared (tokenizers differ,  2
    │                                   no completions, no debug protocol where required)
    ├── RequestRejected                 a server refused a request: HTTP 4xx, not retried  2
    │                                   (.server .status_code .reason .body)
    └── InfraError                      a server died, failed to start, or too many        3
        │                               requests failed
        └── ServerError                 one request failed on the server's side after its  3
            │                           retries: 5xx, timeout, lost connection
            │                           (.server .status_code .reason)
            └── UnreadableBody          an answer the differ cannot parse (not JSON, not    3
                                        a safetensors body it can read)

A verdict failure is not an exception: `main()` returns 1 for it.

Errors raised by the launcher (`server_shim.launch`) are not in this tree — the server package
never imports the differ — and `exit_code_for` maps them: a server spec that cannot be right
(`SpecError`, e.g. a `command` without `{port}`) and a launched shim that refused its flags
(`ServerRefusedConfig`, e.g. a fault glob matching no module) are config mistakes (2), any other
error of the server package (`LaunchError`: a server failed to start or died) is infrastructure (3).

Attributes hold the facts a caller needs (`reason` is the server's own words, without the
"name: GET /path failed" prefix of the message); nothing is attached after construction.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

USAGE = 2
INFRA = 3


class DifftestError(Exception):
    """Base class; the message is shown to the user as is, on one line."""

    exit_code: int = USAGE


class UsageError(DifftestError):
    """Bad arguments, a file that is missing or malformed, bad prompts."""

    exit_code = USAGE


class ConfigError(UsageError):
    """A config mistake. `path`, `line` and `key` locate it when known (the message says it too)."""

    def __init__(
        self, message: str, *, path: Path | str | None = None, line: int | None = None, key: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.key = key


class NoiseFloorError(UsageError):
    """A floor that cannot be used: not a noise-floor file, or NaN in an A/A comparison."""


class CacheMiss(UsageError):
    """An offline run needed a response (or fingerprint) that the cache does not hold."""


class OutputError(UsageError):
    """A file of the run's output (report, plots, cache.sqlite) that cannot be written: the disk
    is full, or a folder stands where a file goes. Exit 2 like an output folder refused at the
    start: the same fault found later, and a CI retry would meet the same disk."""

    def __init__(self, path: Path | str, why: str) -> None:
        super().__init__(f"cannot write {path}: {why}")
        self.path = Path(path)
        self.why = why


class UnreadableCache(UsageError):
    """A response cache file that is no cache of ours (not sqlite, damaged, other tables); a run
    sets it aside and asks everything again (difftest.cache)."""


class ConformanceError(DifftestError):
    """The servers cannot be compared, or one of them cannot do what the command needs."""

    exit_code = USAGE


class RequestRejected(DifftestError):
    """A server answered 4xx: the request itself was refused (never retried)."""

    exit_code = USAGE

    def __init__(
        self, message: str, *, server: str, status_code: int, reason: str, body: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.server = server
        self.status_code = status_code
        self.reason = reason  # "HTTP 400: echo is not supported"
        self.body = body or {}


class InfraError(DifftestError):
    """A server died or failed to start, or the failed-request rate passed the limit."""

    exit_code = INFRA


class ServerError(InfraError):
    """A request that failed on the server's side (5xx, connection lost, timeout) after retries."""

    def __init__(
        self,
        message: str,
        *,
        server: str | None = None,
        status_code: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.server = server
        self.status_code = status_code
        self.reason = reason if reason is not None else message


class UnreadableBody(ServerError):
    """A server's answer that the differ cannot parse: not JSON, or not a readable safetensors body."""


class ResponseTooLarge(ServerError):
    """An answer cut at the client's response cap (`max_response_bytes`). Not retried: the same
    request gets the same answer; a /debug caller asks for less instead (activations in chunks:
    difftest.whitebox.activations), so it must tell this apart from a server that failed."""

    def __init__(self, message: str, *, server: str, cap: int) -> None:
        super().__init__(message, server=server, reason=f"response over the {cap}-byte cap")
        self.cap = cap


def output_error(path: Path | str, exc: BaseException) -> OutputError:
    """`exc` (an OSError, a sqlite3.Error) met while writing `path`, as one line naming the path:
    a folder in a file's place (or a file in a folder's) says which, since errno's words
    ("File exists", "Is a directory") leave the user guessing which of the two paths is wrong."""
    path = Path(path)
    if not isinstance(exc, OSError):
        return OutputError(path, str(exc))
    try:  # looking may fail too (no permission to search): then errno's words are all there is
        for parent in path.parents:
            if parent.exists() and not parent.is_dir():
                return OutputError(path, f"{parent} is a file, not a folder")
        if path.is_dir():
            return OutputError(path, "a folder stands in its place")
        if exc.errno == errno.EEXIST and path.exists():  # mkdir of a folder where a file is
            return OutputError(path, "a file stands where this folder goes")
    except OSError:
        pass
    return OutputError(path, exc.strerror or str(exc))


def first_invalid(exc: Any, root: str = "") -> str:
    """`root[3].responses[0].status: Field required`: where a pydantic ValidationError's first
    error sits and what it says, for a one-line message (the whole list can run to pages)."""
    first = exc.errors()[0]
    where = root + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in first["loc"])
    return f"{where.lstrip('.')}: {first['msg']}"


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of an error `main()` reports in one line, or None for a bug (a traceback)."""
    if isinstance(exc, DifftestError):
        return exc.exit_code
    from server_shim.errors import ServerRefusedConfig, ShimError
    from server_shim.launch_spec import SpecError

    if isinstance(exc, SpecError | ServerRefusedConfig):  # the config's error: a shim refused its flags
        return USAGE
    if isinstance(exc, ShimError):  # LaunchError: a server failed to start or died
        return INFRA
    return None
