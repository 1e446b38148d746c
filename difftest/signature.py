"""The signature of a run: every setting and version that produced its numbers (sacrebleu's habit:
a score without its settings cannot be compared with another)."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server_shim.launch_spec import SHIM_ONLY

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
    """A server's settings. A url or command server takes none of the shim's options (the config
    refuses them), so their defaults are left out: `quant none`, `dtype auto` stated for a server
    that serves fp8-block misled whoever read the signature."""
    data = {k: v for k, v in dataclasses.asdict(spec).items() if v not in (None, (), {}, "", False)}
    if spec.kind != "shim":
        data = {k: v for k, v in data.items() if k not in SHIM_ONLY}
    data.pop("env", None)  # may hold secrets; the keys alone are kept
    if spec.env:
        data["env_keys"] = sorted(spec.env)
    return data


def _json_value(v: Any) -> Any:
    """A setting as JSON: paths as strings, sequences as lists (`str()` of the prompts tuple was
    the Python repr "(PosixPath('p.jsonl'),)"), anything else unknown as its str."""
    if isinstance(v, str | int | float | bool | type(None)):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, list | tuple):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    return str(v)


def run_signature(
    cfg: RunConfig,
    eps: Mapping[str, Endpoint],
    prompts: Sequence[Prompt],
    floor: NoiseFloor | None,
    out_dir: Path | str | None = None,
) -> dict[str, Any]:
    """`out_dir`: the folder the report goes to (`-o`), recorded as run.output_dir; without it the
    key is left out, since the config's output_dir is not where a run given `-o` wrote."""
    from difftest.metrics.text import signatures

    run = {k: _json_value(v) for k, v in dataclasses.asdict(cfg.run).items()}
    if out_dir is not None:
        run["output_dir"] = os.fspath(Path(out_dir).resolve())
    else:
        run.pop("output_dir", None)
    return {
        "config": str(cfg.source) if cfg.source else None,
        "run": run,
        "prompts": {"count": len(prompts), "ids": [p.id for p in prompts][:200]},
        "servers": {name: _server(spec) for name, spec in ((s.name, s) for s in cfg.servers())},
        "served_models": {name: ep.caps.model for name, ep in eps.items()},
        "targets": {
            t.name: {"scheme": t.scheme, "golden": t.golden.name if t.golden else None, "expect": t.expect}
            for t in cfg.targets
        },
        "thresholds": cfg.thresholds,
        # without a file the limits come from the null model ("null" below), not only the minimums
        "noise_floor": floor.describe() if floor is not None else "no floor file",
        "metrics": signatures(),
        "versions": versions(),
    }
