"""One TOML file -> a frozen RunConfig, every mistake reported as `file:line: [section] key ...`.

    [run]          prompts, max_tokens, logprobs, concurrency, output_dir, seed, ...  (RunSettings)
    [reference]    one server spec (server_shim.launch.ServerSpec keys)
    [[target]]     one or more: a server spec + scheme, golden, expect
    [thresholds]   metric = number (all schemes) or [thresholds.<scheme>] metric = number

Why line numbers: a config with five targets and a typo in one of them is the common case, and
tomllib reports none for semantic errors, so `_KeyLocator` finds each key in the raw text.
Why "auto" goldens are expanded here: the runner and the reports then see plain server specs,
and identical goldens (two targets sharing model and scheme) are started once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from difftest.errors import ConfigError
from server_shim.catalog import SCHEMES
from server_shim.launch_spec import (
    ServerSpec,
    SpecError,
    auto_golden,
    check_type,
    did_you_mean,
    resolve_paths,
    spec_from_table,
)
from server_shim.option_rules import MODEL_PRESETS, model_source  # the shim's own rules, torch-free

WHITEBOX = ("auto", "off", "on")
NULLS = ("twin", "aa", "none")  # difftest.null: the golden's rounding twin, in-run A/A, none
EXPECT = ("pass", "fail")
TARGET_KEYS = ("scheme", "golden", "expect")
TOP_KEYS = ("run", "reference", "target", "thresholds")


@dataclass(frozen=True)
class RunSettings:
    prompts: tuple[Path, ...]
    max_tokens: int = 32
    logprobs: int = 5  # top-k per position; OpenAI-compatible servers cap it at 20
    concurrency: int = 8
    output_dir: Path = Path("runs/default")
    seed: int = 0
    request_timeout_s: float = 120.0
    max_retries: int = 3
    error_rate_limit: float = 0.05  # above this fraction of failed requests the run is exit 3
    limit: int | None = None  # use only the first N prompts
    noise_floor: Path | None = None
    whitebox: str = "auto"  # auto: per-layer diff where both sides serve /debug
    batch_slot_check: bool = True
    endpoint: str = "completions"  # "chat": compare over /v1/chat/completions (difftest.chat)
    null: str = "twin"  # exactness null model: "twin" | "aa" | "none" (difftest.null)


@dataclass(frozen=True)
class TargetConfig:
    server: ServerSpec
    scheme: str | None = None  # which budget judges accuracy; None: an external target without one
    golden: ServerSpec | None = None  # "auto" is already expanded; None: accuracy only
    expect: str = "pass"  # "fail" marks a negative control
    twin: ServerSpec | None = None  # the golden's rounding twin (a shim golden, `null = "twin"`)

    @property
    def name(self) -> str:
        return self.server.name


@dataclass(frozen=True)
class RunConfig:
    run: RunSettings
    reference: ServerSpec
    targets: tuple[TargetConfig, ...]
    thresholds: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # scheme|"default" -> metric -> limit
    source: Path | None = None
    baseline: Path | None = None  # [reference] baseline = "FILE": a recorded reference (difftest record)

    def servers(self) -> tuple[ServerSpec, ...]:
        """Every server to start, each once: reference, targets, then goldens (shared ones once)."""
        out: dict[str, ServerSpec] = {self.reference.name: self.reference}

        def add(spec: ServerSpec) -> None:
            if out.setdefault(spec.name, spec) != spec:  # parse_config refuses this: never silently one
                raise ConfigError(f"server name {spec.name!r} names two different servers")

        for t in self.targets:
            add(t.server)
        for t in self.targets:
            if t.golden is not None:
                add(t.golden)
        for t in self.targets:
            if t.twin is not None:
                add(t.twin)
        return tuple(out.values())

    def thresholds_for(self, scheme: str | None) -> dict[str, float]:
        return thresholds_for(self.thresholds, scheme)

    def target(self, name: str) -> TargetConfig:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)


def thresholds_for(thresholds: Mapping[str, Mapping[str, float]], scheme: str | None) -> dict[str, float]:
    """The flat overrides verdict.judge_target takes: [thresholds] merged with [thresholds.<scheme>],
    the scheme's table winning check by check whichever spelling each table uses: judge_target
    ranks `accuracy.top1_agreement` over `top1_min`, so a general dotted key left beside the
    scheme's budget field silently beat the more specific table. A general key is dropped only
    where the scheme's keys set every check it sets (a general `failed_rate_max` still sets the
    accuracy part beside a scheme's `exactness.failed_rate`)."""
    from difftest.verdict import Overrides, threshold_checks

    name = scheme or "none"
    own = thresholds.get(name, {})
    covered = {check for key in own for check in threshold_checks(key)}
    general = {k: v for k, v in thresholds.get("default", {}).items() if not threshold_checks(k) <= covered}
    return Overrides({**general, **own}, tables={key: f"[thresholds.{name}]" for key in own})


