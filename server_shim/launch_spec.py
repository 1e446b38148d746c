"""TOML -> ServerSpec: the server spec, its validation and the names it is checked against.

Split from launch.py, which re-exports every name here: `difftest.config` and the tests import
them from `server_shim.launch`. Like launch.py this module imports no torch (DESIGN.md
"Boundaries"), so a config is validated without loading a model; it lives in server_shim so that
`python -m server_shim pair` works without difftest, and `difftest.config` reuses it and adds
line numbers to its errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server_shim.errors import LaunchError

# Mirrors of server_shim.quant's names, kept here so that validating a config needs no torch.
# tests/test_config.py checks that they stay equal to the real ones.
SCHEMES = ("none", "fp8-tensor", "fp8-token", "fp8-block", "int8", "int4-g128", "mxfp4")
BACKENDS = ("auto", "torch", "triton", "vendor")
FAULTS = (
    "garbage-gemm",
    "scale-transposed",
    "scale-shuffle-ignored",
    "scale-skipped",
    "fnuz-unnormalized",
    "transpose-noop",
    "routed-scaling-missing",
    "ue8m0-rounding",
    "slot-variant",
)
_QUANTIZED = SCHEMES[1:]
# Schemes in which each bug class can exist (mirror of quant.faults.FAULT_SCHEMES): a config that
# asks for e.g. scale-transposed on fp8-token is refused here, with its line, not by a dying server.
FAULT_SCHEMES: dict[str, tuple[str, ...]] = {
    "garbage-gemm": _QUANTIZED,
    "scale-transposed": ("fp8-block", "int4-g128", "mxfp4"),
    "scale-shuffle-ignored": ("fp8-token", "fp8-block", "int8", "int4-g128", "mxfp4"),
    "scale-skipped": _QUANTIZED,
    "fnuz-unnormalized": ("fp8-tensor", "fp8-token", "fp8-block"),
    "transpose-noop": _QUANTIZED,
    "routed-scaling-missing": _QUANTIZED,
    "ue8m0-rounding": ("fp8-tensor", "fp8-token", "fp8-block", "int8"),
    "slot-variant": ("fp8-token", "fp8-block", "int8"),
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # becomes a log file name


class SpecError(LaunchError):
    """A server spec that cannot be right; `key` names the offending TOML key (None: the table)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class ServerSpec:
    """One server to compare. Exactly one of `model` (built-in shim), `command`, `url` decides the
    kind; with `command` or `url`, `model` is only the id substituted for {model}."""

    name: str
    model: str | None = None
    command: str | None = None
    url: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quant: str = "none"
    backend: str = "auto"
    quant_skip: tuple[str, ...] = ()
    faults: tuple[str, ...] = ()
    ck_free: bool = False
    batch_invariant: bool = False
    rounding_noise: str = ""  # "" off; "auto" or a number: the rounding twin (server_shim.twin)
    debug: bool = False
    seed: int = 0
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    gpus: str | None = None
    api_key_env: str | None = None
    port: int | None = None
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise SpecError(f"server name {self.name!r} must be letters, digits, '.', '_' or '-'", key="name")
        if self.command is not None and self.url is not None:
            raise SpecError(f"server {self.name!r}: give either 'command' or 'url', not both", key="url")
        if self.model is None and self.command is None and self.url is None:
            raise SpecError(f"server {self.name!r}: needs one of 'model', 'command' or 'url'")

    @property
    def kind(self) -> str:
        """ "url", "command" or "shim"."""
        if self.url is not None:
            return "url"
        return "command" if self.command is not None else "shim"


# ----------------------------------------------------------------------------- TOML -> ServerSpec

# key -> kind of value; "shim" keys apply only to built-in servers.
_STR, _BOOL, _INT, _FLOAT, _STRS, _ENV, _GPUS = (
    "string",
    "boolean",
    "integer",
    "number",
    "strings",
    "env",
    "gpus",
)
SPEC_KEYS: dict[str, str] = {
    "name": _STR, "model": _STR, "command": _STR, "url": _STR, "dtype": _STR, "device": _STR,
    "quant": _STR, "backend": _STR, "quant_skip": _STRS, "faults": _STRS, "ck_free": _BOOL,
    "batch_invariant": _BOOL, "rounding_noise": _STR, "debug": _BOOL, "seed": _INT, "extra_args": _STRS, "env": _ENV,
    "cwd": _STR, "gpus": _GPUS, "api_key_env": _STR, "port": _INT, "startup_timeout_s": _FLOAT,
}  # fmt: skip
SHIM_ONLY = ("dtype", "device", "quant", "backend", "quant_skip", "faults", "ck_free", "batch_invariant",
             "rounding_noise", "debug", "seed")  # fmt: skip
URL_ALLOWED = ("name", "model", "url", "api_key_env", "startup_timeout_s")


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_type(key: str, value: Any, kind: str) -> Any:
    """Return the value converted to what ServerSpec holds, or raise SpecError naming the key."""

    def bad(want: str) -> SpecError:
        return SpecError(f"key {key!r} must be {want}, got {type(value).__name__} {value!r}", key=key)

    if kind == _STR:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == _BOOL:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == _FLOAT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number")
        return float(value)
    if kind == _STRS:
        if isinstance(value, str):
            value = [value]  # faults = "scale-skipped" reads naturally as one item
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    if kind == _ENV:
        if not isinstance(value, dict):
            raise bad('a table of NAME = "value"')
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise SpecError(f"key 'env.{k}' must be a string, got {type(v).__name__} {v!r}", key=key)
            out[str(k)] = str(v)
        return out
    if kind == _GPUS:  # "0,1", 0 or [0, 1]
        if isinstance(value, bool):
            raise bad('a device list such as "0,1"')
        if isinstance(value, int):
            return str(value)
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return ",".join(str(v) for v in value)
        if isinstance(value, str):
            return value
        raise bad('a device list such as "0,1"')
    raise ValueError(f"unknown kind {kind}")  # pragma: no cover - internal table


