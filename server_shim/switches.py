"""On/off switches read from the environment (DIFFTEST_CUDA_GRAPHS, DIFFTEST_FUSED_*, ...): one reading
rule for all of them, so `=0` / `=off` / `=false` and `=1` / `=on` / `=true` mean the same everywhere.
Any other value is an error, never the default: DIFFTEST_CK_FREE=enabled read as "unset" would run
vendor kernels under a run that claims to forbid them. `serve` checks every switch before it loads
anything (`check_switches`), so a typo stops the server at once with one line, not at a first request."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping

from server_shim.errors import ShimError

__all__ = [
    "CHOICES",
    "KNOWN_VARIABLES",
    "RETIRED",
    "SWITCHES",
    "SwitchError",
    "check_switches",
    "env_choice",
    "env_switch",
    "refuse_retired",
    "unknown_variable_problem",
]

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")

# every switch the shim reads (README: "Environment switches"; a test keeps this list complete)
SWITCHES = (
    "DIFFTEST_CK_FREE", "DIFFTEST_CUDA_GRAPHS", "DIFFTEST_FUSED_DECODE", "DIFFTEST_FUSED_NORM",
    "DIFFTEST_FUSED_ROPE", "DIFFTEST_ROW_ATTENTION", "DIFFTEST_TRITON_BULK_STORE", "DIFFTEST_TRITON_E2M1_F16", "DIFFTEST_TRITON_GLUON",
    "DIFFTEST_TRITON_GROUP_BCAST", "DIFFTEST_TRITON_PRECOMPILE", "DIFFTEST_TRITON_PTX", "DIFFTEST_TRITON_WARMUP",
)  # fmt: skip


# valued switches: the values each accepts (the first is the default), read by `env_choice`
CHOICES: dict[str, tuple[str, ...]] = {"DIFFTEST_TRITON_KERNELS": ("fast", "legacy")}
# switches whose feature is gone: on is refused with the reason (never ignored), off is fine
RETIRED: dict[str, str] = {
    "DIFFTEST_TRITON_FACTORED_4BIT": "the factored 4-bit kernels were removed (slower than the default "
    "kernels on an H200)",
}


# the shim's variables that are not switches (each read and checked where it is used)
OTHER_VARIABLES = (
    "DIFFTEST_CACHE_DIR",
    "DIFFTEST_DEBUG_MAX_BYTES",
    "DIFFTEST_SHIM_API_KEY",
    "DIFFTEST_TRITON_TUNE_CACHE",
)
KNOWN_VARIABLES = (*SWITCHES, *CHOICES, *RETIRED, *OTHER_VARIABLES)


class SwitchError(ShimError):
    """An on/off environment variable set to something that is neither."""


def env_switch(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """The switch `name` in `environ` (the process's by default): unset or empty leaves `default`;
    on / off values as above; else SwitchError."""
    environ = os.environ if environ is None else environ
    value = environ.get(name, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value == "":
        return default
    raise SwitchError(
        f"{name}={environ[name]!r} is neither on ({'/'.join(_ON)}) nor off ({'/'.join(_OFF)}); unset it for the default"
    )


def env_choice(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The valued switch `name` (one of CHOICES): unset or empty is its default; the value is read
    as the on/off ones are (case and spaces aside); anything else is a SwitchError, never the default."""
    values = CHOICES[name]
    raw = (os.environ if environ is None else environ).get(name, "")
    value = raw.strip().lower()
    if value == "":
        return values[0]
    if value not in values:
        raise SwitchError(f"{name}={raw!r} must be one of {', '.join(values)}; unset it for {values[0]}")
    return value


def refuse_retired(name: str, environ: Mapping[str, str] | None = None) -> None:
    """A retired switch (RETIRED) set on: SwitchError saying why, as a user asking for it would
    otherwise get the default kernels and believe they ran the old ones."""
    if env_switch(name, False, environ):
        raise SwitchError(f"{name} is no longer supported: {RETIRED[name]}; unset it")


def check_switches(environ: Mapping[str, str] | None = None) -> None:
    """Read every known switch once: the first invalid one raises SwitchError. The valued and
    retired ones too: they are read lazily (at the first Triton GEMM), where a typo was a 500 on
    every request of a server that had answered /health. difftest's config check runs this on the
    environment a shim would be launched with, so a bad value names its config line."""
    for name in SWITCHES:
        env_switch(name, False, environ)
    for name in CHOICES:
        env_choice(name, environ)
    for name in RETIRED:
        refuse_retired(name, environ)


def unknown_variable_problem(name: str) -> str | None:
    """Why `name`, a DIFFTEST_* variable set for a shim, is one the shim never reads (None: it reads
    it, or it is not ours). A misspelt switch was read as unset: DIFFTEST_CK_FRE=1 ran vendor kernels
    under a run that meant to forbid them."""
    if not name.startswith("DIFFTEST_") or name in KNOWN_VARIABLES:
        return None
    close = difflib.get_close_matches(name, KNOWN_VARIABLES, n=1)
    hint = f"; did you mean {close[0]}?" if close else f" (it reads {', '.join(sorted(KNOWN_VARIABLES))})"
    return f"{name} is no variable the shim reads{hint}"
