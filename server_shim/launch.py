"""Paired launcher: start a reference and its targets side by side, wait for health, tear down.

A server is one of three kinds (`ServerSpec.kind`):

    shim      `model` set: our own `python -m server_shim serve ...`, every option as a flag
    command   `command` set: any engine (vLLM, SGLang, llama.cpp, ATOM) from a template with
              {port}, {host}, {model}, {api_key}; split with shlex and run without a shell
    url       `url` set: a server that already runs; health-checked, never started or stopped

Why process groups: engines fork workers (vLLM's engine core, tokenizer pools). Killing only the
pid we started leaves those holding the GPU and the port, so each server gets its own session
(`start_new_session=True`) and teardown signals the whole group — SIGTERM, a grace period, SIGKILL.

This module imports no torch (DESIGN.md "Boundaries"): difftest uses it to start servers it
never loads. The TOML -> ServerSpec parser lives here too so that `python -m server_shim pair`
works without difftest; `difftest.config` reuses it and adds line numbers to its errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from server_shim.errors import LaunchError

log = logging.getLogger(__name__)

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
HOST = "127.0.0.1"
TERM_GRACE_S = 10.0  # vLLM needs a few seconds to release the GPU after SIGTERM
LOG_TAIL_LINES = 30
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # becomes a log file name
_PLACEHOLDERS = ("{port}", "{host}", "{model}", "{api_key}")


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


@dataclass
class RunningServer:
    name: str
    url: str  # base URL without /v1, e.g. http://127.0.0.1:40123
    spec: ServerSpec
    pid: int | None  # None for a `url` server we did not start
    log_path: Path | None
    _proc: Any = field(default=None, repr=False, compare=False)  # subprocess.Popen

    def exit_code(self) -> int | None:
        """None while running (or never started by us); the exit code once it died."""
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)


# ----------------------------------------------------------------------------- launching


@contextlib.contextmanager
def launch_servers(specs: Sequence[ServerSpec], *, log_dir: Path) -> Iterator[dict[str, RunningServer]]:
    """Start every spec side by side, wait until all are healthy, yield them by name.

    Raises LaunchError (after tearing down whatever started) when a server dies while starting,
    misses its startup timeout, or its port is taken. Teardown runs on normal exit, on any
    exception and on KeyboardInterrupt raised inside the block.
    """
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LaunchError(f"server names must be unique; repeated: {', '.join(dupes)}")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    running: dict[str, RunningServer] = {}
    previous = _exit_on_sigterm()
    try:
        ports = _pick_ports(specs)
        threads = _cpu_threads_per_shim(specs)
        for spec in specs:
            running[spec.name] = _start(spec, ports.get(spec.name), log_dir, threads)
        _wait_healthy(list(running.values()))
        yield running
    finally:
        _teardown(list(running.values()))
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm() -> Any:
    """CI runners cancel a job with SIGTERM; by default Python dies without running `finally`,
    and servers in their own sessions would live on holding GPUs and ports. Turn SIGTERM into
    SystemExit(143) while servers run (main thread only, and only if nobody handles it already)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    return signal.SIG_DFL


def _pick_ports(specs: Sequence[ServerSpec]) -> dict[str, int]:
    """Free ports for every server we start. All probe sockets stay open until every port is
    picked so that two servers never get the same one; an explicit port that is taken is named."""
    held: list[socket.socket] = []
    ports: dict[str, int] = {}
    try:
        for spec in specs:
            if spec.kind == "url":
                continue
            if spec.kind == "command" and spec.port is None and "{port}" not in (spec.command or ""):
                raise SpecError(
                    f"server {spec.name!r}: the command has no {{port}} placeholder; set 'port' to the "
                    "port it listens on",
                    key="port",
                )
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # SO_REUSEADDR: a port in TIME_WAIT is usable by the server (uvicorn sets it too); only a
            # live listener makes the bind fail, which is the case worth reporting.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.append(sock)
            try:
                sock.bind((HOST, spec.port or 0))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise LaunchError(
                        f"server {spec.name!r}: port {spec.port} is already in use "
                        "(another server runs there; stop it or choose another port)"
                    ) from None
                raise LaunchError(f"server {spec.name!r}: cannot bind {HOST}:{spec.port}: {exc}") from None
            ports[spec.name] = sock.getsockname()[1]
    finally:
        for sock in held:
            sock.close()
    return ports


