"""On/off switches read from the environment (DIFFTEST_CUDA_GRAPHS, DIFFTEST_FUSED_*): one reading
rule for all of them, so `=0` / `=off` / `=false` and `=1` / `=on` / `=true` mean the same everywhere."""

from __future__ import annotations

import os

__all__ = ["env_switch"]

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def env_switch(name: str, default: bool) -> bool:
    """The switch `name`: unset, or a value that is neither on nor off, leaves `default`."""
    value = os.environ.get(name, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    return default