def unused_tables(thresholds: Mapping[str, Any], schemes: Sequence[str | None], where: str) -> list[str]:
    """A `[thresholds.<scheme>]` table that no target's scheme reads, as a warning naming `where`
    it was written: a typo'd scheme would otherwise change nothing without a word. Warned, not
    refused: one file may serve runs of several schemes, and a url target's scheme is known only
    once its /debug/config has been read."""
    read = sorted({s or "none" for s in schemes})
    return [
        f"{where}[thresholds.{name}] applies to no target of this run (schemes: {', '.join(read)}): ignored"
        for name in thresholds
        if name != "default" and name not in read
    ]


# ----------------------------------------------------------------------------- locating keys


_KEY = r'(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')'
_HEADER_RE = re.compile(rf"^\s*(\[\[?)\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*\]\]?")
_ASSIGN_RE = re.compile(rf"^\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*=")
_INLINE_KEY_RE = re.compile(rf"[{{,]\s*({_KEY})\s*=")


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(p.strip().strip("\"'") for p in re.findall(_KEY, dotted))


class _KeyLocator:
    """Maps (table path, key) to a 1-based line. `[[target]]` tables are ("target", i)."""

    def __init__(self, text: str) -> None:
        self.keys: dict[tuple[tuple[Any, ...], str], int] = {}
        self.tables: dict[tuple[Any, ...], int] = {}
        counts: dict[str, int] = {}
        table: tuple[Any, ...] = ()
        in_multiline = False
        for lineno, line in enumerate(text.splitlines(), 1):
            quotes = line.count('"""') + line.count("'''")
            if in_multiline:
                in_multiline = quotes % 2 == 0
                continue
            if m := _HEADER_RE.match(line):
                parts = _parts(m.group(2))
                if m.group(1) == "[[":
                    counts[parts[0]] = counts.get(parts[0], -1) + 1
                    table = (parts[0], counts[parts[0]], *parts[1:])
                elif parts[0] in counts:  # [target.golden] belongs to the latest [[target]]
                    table = (parts[0], counts[parts[0]], *parts[1:])
                else:
                    table = parts
                self.tables.setdefault(table, lineno)
            elif m := _ASSIGN_RE.match(line):
                parts = _parts(m.group(1))
                for i in range(len(parts)):
                    self.keys.setdefault((table + parts[:i], parts[i]), lineno)
                rest = line[m.end() :]
                if rest.lstrip().startswith("{"):  # golden = { model = "...", ... }
                    for key in _INLINE_KEY_RE.findall(rest):
                        self.keys.setdefault((table + parts, _parts(key)[0]), lineno)
                in_multiline = quotes % 2 == 1

    def line(self, table: tuple[Any, ...], key: str | None) -> int | None:
        while True:
            if key is not None and (table, key) in self.keys:
                return self.keys[(table, key)]
            if key is not None and (*table, key) in self.tables:  # the key is a [table] header
                return self.tables[(*table, key)]
            if table in self.tables:
                return self.tables[table]
            if not table:
                return None
            table, key = table[:-1], str(table[-1])  # an inline sub-table: point at its key


def _label(table: tuple[Any, ...]) -> str:
    if not table:
        return ""
    if table[0] == "target" and len(table) >= 2:
        return "[[target]]" if len(table) == 2 else f"[target.{'.'.join(map(str, table[2:]))}]"
    return f"[{'.'.join(map(str, table))}]"