def build_argv(spec: ServerSpec, port: int, api_key: str | None = None) -> list[str]:
    """The command line for a shim or command spec (public: tests and `pair` print it)."""
    if spec.kind == "command":
        text = spec.command or ""
        values = {
            "{port}": str(port),
            "{host}": HOST,
            "{model}": spec.model or "",
            "{api_key}": api_key or "",
        }
        # Plain replacement, not str.format: engine flags often hold JSON braces.
        for placeholder in _PLACEHOLDERS:
            text = text.replace(placeholder, values[placeholder])
        return shlex.split(text) + list(spec.extra_args)
    argv = [sys.executable, "-m", "server_shim", "serve", "--model", str(spec.model), "--port", str(port)]
    argv += ["--host", HOST, "--dtype", spec.dtype, "--device", spec.device, "--seed", str(spec.seed)]
    argv += ["--quant", spec.quant, "--backend", spec.backend]
    for glob in spec.quant_skip:
        argv += ["--quant-skip", glob]
    for fault in spec.faults:
        argv += ["--fault", fault]
    argv += [flag for flag, on in (("--ck-free", spec.ck_free), ("--batch-invariant", spec.batch_invariant),
                                   ("--debug", spec.debug)) if on]  # fmt: skip
    if api_key:
        argv += ["--api-key", api_key]
    return argv + list(spec.extra_args)


