"""TOML -> ServerSpec: the server spec, its validation and the names it is checked against.

ServerSpec's fields are the launcher's own keys (LAUNCH_KEYS) plus the shim options marked as spec
keys in the one option table (server_shim.options); the catalogs it checks values against are
server_shim.catalog's. Like launch.py this module imports no torch (docs/design.md, "Boundaries"),
so a config is validated without loading a model; it lives in server_shim so that
`python -m server_shim pair` works without difftest, and `difftest.config` reuses it and adds
line numbers to its errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

from server_shim.catalog import BACKENDS, FAULT_SCHEMES, FAULTS, SCHEMES
from server_shim.errors import LaunchError
from server_shim.options import BOOLEAN, BY_NAME, INTEGER, NUMBER, SPEC_OPTIONS, STRING, STRINGS

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # becomes a log file name


class SpecError(LaunchError):
    """A server spec that cannot be right; `key` names the offending TOML key (None: the table)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


_ENV, _GPUS = "env", "gpus"

# The launcher's own keys of a server table: (name, kind, default). The shim's options that are also
# table keys (dtype, quant, faults, ...) come from the one option table (options.SPEC_OPTIONS).
LAUNCH_KEYS: tuple[tuple[str, str, Any], ...] = (
    ("name", STRING, None),
    ("model", STRING, None),  # shim: the model to load; command / url: the id substituted for {model}
    ("command", STRING, None),
    ("url", STRING, None),
    ("extra_args", STRINGS, ()),
    ("env", _ENV, None),
    ("cwd", STRING, None),
    ("gpus", _GPUS, None),
    ("api_key_env", STRING, None),  # the variable in difftest's environment that holds this server's key
    ("port", INTEGER, None),
    ("startup_timeout_s", NUMBER, 600.0),
)
_PY = {STRING: str, BOOLEAN: bool, INTEGER: int, NUMBER: float, STRINGS: tuple, _ENV: dict, _GPUS: str}


class _SpecMethods:
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


def _spec_field(name: str, kind: str, default: Any) -> tuple[str, Any, Any]:
    if kind == _ENV:
        return name, dict[str, str], field(default_factory=dict)
    typ = _PY[kind] if default is not None else _PY[kind] | None
    return name, typ, field(default=default)


ServerSpec = dataclasses.make_dataclass(
    "ServerSpec",
    [("name", str)]
    + [_spec_field(n, k, d) for n, k, d in LAUNCH_KEYS[1:]]
    + [_spec_field(o.name, o.kind, o.default) for o in SPEC_OPTIONS],
    bases=(_SpecMethods,),
    frozen=True,
    namespace={
        "__module__": __name__,
        "__doc__": "One server to compare. Exactly one of `model` (built-in shim), `command`, `url` decides "
        "the kind; with `command` or `url`, `model` is only the id substituted for {model}. Fields: the "
        "launcher's keys (LAUNCH_KEYS) and the shim options that are table keys (options.SPEC_OPTIONS).",
    },
)


# ----------------------------------------------------------------------------- TOML -> ServerSpec

# key -> kind of value; "shim" keys apply only to built-in servers.
SPEC_KEYS: dict[str, str] = {n: k for n, k, _ in LAUNCH_KEYS} | {o.name: o.kind for o in SPEC_OPTIONS}
SHIM_ONLY = tuple(o.name for o in SPEC_OPTIONS)
_STR, _BOOL, _INT, _FLOAT, _STRS = STRING, BOOLEAN, INTEGER, NUMBER, STRINGS
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
        # TOML has nan and inf: a NaN limit compares false both ways (error_rate_limit = nan turned
        # the infrastructure check off) and an infinite timeout never fires
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad("a finite number")
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
    if kind == "url" and not kwargs["url"].startswith(("http://", "https://")):
        # else the first request's "unsupported protocol" read as a server up but broken (exit 3)
        raise SpecError(f"key 'url': {kwargs['url']!r} is not an http(s) URL", key="url")
    for key in kwargs:
        if kind == "url" and key not in URL_ALLOWED:
            raise SpecError(f"key {key!r} does not apply to a 'url' server (nothing is started)", key=key)
        if kind == "command" and key in SHIM_ONLY:
            raise SpecError(
                f"key {key!r} applies only to built-in shim servers ('model' without 'command'); "
                "put the engine's own flag into 'command'",
                key=key,
            )
    if kind == "shim":
        _check_extra_args(kwargs.get("extra_args", ()))
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


# A shim flag that is also a key of the server table (or one the launcher sets itself): in
# `extra_args` it bypassed the key's checks and `golden = "auto"` copied it into the golden and its
# twin (a --fault there made the golden as faulty as the target: KL 0, a negative control PASSed).
_KEYED_FLAGS: dict[str, str] = {o.argv_flag: o.name for o in SPEC_OPTIONS} | {
    "--model": "model", "--port": "port", "--api-key-env": "api_key_env",
}  # fmt: skip


# Flags the launcher owns with no key: a second --host after the launcher's would win (argparse
# keeps the last) and bind a test's server beyond loopback.
_LAUNCHER_FLAGS = ("--host",)


def _check_extra_args(extra: Sequence[str]) -> None:
    """Refuse a flag in a shim's `extra_args` that the table has a key for: one way to say it."""
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in _LAUNCHER_FLAGS:
            raise SpecError(
                f"key 'extra_args': {flag} is set by difftest (launched servers bind 127.0.0.1 only); "
                "to test a server elsewhere, start it yourself and give its 'url'",
                key="extra_args",
            )
        if flag in _KEYED_FLAGS:
            key = _KEYED_FLAGS[flag]
            raise SpecError(
                f"key 'extra_args': {flag} is what key {key!r} sets; use the key (extra_args skips its "
                'checks, and golden = "auto" would copy it into the golden)',
                key="extra_args",
            )


def _check_choice(kwargs: dict[str, Any], key: str, choices: Sequence[str]) -> None:
    if key in kwargs and kwargs[key] not in choices:
        raise SpecError(
            f"key {key!r} must be one of {', '.join(choices)}; got {kwargs[key]!r}{did_you_mean(kwargs[key], choices)}",
            key=key,
        )


def auto_golden(target: ServerSpec, name: str | None = None) -> ServerSpec:
    """`golden = "auto"`: the same model and scheme on the reference backend, without faults and
    without rounding noise (a target's noise in its golden would move the yardstick with the
    target; the golden's twin adds its own)."""
    if target.kind != "shim":
        raise SpecError(
            f'server {target.name!r}: golden = "auto" needs a built-in shim target; for an external '
            "engine name the golden server yourself (golden = { command = ... } or { url = ... })",
            key="golden",
        )
    return dataclasses.replace(
        target,
        name=name or f"{target.name}-golden",
        backend="torch",
        faults=(),
        ck_free=False,
        port=None,
        rounding_noise=BY_NAME["rounding_noise"].default,
    )


def resolve_paths(spec: ServerSpec, base: Path) -> ServerSpec:
    """Paths in a config are relative to the config file's folder, not to where one runs from."""
    changes: dict[str, Any] = {}
    if spec.cwd is not None:
        changes["cwd"] = str((base / spec.cwd).resolve())
    if spec.kind == "shim" and spec.model is not None and (base / Path(spec.model).expanduser()).exists():
        # a local HF folder or .gguf, not a preset; `~` as the shim reads it (an absolute path
        # ignores base)
        changes["model"] = str((base / Path(spec.model).expanduser()).resolve())
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
