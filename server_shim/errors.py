"""Typed errors of the shim.

    ShimError                       base: anything the shim refuses, with a clear one-line message
    ├── ModelLoadError              a model preset / path / package cannot be loaded
    ├── QuantConfigError            a scheme x backend x device combination that cannot run honestly
    ├── InvalidRequestError         the caller sent something wrong -> HTTP 400 (OpenAI-shaped)
    │   └── DebugRequestError       the same for /debug/* routes
    └── LaunchError                 a paired server failed to start or died (launch.py)
        └── ServerRefusedConfig     a launched shim exited 2 while starting: its flags are wrong

`InvalidRequestError` carries the OpenAI error fields so that the app turns it into
`{"error": {"message", "type", "param", "code"}}` without guessing.
"""

from __future__ import annotations


class ShimError(Exception):
    """Base class: the message is shown to the user as is, on one line."""


class ModelLoadError(ShimError):
    pass


class QuantConfigError(ShimError):
    pass


class LaunchError(ShimError):
    pass


class ServerRefusedConfig(LaunchError):
    """A launched shim refused what it was asked to serve (its exit 2: a fault glob matching no
    module, a scheme the backend cannot run): the config's error, not the infrastructure's."""


class InvalidRequestError(ShimError):
    """A request the caller got wrong; becomes a 4xx OpenAI-shaped error."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int = 400,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status_code = status_code
        self.error_type = error_type


class DebugRequestError(InvalidRequestError):
    pass


ECHO_CHARS = 200  # how much of a caller's string an error message repeats


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` cut to `limit` characters with an ellipsis: an error that echoed a 100k-character
    name whole was 100 kB of the caller's own input back."""
    return text if len(text) <= limit else text[:limit] + "…"