def _api_key(spec: ServerSpec) -> str | None:
    if spec.api_key_env is None:
        return None
    value = os.environ.get(spec.api_key_env)
    if not value:
        raise LaunchError(
            f"server {spec.name!r}: environment variable {spec.api_key_env} (api_key_env) is not set"
        )
    return value


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _cpu_threads_per_shim(specs: Sequence[ServerSpec]) -> int:
    """Cores per co-located shim: N servers each running torch's default of all cores fight over
    them (measured: load average 14 on 2 cores for 8 smollm2 shims), which is slower than sharing."""
    shims = sum(1 for s in specs if s.kind == "shim")
    return max(1, (os.cpu_count() or 1) // max(1, shims))


def _start(spec: ServerSpec, port: int | None, log_dir: Path, threads: int = 0) -> RunningServer:
    import subprocess  # local: keeps `import server_shim.launch` light for the differ

    key = _api_key(spec)
    if spec.kind == "url":
        url = _normalise_url(spec.url or "")
        return RunningServer(spec.name, url, spec, None, None)
    assert port is not None  # _pick_ports gave every started server one
    argv = build_argv(spec, port, key)
    env = {**os.environ, **spec.env}
    if spec.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = env["HIP_VISIBLE_DEVICES"] = spec.gpus
    if spec.kind == "shim":
        env["PYTHONUNBUFFERED"] = "1"  # the log tail must show the last words of a dying server
        for var in _THREAD_VARS:  # a user's own setting (in env or spec.env) wins
            if threads and var not in env:
                env[var] = str(threads)
        # The shim must import from this checkout even when the package is not installed.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    log_path = log_dir / f"{spec.name}.log"
    shown = " ".join(shlex.quote("***" if key and a == key else a) for a in argv)  # never log a key
    with open(log_path, "wb") as fh:
        fh.write(f"# difftest launcher: {shown}\n".encode())
        fh.flush()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise LaunchError(
                f"server {spec.name!r}: cannot run {argv[0]!r}: {exc.strerror or exc}"
            ) from None
    log.info("started %s (pid %d) on port %d: %s", spec.name, proc.pid, port, shown)
    return RunningServer(spec.name, f"http://{HOST}:{port}", spec, proc.pid, log_path, proc)


def _normalise_url(url: str) -> str:
    """Base URL without a trailing '/' or '/v1' (users paste OpenAI base_urls)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _wait_healthy(servers: list[RunningServer]) -> None:
    """Poll every server until all answer GET /health (or /v1/models: engines without /health)."""
    start = time.monotonic()
    pending = {s.name: s for s in servers}
    last: dict[str, str] = {}
    delay = 0.1
    with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False) as client:
        while pending:
            for name, server in list(pending.items()):
                code = server.exit_code()
                if code is not None:
                    raise LaunchError(
                        f"server {name!r} exited with code {code} while starting; "
                        f"last lines of {server.log_path}:\n{server.log_tail()}"
                    )
                ok, last[name] = _probe(client, server)
                if ok:
                    log.info("%s healthy at %s after %.1fs", name, server.url, time.monotonic() - start)
                    del pending[name]
                elif time.monotonic() - start > server.spec.startup_timeout_s:
                    where = (
                        f"; last lines of {server.log_path}:\n{server.log_tail()}" if server.log_path else ""
                    )
                    raise LaunchError(
                        f"server {name!r} at {server.url} not healthy after {server.spec.startup_timeout_s:g}s "
                        f"(last answer: {last[name]}){where}"
                    )
            if pending:
                time.sleep(delay)
                delay = min(delay * 1.5, 1.0)


def _probe(client: httpx.Client, server: RunningServer) -> tuple[bool, str]:
    key = _api_key(server.spec)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answer = "no answer"
    for route in ("/health", "/v1/models"):
        try:
            resp = client.get(server.url + route, headers=headers)
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__} on {route}"
        if resp.status_code == 200:
            return True, f"200 on {route}"
        answer = f"HTTP {resp.status_code} on {route}"
    return False, answer


def _teardown(servers: list[RunningServer]) -> None:
    """SIGTERM every process group we started, wait, SIGKILL what is left, reap the leaders."""
    procs = [s for s in servers if s._proc is not None]
    for server in procs:
        _signal_group(server, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    try:
        for server in procs:
            with contextlib.suppress(Exception):
                server._proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, kill
        log.warning("interrupted during teardown; killing servers")
    for server in procs:
        _signal_group(server, signal.SIGKILL)  # also reaches workers the leader left behind
        with contextlib.suppress(Exception):
            server._proc.wait(timeout=5.0)
        if server._proc.poll() is None:
            log.warning("server %s (pid %d) survived SIGKILL", server.name, server.pid)
        else:
            log.info("stopped %s (pid %d, exit %s)", server.name, server.pid, server._proc.returncode)


def _signal_group(server: RunningServer, sig: signal.Signals) -> None:
    # start_new_session made the server its own group leader: pgid == pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, sig)


def _tail(path: Path | None, lines: int) -> str:
    if path is None:
        return "(no log: not started by the launcher)"
    try:
        text = path.read_bytes()[-64 * 1024 :].decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


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
    "batch_invariant": _BOOL, "debug": _BOOL, "seed": _INT, "extra_args": _STRS, "env": _ENV,
    "cwd": _STR, "gpus": _GPUS, "api_key_env": _STR, "port": _INT, "startup_timeout_s": _FLOAT,
}  # fmt: skip
SHIM_ONLY = ("dtype", "device", "quant", "backend", "quant_skip", "faults", "ck_free", "batch_invariant",
             "debug", "seed")  # fmt: skip
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


# ----------------------------------------------------------------------------- `pair`


def main_pair(config_path: str) -> int:
    """`python -m server_shim pair CONFIG.toml`: start the reference and the targets of a difftest
    config, print where they listen, serve until Ctrl-C. Exit 0, 2 config error, 3 a server failed."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    path = Path(config_path)
    try:
        specs = pair_specs(path)
    except (OSError, ValueError, LaunchError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    log_dir = Path("runs") / f"pair-{path.stem}" / "logs"
    try:
        with launch_servers(specs, log_dir=log_dir) as servers:
            for server in servers.values():
                print(f"{server.name:<28} {server.url}   log: {server.log_path or '-'}")
            print("all servers healthy; Ctrl-C stops them", flush=True)
            while True:
                for server in servers.values():
                    code = server.exit_code()
                    if code is not None:
                        print(
                            f"server {server.name!r} exited with code {code}:\n{server.log_tail()}",
                            file=sys.stderr,
                        )
                        return 3
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0
    except LaunchError as exc:
        print(str(exc), file=sys.stderr)
        return 3


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