class _Ctx:
    """Builds ConfigErrors that carry file, line and section."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.locator = _KeyLocator(text)

    def error(self, table: tuple[Any, ...], key: str | None, message: str) -> ConfigError:
        line = self.locator.line(table, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        label = _label(table)
        text = f"{where}: {label} {message}" if label else f"{where}: {message}"
        return ConfigError(text, path=self.path, line=line, key=key)


# ----------------------------------------------------------------------------- loading


def read_toml_text(path: Path) -> str:
    """A TOML file's text: UTF-8 (TOML's only encoding), a leading BOM dropped as editors write it;
    other bytes are a ConfigError naming the file and where, not a UnicodeDecodeError."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); TOML files are UTF-8",
            path=path,
            line=line,
        ) from None


def load_config(path: str | Path, *, require_targets: bool = True) -> RunConfig:
    """Read, validate and resolve a config; relative paths are relative to the file's folder.
    require_targets=False: a config with no [[target]] is whole (`noise` measures the reference alone)."""
    path = Path(path)
    try:
        text = read_toml_text(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(doc, text=text, path=path, require_targets=require_targets)


def parse_config(doc: dict[str, Any], *, text: str, path: Path, require_targets: bool = True) -> RunConfig:
    ctx = _Ctx(path, text)
    base = path.resolve().parent
    for key in doc:
        if key not in TOP_KEYS:
            raise ctx.error((), key, f"table [{key}] is unknown{did_you_mean(key, TOP_KEYS)}")
    run = _parse_run(ctx, _table(ctx, doc, "run", required=True), base, path.stem)
    thresholds = _parse_thresholds(ctx, _table(ctx, doc, "thresholds", required=False))
    debug_default = run.whitebox != "off"  # white-box parts need the debug routes on built-in shims

    ref_table = _table(ctx, doc, "reference", required=True)
    baseline = _baseline(ctx, ref_table, base)
    if baseline is not None:
        name = _typed(ctx, ("reference",), "name", ref_table.get("name", "reference"), "string")
        reference = ServerSpec(name=name, url=baseline.as_uri())
    else:
        reference = _server(ctx, ("reference",), ref_table, "reference", base, debug_default)
    raw_targets = doc.get("target", [])
    if isinstance(raw_targets, dict):
        raise ctx.error(("target",), None, "targets are an array of tables: write [[target]], not [target]")
    if not raw_targets and require_targets:
        raise ctx.error((), None, "needs at least one [[target]] table")
    targets: list[TargetConfig] = []
    goldens: list[ServerSpec] = []
    for i, table in enumerate(raw_targets):
        targets.append(_parse_target(ctx, ("target", i), table, base, debug_default, goldens))
    if run.null == "twin":
        targets = [dataclasses.replace(t, twin=_twin_of(t.golden)) for t in targets]

    owner: dict[str, ServerSpec] = {reference.name: reference}
    for i, t in enumerate(targets):
        specs = (
            (t.server, ("target", i)),
            (t.golden, ("target", i, "golden")),
            (t.twin, ("target", i, "golden")),
        )
        for spec, where in specs:
            # a shared auto golden is one server, and so is its twin (made once per target, equal)
            if (
                spec is None
                or owner.get(spec.name) is spec
                or (spec is t.twin and owner.get(spec.name) == spec)
            ):
                continue
            if spec.name in owner:
                why = (
                    f" (the rounding twin of golden {t.golden.name!r} is named so)" if spec is t.twin else ""
                )
                raise ctx.error(
                    where, "name", f"server name {spec.name!r} is used twice{why}; names must be unique"
                )
            owner[spec.name] = spec
    return RunConfig(
        run=run, reference=reference, targets=tuple(targets), thresholds=thresholds, source=path,
        baseline=baseline,
    )  # fmt: skip


# routes pasted as a server URL (a curl line holds one; an OpenAI client takes the base URL)
_ROUTES = ("/chat/completions", "/completions")


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a server's address (None: it can). A bad port or host used to be a
    traceback (OverflowError, httpx.InvalidURL) or an exit 3 "server down" at the first request."""
    if not url.startswith(("http://", "https://")):
        return f"{url!r} is not an http(s) URL"
    import httpx

    def bad(why: str) -> str:
        return f"{url!r} is not a valid http(s) URL: {why}"

    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "Invalid IPv6 URL"
        return bad(str(exc))
    if any(c.isspace() for c in url):
        return bad("it contains whitespace")
    if not parts.hostname:
        return bad("it names no host")
    try:
        port = parts.port
    except ValueError:  # not a number, or over 65535
        port = -1
    if port is not None and not 0 < port < 65536:
        return bad(f"port {parts.netloc.rpartition(':')[2]!r} is not a number in 1..65535")
    try:
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        return bad(str(exc))
    route = next((r for r in _ROUTES if parts.path.rstrip("/").endswith(r)), None)
    if route is not None:  # difftest appends the routes: the server answered 404 on .../completions/health
        base = url[: url.rstrip("/").rfind(route)]
        return f"{url!r} names the route {route}; give the server's base URL ({base or url}), difftest adds the routes"
    return None


def _baseline(ctx: _Ctx, table: dict[str, Any], base: Path) -> Path | None:
    """`[reference] baseline = "FILE"` (with an optional name, nothing else): a recorded reference."""
    if "baseline" not in table:
        return None
    value = _typed(ctx, ("reference",), "baseline", table["baseline"], "string")
    extra = sorted(k for k in table if k not in ("baseline", "name"))
    if extra:
        raise ctx.error(
            ("reference",), extra[0], f"key {extra[0]!r} cannot go with 'baseline' (a recorded reference)"
        )
    return (base / value).resolve()


def _twin_of(golden: ServerSpec | None) -> ServerSpec | None:
    """The golden's rounding twin (server_shim.twin); only a built-in shim golden has one. Shared
    goldens share one twin (same name)."""
    if golden is None or golden.kind != "shim":
        return None
    return dataclasses.replace(golden, name=f"{golden.name}-twin", rounding_noise="auto", port=None)


def _table(ctx: _Ctx, doc: dict[str, Any], key: str, *, required: bool) -> dict[str, Any]:
    value = doc.get(key)
    if value is None:
        if required:
            raise ctx.error((), None, f"needs a [{key}] table")
        return {}
    if not isinstance(value, dict):
        raise ctx.error((), key, f"{key!r} must be a table [{key}]")
    return value


def _server(
    ctx: _Ctx, where: tuple[Any, ...], table: dict[str, Any], name: str, base: Path, debug_default: bool,
    ignore: tuple[str, ...] = (),
) -> ServerSpec:  # fmt: skip
    try:
        spec = spec_from_table(table, default_name=name, ignore=ignore)
    except SpecError as exc:
        raise ctx.error(where, exc.key, str(exc)) from None
    if spec.kind == "shim" and "debug" not in table:
        spec = dataclasses.replace(spec, debug=debug_default)
    if spec.kind == "url" and (why := url_problem(spec.url)) is not None:
        raise ctx.error(where, "url", f"key 'url': {why}")
    spec = resolve_paths(spec, base)
    _check_launchable(ctx, where, spec, base)
    return spec


def _check_launchable(ctx: _Ctx, where: tuple[Any, ...], spec: ServerSpec, base: Path) -> None:
    """Mistakes that used to surface only after servers were launched (exit 3, no config line)."""
    if spec.kind == "shim" and model_source(spec.model or "") is None:
        path = (base / Path(spec.model or "").expanduser()).resolve()
        seen = "neither a .gguf file nor a folder with config.json" if path.exists() else "nothing is there"
        at = "" if str(path) == spec.model else f" at {path}"
        raise ctx.error(
            where, "model",
            f"model {spec.model!r} is not one the shim loads ({seen}{at}): use a preset "
            f"({', '.join(MODEL_PRESETS)}), a .gguf file or an HF model folder with config.json",
        )  # fmt: skip
    if spec.kind == "command" and spec.port is None and "{port}" not in (spec.command or ""):
        raise ctx.error(
            where, "command",
            "the command has no {port} placeholder: put {port} where the engine takes its port, "
            "or set 'port' to the port it listens on",
        )  # fmt: skip
    if spec.kind == "command":
        _check_command(ctx, where, spec)
    if spec.kind == "shim":
        _check_shim_flags(ctx, where, spec)
        _check_shim_env(ctx, where, spec)
    if spec.cwd is not None:
        _check_cwd(ctx, where, spec.cwd)


def _check_cwd(ctx: _Ctx, where: tuple[Any, ...], cwd: str) -> None:
    """A `cwd` that is no folder (resolved against the config's folder, as every path of the file)
    was found only by the launch, as "cannot run '<python>': No such file or directory" (exit 3),
    blaming the interpreter and the infrastructure for the config's key."""
    from server_shim.launch import cwd_problem

    if (why := cwd_problem(cwd)) is not None:
        raise ctx.error(where, "cwd", f"key 'cwd': {why}")


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print the usage and exit
        raise argparse.ArgumentError(None, message)


def _check_shim_flags(ctx: _Ctx, where: tuple[Any, ...], spec: ServerSpec) -> None:
    """The shim's own checks of its flags (its argparse, then server_shim.option_rules: a dtype or
    device it does not know, a rounding noise out of range, a slot fault under batch_invariant, a
    backend with quant "none", ...) run here on the argv the launcher would
    give it, extra_args included: a refused server is a config line, not an exit 2 found after the
    other servers have started."""
    from server_shim import options
    from server_shim.errors import ShimError
    from server_shim.launch import build_argv
    from server_shim.option_rules import OptionValueError, refuse_serve_options

    parser = _RaisingParser(add_help=False, allow_abbrev=False)  # allow_abbrev: as the shim's own
    options.add_arguments(parser)
    argv = build_argv(spec, spec.port or 1)[4:]  # after `python -m server_shim serve`
    try:
        refuse_serve_options(options.from_namespace(parser.parse_args(argv)))
    except (argparse.ArgumentError, ShimError) as exc:
        key = exc.option if isinstance(exc, OptionValueError) else None  # a value: its key's line
        raise ctx.error(where, key, f"the shim would refuse to start: {exc}") from None


def _check_shim_env(ctx: _Ctx, where: tuple[Any, ...], spec: ServerSpec) -> None:
    """The shim's variables in its `env` table, and in the environment it inherits: a misspelt name
    was read as unset (no word), a bad value stopped the shim only once launched (exit 3)."""
    from server_shim.switches import SwitchError, check_switches, unknown_variable_problem

    for name in spec.env or {}:
        if name != spec.api_key_env and (why := unknown_variable_problem(name)) is not None:
            raise ctx.error(where, "env", f"key 'env.{name}': {why}")
    for environ, origin in (
        (spec.env or {}, ""),
        ({**os.environ, **(spec.env or {})}, " (set in difftest's environment)"),
    ):
        try:
            check_switches(environ)
        except SwitchError as exc:
            raise ctx.error(where, "env", f"the shim would refuse to start: {exc}{origin}") from None


# `{name}` left in a command after the launcher's placeholders are replaced (a doubled `{{...}}`,
# as in a chat template, is not one)
_UNKNOWN_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")


def _check_command(ctx: _Ctx, where: tuple[Any, ...], spec: ServerSpec) -> None:
    """A command the launcher could not split (unbalanced quotes: a ValueError traceback), or with a
    placeholder it does not know (`{prot}` went to the engine literally), is the config's mistake."""
    from server_shim.launch import PLACEHOLDERS, build_argv

    try:
        argv = build_argv(spec, spec.port or 1)
    except ValueError as exc:  # shlex: "No closing quotation", "No escaped character"
        raise ctx.error(where, "command", f"key 'command' cannot be split into arguments: {exc}") from None
    for arg in argv:
        if m := _UNKNOWN_PLACEHOLDER.search(arg):
            raise ctx.error(
                where, "command",
                f"key 'command' has an unknown placeholder {{{m.group(1)}}} (known: {', '.join(PLACEHOLDERS)})",
            )  # fmt: skip


def _parse_target(
    ctx: _Ctx, where: tuple[Any, ...], table: Any, base: Path, debug_default: bool,
    goldens: list[ServerSpec],
) -> TargetConfig:  # fmt: skip
    if not isinstance(table, dict):
        raise ctx.error(where, None, "must be a table")
    server = _server(ctx, where, table, f"target-{where[1] + 1}", base, debug_default, ignore=TARGET_KEYS)

    scheme = table.get("scheme", server.quant if server.kind == "shim" else None)
    if scheme is not None:
        scheme = _typed(ctx, where, "scheme", scheme, "string")
        if scheme not in SCHEMES:
            raise ctx.error(
                where, "scheme",
                f"key 'scheme' must be one of {', '.join(SCHEMES)}; got {scheme!r}{did_you_mean(scheme, SCHEMES)}",
            )  # fmt: skip

    expect = _typed(ctx, where, "expect", table.get("expect", "pass"), "string")
    if expect not in EXPECT:
        raise ctx.error(where, "expect", f'key \'expect\' must be "pass" or "fail", got {expect!r}')

    golden: ServerSpec | None = None
    raw = table.get("golden")
    if raw == "auto":
        try:
            golden = auto_golden(server)
        except SpecError as exc:
            raise ctx.error(where, "golden", str(exc)) from None
        for earlier in goldens:  # the same golden for two targets is one server
            if dataclasses.replace(earlier, name=golden.name) == golden:
                golden = earlier
                break
        else:
            goldens.append(golden)
    elif isinstance(raw, dict):
        golden = _server(ctx, (*where, "golden"), raw, f"{server.name}-golden", base, debug_default)
    elif raw is not None and raw != "none":
        raise ctx.error(
            where, "golden", f'key \'golden\' must be "auto", "none" or a server table, got {raw!r}'
        )
    return TargetConfig(server=server, scheme=scheme, golden=golden, expect=expect)


def _typed(ctx: _Ctx, where: tuple[Any, ...], key: str, value: Any, kind: str) -> Any:
    try:
        return check_type(key, value, kind)
    except SpecError as exc:
        raise ctx.error(where, key, str(exc)) from None


TOKENIZER_WHY = (
    "the pairs are tokenized by the servers themselves (their token ids, else a /tokenize of the pair), "
    "else compared word by word, as the report says (README: servers with gaps)"
)

# key -> (kind for check_type, lower bound, upper bound)
_RUN_KEYS: dict[str, tuple[str, float | None, float | None]] = {
    "prompts": ("strings", None, None),
    "max_tokens": ("integer", 1, None),
    "logprobs": ("integer", 1, 20),
    "concurrency": ("integer", 1, None),
    "output_dir": ("string", None, None),
    "seed": ("integer", 0, None),  # also the bootstrap's seed: numpy takes no negative one
    "request_timeout_s": ("number", 1e-3, None),
    "max_retries": ("integer", 0, None),
    "error_rate_limit": ("number", 0, 1),
    "limit": ("integer", 1, None),
    "noise_floor": ("string", None, None),
    "whitebox": ("string", None, None),
    "batch_slot_check": ("boolean", None, None),
    "endpoint": ("string", None, None),
    "null": ("string", None, None),
}
ENDPOINTS = ("completions", "chat")
# logprobs = 0 gave empty continuations that matched 100%: why 0 is refused
LOGPROBS_WHY = "the continuation's tokens are read from the logprobs block"
_RUN_WHY = {"logprobs": f" ({LOGPROBS_WHY})"}


def _parse_run(ctx: _Ctx, table: dict[str, Any], base: Path, stem: str) -> RunSettings:
    where = ("run",)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == "tokenizer":  # once documented, never read: refused, never silently ignored
            raise ctx.error(where, key, f"key {key!r} is not supported: {TOKENIZER_WHY}")
        if key not in _RUN_KEYS:
            raise ctx.error(where, key, f"key {key!r} is unknown{did_you_mean(key, _RUN_KEYS)}")
        kind, lo, hi = _RUN_KEYS[key]
        value = _typed(ctx, where, key, value, kind)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo:g}" if hi is None else f"in {lo:g}..{hi:g}"
            raise ctx.error(where, key, f"key {key!r} must be {bounds}{_RUN_WHY.get(key, '')}, got {value!r}")
        values[key] = value
    if "prompts" not in values:
        raise ctx.error(where, None, "key 'prompts' is required (one or more .jsonl files)")
    prompts: list[Path] = []
    for name in values["prompts"]:
        p = (base / name).resolve()
        if p.is_dir():
            prompts += sorted(p.glob("*.jsonl"))
        elif p.is_file():
            prompts.append(p)
        else:
            raise ctx.error(where, "prompts", f"prompts file {name!r} does not exist (looked at {p})")
    if not prompts:
        raise ctx.error(where, "prompts", "key 'prompts' names no .jsonl file")
    values["prompts"] = tuple(prompts)
    whitebox = values.get("whitebox", "auto")
    if whitebox not in WHITEBOX:
        raise ctx.error(where, "whitebox", f"key 'whitebox' must be one of auto, off, on; got {whitebox!r}")
    if values.get("endpoint", "completions") not in ENDPOINTS:
        got = values["endpoint"]
        raise ctx.error(where, "endpoint", f"key 'endpoint' must be one of completions, chat; got {got!r}")
    if values.get("null", "twin") not in NULLS:
        raise ctx.error(
            where, "null", f"key 'null' must be one of {', '.join(NULLS)}; got {values['null']!r}"
        )
    # Default output folder: runs/<config name> under the working directory (`-o` overrides).
    values["output_dir"] = (
        (base / values["output_dir"]).resolve() if "output_dir" in values else Path.cwd() / "runs" / stem
    )
    if "noise_floor" in values:
        values["noise_floor"] = (base / values["noise_floor"]).resolve()
    return RunSettings(**values)


def load_thresholds(path: Path) -> dict[str, dict[str, float]]:
    """A thresholds file for `difftest report --thresholds`: the same `[thresholds]` table (and
    the same checks, errors naming file, line and key) as a run config; a file that is only the
    table's body (`kl_mean_max = 0.05`, `[fp8-block]`) is read as that table."""
    try:
        text = read_toml_text(path)
    except FileNotFoundError:
        raise ConfigError(f"--thresholds: {path} does not exist", path=path) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read thresholds: {exc.strerror or exc}", path=path) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}", path=path) from None
    ctx = _Ctx(path, text)
    config_tables = sorted(set(doc) & set(TOP_KEYS) - {"thresholds"})
    if "thresholds" in doc or config_tables:  # a run config's other tables: not read as schemes
        unknown = config_tables or sorted(set(doc) - {"thresholds"})
        if unknown:
            raise ctx.error(
                (), unknown[0], f"a thresholds file holds only [thresholds]; {unknown[0]!r} is not one"
            )
        return _parse_thresholds(ctx, _table(ctx, doc, "thresholds", required=True))
    return _parse_thresholds(ctx, doc, root=())


