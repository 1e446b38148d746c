"""On/off switches read from the environment (DIFFTEST_CUDA_GRAPHS, DIFFTEST_FUSED_*, ...): one reading
rule for all of them, so `=0` / `=off` / `=false` and `=1` / `=on` / `=true` mean the same everywhere.
Any other value is an error, never the default: DIFFTEST_CK_FREE=enabled read as "unset" would run
vendor kernels under a run that claims to forbid them. `serve` checks every switch before it loads
anything (`check_switches`), so a typo stops the server at once with one line, not at a first request."""

from __future__ import annotations

import os

from server_shim.errors import ShimError

__all__ = ["SWITCHES", "SwitchError", "check_switches", "env_switch"]

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")

# every switch the shim reads (README: "Environment switches"; a test keeps this list complete)
SWITCHES = (
    "DIFFTEST_CK_FREE", "DIFFTEST_CUDA_GRAPHS", "DIFFTEST_FUSED_DECODE", "DIFFTEST_FUSED_NORM",
    "DIFFTEST_FUSED_ROPE", "DIFFTEST_ROW_ATTENTION", "DIFFTEST_TRITON_BULK_STORE", "DIFFTEST_TRITON_E2M1_F16", "DIFFTEST_TRITON_GLUON",
    "DIFFTEST_TRITON_GROUP_BCAST", "DIFFTEST_TRITON_PRECOMPILE", "DIFFTEST_TRITON_PTX", "DIFFTEST_TRITON_WARMUP",
)  # fmt: skip


class SwitchError(ShimError):
    """An on/off environment variable set to something that is neither."""


def env_switch(name: str, default: bool) -> bool:
    """The switch `name`: unset or empty leaves `default`; on / off values as above; else SwitchError."""
    value = os.environ.get(name, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value == "":
        return default
    raise SwitchError(
        f"{name}={os.environ[name]!r} is neither on ({'/'.join(_ON)}) nor off ({'/'.join(_OFF)}); unset it for the default"
    )


def check_switches() -> None:
    """Read every known switch once: the first invalid one raises SwitchError."""
    for name in SWITCHES:
        env_switch(name, False)
