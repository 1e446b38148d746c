"""The signature of a run: every setting and version that produced its numbers (sacrebleu's habit:
a score without its settings cannot be compared with another)."""

from __future__ import annotations

import dataclasses
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difftest.collect import Endpoint
    from difftest.config import RunConfig
    from difftest.noise import NoiseFloor
    from difftest.prompts import Prompt


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {
        "difftest": _version("difftest"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "httpx": _version("httpx"),
        "numpy": _version("numpy"),
        "sacrebleu": _version("sacrebleu"),
    }


def _server(spec: Any) -> dict[str, Any]:
    data = {k: v for k, v in dataclasses.asdict(spec).items() if v not in (None, (), {}, "", False)}
    data.pop("env", None)  # may hold secrets; the keys alone are kept
    if spec.env:
        data["env_keys"] = sorted(spec.env)
    return data


def run_signature(
    cfg: RunConfig, eps: Mapping[str, Endpoint], prompts: Sequence[Prompt], floor: NoiseFloor | None
) -> dict[str, Any]:
    from difftest.metrics.text import signatures

    run = dataclasses.asdict(cfg.run)
    return {
        "config": str(cfg.source) if cfg.source else None,
        "run": {
            k: (str(v) if not isinstance(v, int | float | bool | type(None)) else v) for k, v in run.items()
        },
        "prompts": {"count": len(prompts), "ids": [p.id for p in prompts][:200]},
        "servers": {name: _server(spec) for name, spec in ((s.name, s) for s in cfg.servers())},
        "served_models": {name: ep.caps.model for name, ep in eps.items()},
        "targets": {
            t.name: {"scheme": t.scheme, "golden": t.golden.name if t.golden else None, "expect": t.expect}
            for t in cfg.targets
        },
        "thresholds": cfg.thresholds,
        "noise_floor": floor.describe() if floor is not None else "built-in minimums",
        "metrics": signatures(),
        "versions": versions(),
    }