def _parse_thresholds(
    ctx: _Ctx, table: dict[str, Any], root: tuple[Any, ...] = ("thresholds",)
) -> dict[str, dict[str, float]]:
    """`[thresholds]` -> {"default" | scheme: {metric: limit}}. Dotted metric names
    (`exactness.kl_mean = 0.01`) arrive from tomllib as nested tables and are flattened back.
    `root`: where the table sits in the file (() for a thresholds file that is only its body), so
    errors name the line."""
    known = _known_metrics()
    fractions = _verdict_keys("FRACTION_KEYS") or frozenset()
    broken = _verdict_keys("BROKEN_KEYS") or frozenset()  # at load, not after the run: exit 2
    parts = {k.split(".", 1)[0] for k in known or () if "." in k} | {"exactness", "accuracy"}
    out: dict[str, dict[str, float]] = {}
    checks = _twin_checks()
    seen: dict[tuple[str, str], tuple[str, str, Any, int | None]] = {}  # (scheme, check) -> first setter

    def claim(scheme: str, table: str, where: tuple[Any, ...], key: str, metric: str, value: Any) -> None:
        """Refuse a second, different limit for a check that this scheme's tables already set (one
        key in [thresholds] and [thresholds.default], a budget field and its dotted twin in one
        table): the later line in the file won, silently. Equal values say one thing: accepted."""
        line = ctx.locator.line(where, key)
        for check in sorted(checks(metric)):
            first = seen.get((scheme, check))
            # a dotted key narrows a two-part budget field to one part (failed_rate_max beside
            # exactness.failed_rate: the dotted key is exactness's limit, the field accuracy's, as
            # verdict._part reads them): not two limits for one thing. The narrowest setter stands
            # for the check, so that two dotted keys that disagree are still caught.
            if first is None or len(checks(metric)) < len(checks(first[1])):
                seen[(scheme, check)] = (table, metric, value, line)
                continue
            first_table, first_metric, first_value, first_line = first
            if len(checks(metric)) == len(checks(first_metric)) and float(first_value) != float(value):
                at = f" (line {first_line})" if first_line else ""
                scope = " for every scheme" if scheme == "default" else ""
                raise ConfigError(
                    f"{ctx.path}:{line}: {table} {metric} = {value!r} disagrees with {first_table} "
                    f"{first_metric} = {first_value!r}{at}: both set the limit of {check}{scope}; keep one",
                    path=ctx.path, line=line, key=key,
                )  # fmt: skip

    def add(scheme: str, table: str, where: tuple[Any, ...], items: dict[str, Any], prefix: str = "") -> None:
        for key, value in items.items():
            metric = prefix + key
            if isinstance(value, dict) and not prefix and key in parts:
                add(scheme, table, (*where, key), value, prefix=f"{key}.")
                continue
            if known is not None and metric not in known:
                hint = did_you_mean(metric, sorted(known)) or f" (known: {', '.join(sorted(known))})"
                raise ctx.error(where, key, f"metric {metric!r} is unknown{hint}")
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ctx.error(where, key, f"key {metric!r} must be a finite number >= 0, got {value!r}")
            if metric in fractions and value > 1:  # 95 meant 95%: judged as 9500%, never failing
                raise ctx.error(
                    where, key, f"key {metric!r} must be in 0..1 (a fraction, not a percent), got {value!r}"
                )
            if metric in broken and value >= 1:  # as difftest.verdict's _check_overrides says
                raise ctx.error(
                    where, key,
                    f"key {metric!r} = {value!r} can never fail: it passes a target whose every answer is "
                    "impossible (NaN or malformed logprobs); give a fraction under 1",
                )  # fmt: skip
            claim(scheme, table, where, key, metric, value)
            out.setdefault(scheme, {})[metric] = float(value)

    for key, value in table.items():
        if isinstance(value, dict) and key not in parts:  # [thresholds.fp8-block]
            if key != "default" and key not in SCHEMES:
                raise ctx.error(
                    root, key,
                    f"scheme {key!r} is unknown (one of default, {', '.join(SCHEMES)}){did_you_mean(key, SCHEMES)}",
                )  # fmt: skip
            add(key, _label((*root, key)), (*root, key), value)
        else:
            add("default", _label(root) or "the top level", root, {key: value})
    return out


def _known_metrics() -> frozenset[str] | None:
    """Metric names the verdict knows, when difftest.verdict publishes them (THRESHOLD_KEYS)."""
    return _verdict_keys("THRESHOLD_KEYS")


def _twin_checks() -> Callable[[str], frozenset[str]]:
    """verdict.threshold_checks (the checks a [thresholds] key sets), or each key its own check
    where difftest.verdict does not publish it."""
    try:
        return importlib.import_module("difftest.verdict").threshold_checks  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        return lambda key: frozenset({key})


def _verdict_keys(name: str) -> frozenset[str] | None:
    """A key set difftest.verdict publishes (THRESHOLD_KEYS, FRACTION_KEYS, BROKEN_KEYS), None where
    it does not."""
    try:
        verdict = importlib.import_module("difftest.verdict")
    except ImportError:
        return None
    keys = getattr(verdict, name, None)
    return frozenset(keys) if keys else None