def spec_from_table(table: dict[str, Any], *, default_name: str, ignore: Sequence[str] = ()) -> ServerSpec:
    """A ServerSpec from one TOML table; `ignore` lists keys the caller handles (scheme, golden...)."""
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key in ignore:
            continue
        if key not in SPEC_KEYS:
            raise SpecError(f"key {key!r} is unknown{did_you_mean(key, [*SPEC_KEYS, *ignore])}", key=key)
        kwargs[key] = check_type(key, value, SPEC_KEYS[key])
    kwargs.setdefault("name", default_name)
    if "command" in kwargs and "url" in kwargs:
        raise SpecError(f"server {kwargs['name']!r}: give either 'command' or 'url', not both", key="url")
    kind = "url" if "url" in kwargs else "command" if "command" in kwargs else "shim"
    for key in kwargs:
        if kind == "url" and key not in URL_ALLOWED:
            raise SpecError(f"key {key!r} does not apply to a 'url' server (nothing is started)", key=key)
        if kind == "command" and key in SHIM_ONLY:
            raise SpecError(
                f"key {key!r} applies only to built-in shim servers ('model' without 'command'); "
                "put the engine's own flag into 'command'",
                key=key,
            )
    _check_choice(kwargs, "quant", SCHEMES)
    _check_choice(kwargs, "backend", BACKENDS)
    for fault in kwargs.get("faults", ()):
        fault_name = fault.split("@", 1)[0]
        if fault_name not in FAULTS:
            raise SpecError(
                f"key 'faults': {fault_name!r} is not a fault (one of {', '.join(FAULTS)})"
                f"{did_you_mean(fault_name, FAULTS)}",
                key="faults",
            )
        scheme = kwargs.get("quant", "none")
        if scheme not in FAULT_SCHEMES[fault_name]:
            raise SpecError(
                f"key 'faults': {fault_name} cannot exist in scheme {scheme!r}; it applies to "
                f"{', '.join(FAULT_SCHEMES[fault_name])}",
                key="faults",
            )
    if "port" in kwargs and not 0 < kwargs["port"] < 65536:
        raise SpecError(f"key 'port' must be 1..65535, got {kwargs['port']}", key="port")
    if kwargs.get("startup_timeout_s", 1.0) <= 0:
        raise SpecError("key 'startup_timeout_s' must be positive", key="startup_timeout_s")
    return ServerSpec(**kwargs)


def _check_choice(kwargs: dict[str, Any], key: str, choices: Sequence[str]) -> None:
    if key in kwargs and kwargs[key] not in choices:
        raise SpecError(
            f"key {key!r} must be one of {', '.join(choices)}; got {kwargs[key]!r}{did_you_mean(kwargs[key], choices)}",
            key=key,
        )


def auto_golden(target: ServerSpec, name: str | None = None) -> ServerSpec:
    """`golden = "auto"`: the same model and scheme on the reference backend, without faults."""
    if target.kind != "shim":
        raise SpecError(
            f'server {target.name!r}: golden = "auto" needs a built-in shim target; for an external '
            "engine name the golden server yourself (golden = {{ command = ... }} or {{ url = ... }})",
            key="golden",
        )
    return dataclasses.replace(
        target, name=name or f"{target.name}-golden", backend="torch", faults=(), ck_free=False, port=None
    )


def resolve_paths(spec: ServerSpec, base: Path) -> ServerSpec:
    """Paths in a config are relative to the config file's folder, not to where one runs from."""
    changes: dict[str, Any] = {}
    if spec.cwd is not None:
        changes["cwd"] = str((base / spec.cwd).resolve())
    if spec.kind == "shim" and spec.model is not None and (base / spec.model).exists():
        changes["model"] = str((base / spec.model).resolve())  # a local HF folder or .gguf, not a preset
    return dataclasses.replace(spec, **changes) if changes else spec


def pair_specs(path: Path) -> list[ServerSpec]:
    """The reference and target specs of a difftest config, without difftest (goldens are not
    started: `pair` is for poking at the servers by hand)."""
    import tomllib

    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    base = path.resolve().parent
    ref = doc.get("reference")
    if not isinstance(ref, dict):
        raise SpecError("needs a [reference] table")
    targets = doc.get("target", [])
    if not isinstance(targets, list):
        raise SpecError("targets are an array of tables: write [[target]], not [target]")
    tables = [(ref, "reference", ())] + [
        (t, f"target-{i + 1}", ("scheme", "golden", "expect")) for i, t in enumerate(targets)
    ]
    debug = doc.get("run", {}).get("whitebox", "auto") != "off"  # as difftest.config does
    specs = []
    for table, name, ignore in tables:
        spec = spec_from_table(table, default_name=name, ignore=ignore)
        if spec.kind == "shim" and "debug" not in table:
            spec = dataclasses.replace(spec, debug=debug)
        specs.append(resolve_paths(spec, base))
    return specs
