"""Paired launcher: start a reference and its targets side by side, wait for health, tear down.

A server is one of three kinds (`ServerSpec.kind`):

    shim      `model` set: our own `python -m server_shim serve ...`, every option as a flag
    command   `command` set: any engine (vLLM, SGLang, llama.cpp, ATOM) from a template with
              {port}, {host}, {model}, {api_key}, {python} (the interpreter running difftest);
              split with shlex and run without a shell
    url       `url` set: a server that already runs; health-checked, never started or stopped

Why process groups: engines fork workers (vLLM's engine core, tokenizer pools). Killing only the
pid we started leaves those holding the GPU and the port, so each server gets its own session
(`start_new_session=True`) and teardown signals the whole group — SIGTERM, a grace period, SIGKILL.
SIGTERM and SIGHUP run that teardown like Ctrl-C; a second signal during it kills at once; when
difftest dies without a teardown (SIGKILL), a watchdog process stops the groups (`_GroupWatchdog`).
A launched server is healthy only if its port is served from its own session (`_check_port_owner`).

This module imports no torch (docs/design.md "Boundaries"): difftest uses it to start servers it
never loads. The TOML -> ServerSpec parser lives in launch_spec.py; `python -m server_shim pair`
needs both, and no difftest.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from server_shim.bearer import bearer, key_problem
from server_shim.errors import LaunchError, ServerRefusedConfig
from server_shim.launch_spec import ServerSpec, SpecError, pair_specs
from server_shim.options import API_KEY_ENV as SHIM_API_KEY_ENV
from server_shim.options import argv_for

__all__ = [
    "HOST",
    "RunningServer",
    "Terminated",
    "api_key_of",
    "build_argv",
    "launch_servers",
    "main_pair",
    "normalise_url",
    "same_server",
    "server_address",
]


log = logging.getLogger(__name__)

HOST = "127.0.0.1"
TERM_GRACE_S = 10.0  # vLLM needs a few seconds to release the GPU after SIGTERM
LOG_TAIL_LINES = 30
# While a starting server's log grows, the launch is making progress: its startup timeout is
# stretched, up to this many times over (see `_wait_healthy`).
STARTUP_STRETCH = 3.0
PLACEHOLDERS = ("{port}", "{host}", "{model}", "{api_key}", "{python}")


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


@dataclass(frozen=True)
class StartupStatus:
    """Where a launch's health wait stands: what a caller shows while servers start (a cold GPU
    server tunes its kernels for minutes before /health answers, and a silent wait looks hung)."""

    healthy: tuple[str, ...]  # in the order they answered
    pending: tuple[str, ...]
    elapsed_s: float

    @property
    def total(self) -> int:
        return len(self.healthy) + len(self.pending)


OnStartup = Callable[[StartupStatus], None]


@contextlib.contextmanager
def launch_servers(
    specs: Sequence[ServerSpec], *, log_dir: Path, on_status: OnStartup | None = None
) -> Iterator[dict[str, RunningServer]]:
    """Start every spec side by side, wait until all are healthy, yield them by name.

    Raises LaunchError (after tearing down whatever started) when a server dies while starting,
    misses its startup timeout, or its port is taken. Teardown runs on normal exit, on any
    exception and on KeyboardInterrupt raised inside the block. `on_status` hears the health wait:
    once when it begins, whenever a server turns healthy (the last call: nothing pending), and
    every `WAIT_NOTE_S` while it waits.
    """
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LaunchError(f"server names must be unique; repeated: {', '.join(dupes)}")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    running: dict[str, RunningServer] = {}
    previous = _exit_on_signals()
    watchdog = _GroupWatchdog()
    try:
        ports = _pick_ports(specs)
        _prepare_models(specs, log_dir)
        threads = _cpu_threads_per_shim(specs)
        for spec in specs:
            running[spec.name] = _start(spec, ports.get(spec.name), log_dir, threads)
            if running[spec.name].pid is not None:
                watchdog.watch(running[spec.name].pid)
        _wait_healthy(list(running.values()), on_status)
        yield running
    except Terminated as exc:  # SIGINT has "difftest: interrupted"; say why these exits happen too
        log.warning("%s received: stopping the servers", signal.Signals(exc.signum).name)
        raise
    finally:
        try:
            _teardown(list(running.values()))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for server in running.values():
                if server.pid is not None and server.exit_code() is not None:
                    watchdog.forget(server.pid)
            watchdog.close()


class Terminated(SystemExit):
    """SIGTERM or SIGHUP while servers run: exit 128 + the signal, after teardown."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # a cancelled CI job; a closed terminal or ssh session


def _exit_on_signals() -> dict[signal.Signals, Any]:
    """CI runners cancel a job with SIGTERM, a closed terminal sends SIGHUP; by default Python
    dies of either without running `finally`, and servers in their own sessions would live on
    holding GPUs and ports. Turn them into `Terminated` while servers run (main thread only, and
    only a signal nobody handles already: `nohup`'s ignored SIGHUP stays ignored). Returns the
    handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {}
    for sig in EXIT_SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            previous[sig] = signal.signal(sig, handler)
    return previous


# The watchdog's program (stdlib only, run with -I -S: it must start fast and import nothing of
# ours). It reads "+PGID" / "-PGID" lines; at EOF, which comes however its parent dies, SIGKILL
# included, it stops the groups still listed: SIGTERM, a grace period (argv[1]), SIGKILL.
_WATCHDOG = """
import os, signal, sys, time
groups = set()
for line in sys.stdin.buffer:
    (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
def alive(g):
    try:
        os.killpg(g, 0)
        return True
    except OSError:
        return False
for sig, grace in ((signal.SIGTERM, float(sys.argv[1])), (signal.SIGKILL, 0.0)):
    for g in groups:
        try:
            os.killpg(g, sig)
        except OSError:
            pass
    end = time.monotonic() + grace
    while time.monotonic() < end and any(alive(g) for g in groups):
        time.sleep(0.1)
"""


class _GroupWatchdog:
    """A tiny process that stops the launched process groups when this one dies, however it dies.

    Why: SIGKILL (an OOM kill, a CI runner giving up) runs no teardown, and the parent-death signal
    (`_die_with_parent`) reaches only the process we started, not the workers it forked into its
    group (vLLM's engine core keeps the GPU and the port). The watchdog holds the read end of a
    pipe whose write end only we hold; the kernel closes it when we die, and at that EOF the
    watchdog signals every group still registered. It runs in its own session, so a Ctrl-C or a
    signal to our process group does not take it down with us. Pipes and process groups are
    POSIX: this holds on macOS too. Best effort: a watchdog that cannot start leaves the
    parent-death signal alone (logged)."""

    def __init__(self) -> None:
        self._proc: Any = None
        self._failed = False

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        """A group teardown has stopped: its id may be reused, never signal it again."""
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        """Orderly end: every group forgotten or stopped; the watchdog exits at EOF."""
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        with contextlib.suppress(Exception):
            self._proc.wait(timeout=1.0)  # a group it still stops is its own business, not ours

    def _send(self, line: str) -> None:
        if self._proc is None and not self._failed:
            self._start()
        if self._proc is None:
            return
        try:
            self._proc.stdin.write(line.encode())  # unbuffered: one write, atomic below PIPE_BUF
        except OSError as exc:
            log.warning("launch watchdog gone (%s): servers outlive a SIGKILLed difftest", exc)
            self._proc, self._failed = None, True

    def _start(self) -> None:
        import subprocess

        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(TERM_GRACE_S)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                bufsize=0, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            log.warning("cannot start the launch watchdog (%s): servers outlive a SIGKILLed difftest", exc)
            self._failed = True


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
            "{python}": sys.executable,  # the interpreter running difftest (its venv's packages)
        }
        # Plain replacement, not str.format: engine flags often hold JSON braces.
        for placeholder in PLACEHOLDERS:
            text = text.replace(placeholder, values[placeholder])
        return shlex.split(text) + list(spec.extra_args)
    argv = [sys.executable, "-m", "server_shim", "serve", "--model", str(spec.model), "--port", str(port)]
    argv += ["--host", HOST, *argv_for(spec)]
    return argv + list(spec.extra_args)  # the shim's key travels in its environment (see _start)


def api_key_of(spec: ServerSpec) -> str | None:
    """The API key a spec names through `api_key_env`; a named variable that is unset is an error."""
    if spec.api_key_env is None:
        return None
    value = os.environ.get(spec.api_key_env)
    if not value:  # the config names a variable this shell lacks: a config mistake, not the server's
        raise SpecError(
            f"server {spec.name!r}: environment variable {spec.api_key_env} (api_key_env) is not set",
            key="api_key_env",
        )
    problem = key_problem(value)
    if problem:  # the variable's value, never printed: a newline read with it, say
        raise SpecError(
            f"server {spec.name!r}: {spec.api_key_env} (api_key_env): {problem}", key="api_key_env"
        )
    return value


def shim_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a built-in shim subprocess."""
    env = {**os.environ, **extra}
    env["PYTHONUNBUFFERED"] = "1"  # the log tail must show the last words of a dying server
    # The shim must import from this checkout even when the package is not installed.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _prepare_models(specs: Sequence[ServerSpec], log_dir: Path) -> None:
    """Build each built-in model's cache once, before several shims of it start side by side.

    A failure here is not fatal: the servers then report the real error themselves, with logs."""
    import subprocess

    models = sorted({s.model for s in specs if s.kind == "shim" and s.model})
    for model in models:
        if sum(1 for s in specs if s.kind == "shim" and s.model == model) < 2:
            continue
        with open(log_dir / "prepare.log", "ab") as fh:
            subprocess.run(
                [sys.executable, "-m", "server_shim", "prepare", "--model", model],
                stdout=fh, stderr=subprocess.STDOUT, env=shim_env({}), check=False,
            )  # fmt: skip


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_env(env: Mapping[str, str], threads: int) -> dict[str, str]:
    """The thread-count variables a shim starts with: a user's own setting (in its environment
    or the server's env table) wins, and one that sets only OMP_NUM_THREADS sets MKL's too. Setting
    the other one to our per-shim share instead ran MKL's GEMMs on more threads than OpenMP's
    (measured: with OMP_NUM_THREADS=1 and one other busy process on 2 cores, the external-engine
    run took 304 s instead of 45 s, its shim's two MKL threads spinning for a core they could
    not get)."""
    mine = next((env[var] for var in _THREAD_VARS if env.get(var)), None)
    value = mine or (str(threads) if threads else None)
    return {var: value for var in _THREAD_VARS if value and not env.get(var)}


def _cpu_threads_per_shim(specs: Sequence[ServerSpec]) -> int:
    """Cores per co-located shim: N servers each running torch's default of all cores fight over
    them (measured: load average 14 on 2 cores for 8 smollm2 shims), which is slower than sharing."""
    shims = sum(1 for s in specs if s.kind == "shim")
    return max(1, (os.cpu_count() or 1) // max(1, shims))


def _start(spec: ServerSpec, port: int | None, log_dir: Path, threads: int = 0) -> RunningServer:
    import subprocess  # local: keeps `import server_shim.launch` light for the differ

    key = api_key_of(spec)
    if spec.kind == "url":
        url = normalise_url(spec.url or "")
        return RunningServer(spec.name, url, spec, None, None)
    assert port is not None  # _pick_ports gave every started server one
    argv = build_argv(spec, port, key)
    env = shim_env(spec.env) if spec.kind == "shim" else {**os.environ, **spec.env}
    if spec.kind == "shim":
        # By environment, never argv: a command line is readable by every user (ps, /proc/PID/cmdline).
        env.pop(SHIM_API_KEY_ENV, None)
        if key:
            env[SHIM_API_KEY_ENV] = key
    elif key and "{api_key}" in (spec.command or ""):
        log.warning(
            "server %s: {api_key} puts the key on a command line, readable by every local user (ps); "
            "an engine that reads its key from the environment can have it from $%s, which it inherits",
            spec.name,
            spec.api_key_env,
        )
    if spec.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = env["HIP_VISIBLE_DEVICES"] = spec.gpus
    if spec.kind == "shim":
        env.update(thread_env(env, threads))
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
                preexec_fn=_die_with_parent(),
            )
        except OSError as exc:
            raise popen_failure(spec, argv[0], exc) from None
    log.info("started %s (pid %d) on port %d: %s", spec.name, proc.pid, port, shown)
    return RunningServer(spec.name, f"http://{HOST}:{port}", spec, proc.pid, log_path, proc)


def cwd_problem(cwd: str) -> str | None:
    """Why a server cannot be started in the folder `cwd` (None: it can); difftest's config check
    asks the same before anything starts."""
    path = Path(cwd)
    if path.is_dir():
        return None
    why = "it is a file" if path.exists() else "no such folder"
    return f"{cwd!r} is not a folder to start the server in ({why})"


def popen_failure(spec: ServerSpec, program: str, exc: OSError) -> LaunchError:
    """The error for a Popen that failed. Its OSError says only "No such file or directory": the
    message named the program for a missing `cwd` too (the interpreter, which was there), and as
    infrastructure (exit 3) what the config's key had wrong. A cwd that failed is named (exit 2)."""
    cwd_failed = spec.cwd is not None and (exc.filename == spec.cwd or cwd_problem(spec.cwd) is not None)
    if cwd_failed:
        why = cwd_problem(spec.cwd) or f"{spec.cwd!r}: {exc.strerror or exc}"  # e.g. no permission
        return SpecError(f"server {spec.name!r}: key 'cwd': {why}", key="cwd")
    return LaunchError(f"server {spec.name!r}: cannot run {program!r}: {exc.strerror or exc}")


def _die_with_parent() -> Any:
    """A preexec_fn asking Linux to SIGTERM the server when its launcher dies, however it dies.

    SIGINT, SIGTERM and SIGHUP reach `launch_servers`' teardown; SIGKILL (an OOM kill, a CI runner
    that gives up) runs no Python. `_GroupWatchdog` stops the whole group then, but hears of a
    server only once it started; this covers the server itself from its first instruction (not
    its workers: the signal is per process). It fires when the forking *thread* exits, so it is
    only armed from the main thread. None where prctl does not exist (macOS): the watchdog
    alone covers SIGKILL there."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: nothing to load in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before the signal was armed
            os._exit(1)

    return arm


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def normalise_url(url: str) -> str:
    """Base URL without a trailing '/' or '/v1' (users paste OpenAI base_urls)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def server_address(url: str) -> tuple[str, str, int | None, str]:
    """Where `url` reaches: (scheme, host, port, path) with the default port filled in and every
    loopback spelling (localhost, 127.0.0.0/8, ::1, 0.0.0.0) read as one host, so that "is this the same
    server" does not hang on how a URL was typed: a golden at http://localhost:P beside a
    reference at http://127.0.0.1:P slipped past the one-server warnings (string equality) and a
    correct target FAILed exactness against the reference itself, with no word why."""
    parts = urllib.parse.urlsplit(normalise_url(url))
    host = (parts.hostname or "").lower()
    try:  # 0.0.0.0 / :: as a destination reach this machine too
        address = ipaddress.ip_address(host)
        loopback = address.is_loopback or address.is_unspecified
    except ValueError:
        loopback = host in _LOOPBACK_NAMES
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, "loopback" if loopback else host, port, parts.path.rstrip("/")


def same_server(a: str, b: str) -> bool:
    """Whether two base URLs reach one server (server_address)."""
    return server_address(a) == server_address(b)


def _log_size(server: RunningServer) -> int:
    if server.log_path is not None:
        with contextlib.suppress(OSError):
            return server.log_path.stat().st_size
    return 0


WAIT_NOTE_S = 15.0  # how often a health wait says what it waits for


SHIM_USAGE_EXIT = 2  # server_shim's exit for flags it refuses (server_shim/__main__.py)
SHIM_ERROR_MARK = ": error: "  # "server_shim: error: ..." and argparse's "PROG: error: ..."


def _shim_refusal(server: RunningServer, code: int) -> str | None:
    """The one-line reason a launched shim refused its flags, or None where it died otherwise.
    Only our shim: another program's exit 2 is no promise of a usage error."""
    if code != SHIM_USAGE_EXIT or server.spec.kind != "shim":
        return None
    said = [ln.split(SHIM_ERROR_MARK, 1)[1] for ln in server.log_tail().splitlines() if SHIM_ERROR_MARK in ln]
    why = said[-1].strip() if said else f"exit {code}"
    return f"server {server.name!r} refused its configuration: {why} (log: {server.log_path})"


def _wait_healthy(servers: list[RunningServer], on_status: OnStartup | None = None) -> None:
    """Poll every server until all answer GET /health (or /v1/models: engines without /health).

    A server misses its `startup_timeout_s` only when, past it, none of the servers still starting
    has written to its log for that long either (hard limit: STARTUP_STRETCH times the timeout).
    Why: quantized shim servers tune their GEMMs before /health, one at a time on a shared lock
    (quant/warmup.py); a server queued behind the others waits silently while they log each tuned
    config. Measured on an H200, cold, configs/gpu.toml: the sixth Triton server's warm-up (its wait
    for the lock included) ended 359 s after it began, against 600 s; a larger model or more schemes
    would pass 600 s with every server busy, none stuck.
    """
    start = time.monotonic()
    pending = {s.name: s for s in servers}
    last: dict[str, str] = {}
    delay = 0.1
    logged = {s.name: _log_size(s) for s in servers}
    progress_at = start
    said_at = start  # a wait that shows nothing for minutes looks hung: say what is awaited
    healthy: list[str] = []

    def tell() -> None:
        if on_status is not None:
            on_status(StartupStatus(tuple(healthy), tuple(pending), time.monotonic() - start))

    tell()
    with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False) as client:
        while pending:
            for name, server in list(pending.items()):
                code = server.exit_code()
                if code is not None:
                    refusal = _shim_refusal(server, code)
                    if refusal is not None:
                        raise ServerRefusedConfig(refusal)
                    raise LaunchError(
                        f"server {name!r} exited with code {code} while starting; "
                        f"last lines of {server.log_path}:\n{server.log_tail()}"
                    )
                ok, last[name] = _probe(client, server)
                if ok:
                    _check_port_owner(server)
                    log.info("%s healthy at %s after %.1fs", name, server.url, time.monotonic() - start)
                    del pending[name]
                    healthy.append(name)
                    tell()
                elif _startup_missed(server.spec.startup_timeout_s, time.monotonic(), start, progress_at):
                    now = time.monotonic()
                    # a url server has no log: neither a tail nor "logs last grew" (those of the
                    # servers launched beside it) would describe it
                    where, grew = "", ""
                    if server.log_path is not None:
                        where = f"; last lines of {server.log_path}:\n{server.log_tail()}"
                        grew = f", the starting servers' logs last grew {now - progress_at:.0f}s ago"
                    raise LaunchError(
                        f"server {name!r} at {server.url} not healthy after {server.spec.startup_timeout_s:g}s "
                        f"(last answer: {last[name]}; waited {now - start:.0f}s{grew}){where}"
                    )
            if pending and time.monotonic() - said_at >= WAIT_NOTE_S:
                said_at = time.monotonic()
                for name, server in pending.items():
                    # a url server runs already: a refused connection there is the user's to fix
                    say = log.warning if server.pid is None else log.info
                    say("still waiting for %s at %s (%s) after %.0fs of %gs", name, server.url, last[name],
                        said_at - start, server.spec.startup_timeout_s)  # fmt: skip
                tell()
            if pending:
                time.sleep(delay)
                delay = min(delay * 1.5, 1.0)
                grown = {n: size for n, srv in pending.items() if (size := _log_size(srv)) > logged[n]}
                if grown:  # only a server still starting counts: a healthy one's log is not progress
                    logged.update(grown)
                    progress_at = time.monotonic()


def _startup_missed(timeout: float, now: float, start: float, progress_at: float) -> bool:
    """Past the timeout with no log progress for as long, or past the stretched hard limit."""
    return now - start > STARTUP_STRETCH * timeout or (now - start > timeout and now - progress_at > timeout)


def _probe(client: httpx.Client, server: RunningServer) -> tuple[bool, str]:
    key = api_key_of(server.spec)
    headers = {"Authorization": bearer(key)} if key else {}
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


def _check_port_owner(server: RunningServer) -> None:
    """Refuse a launched server whose port answers from a process that is not its own.

    Why: `_pick_ports` frees its probe sockets before the servers start, and an engine binds only
    once its model is loaded (minutes); another process may take the port in between, answer
    /health, and be judged in the server's name. Linux only, through /proc (the listening socket's
    inode, found among the file descriptors of the server's session: its process group and any
    worker that made a group of its own). Skipped where /proc/net is missing (macOS), when no
    readable process holds the socket (another user's): then nothing is known either way, and for
    a command under a container runtime, whose proxy holds the port by design."""
    if server.pid is None or _through_a_runtime(server.spec):
        return
    port = urllib.parse.urlsplit(server.url).port
    listening = _listening_inodes(port) if port else None
    if not listening:
        return
    if any(listening & _socket_inodes(pid) for pid in _session_pids(server.pid)):
        return
    owner = next((pid for pid in _all_pids() if listening & _socket_inodes(pid)), None)
    if owner is None:
        log.info("server %s: cannot tell which process listens on port %d", server.name, port)
        return
    raise LaunchError(
        f"server {server.name!r}: port {port} is served by another process (pid {owner}, "
        f"{_name_of(owner)}), not by the launched one (pid {server.pid}) or its process group: it "
        "took the port while the server was starting; run again, or set a free 'port'"
    )


# Container runtimes publish a port through a process of their own (docker-proxy under dockerd,
# rootless port forwarders): the listener is theirs by design, never the launched command's.
CONTAINER_RUNTIMES = frozenset({"docker", "podman", "nerdctl", "apptainer", "singularity"})


def _through_a_runtime(spec: ServerSpec) -> bool:
    """Whether a `command` server starts under a container runtime (`docker run -p {port}:8000`):
    its port's owner tells nothing, so the check is left out for it."""
    if spec.command is None:
        return False
    try:
        argv = shlex.split(spec.command)
    except ValueError:
        return False
    return bool(argv) and Path(argv[0]).name in CONTAINER_RUNTIMES


def _listening_inodes(port: int) -> set[int] | None:
    """Inodes of the TCP sockets listening on `port` (IPv4 and IPv6); None without /proc/net."""
    found: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for row in rows:  # sl local_address rem_address st ... uid timeout inode
            f = row.split()
            if len(f) > 9 and f[3] == _TCP_LISTEN and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(f[9]))
    return found if readable else None


_TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10


def _socket_inodes(pid: int) -> set[int]:
    """The socket inodes among a process's file descriptors (empty where they are unreadable)."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    found.add(int(link[len("socket:[") : -1]))
    return found


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (a launched server leads its own: start_new_session)."""
    found = []
    for pid in _all_pids():
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # state ppid pgrp session
                found.append(pid)
    return found


def _name_of(pid: int) -> str:
    """The program's name only: another process's command line may carry its secrets."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    return "?"


def _teardown(servers: list[RunningServer]) -> None:
    """SIGTERM every process group we started, wait, SIGKILL what is left, reap the leaders.

    A second signal (the impatient Ctrl-C, a CI runner's repeated SIGTERM) must shorten teardown,
    never cut it short: an exception raised mid-way used to skip the SIGKILL and leave a server that
    ignores SIGTERM running. So SIGINT/SIGTERM/SIGHUP are only noted while it runs; one noted ends
    the grace period at once, and is sent again once every group is killed."""
    procs = [s for s in servers if s._proc is not None]
    if not procs:
        return
    with _signals_deferred() as noted:
        for server in procs:
            _signal_group(server, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        while not noted and time.monotonic() < deadline and any(s._proc.poll() is None for s in procs):
            time.sleep(0.05)
        if noted:
            log.warning("%s during teardown; killing servers", signal.Signals(noted[0]).name)
        for server in procs:
            _signal_group(server, signal.SIGKILL)  # also reaches workers the leader left behind
        for server in procs:
            with contextlib.suppress(Exception):
                server._proc.wait(timeout=5.0)
            if server._proc.poll() is None:
                log.warning("server %s (pid %d) survived SIGKILL", server.name, server.pid)
            else:
                log.info("stopped %s (pid %d, exit %s)", server.name, server.pid, server._proc.returncode)
    if noted:  # delivered again to the handler it would have met: KeyboardInterrupt, Terminated, …
        signal.raise_signal(noted[0])


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Within the block, SIGINT, SIGTERM and SIGHUP are appended to the yielded list instead of
    raising (main thread only; a signal ignored, or handled outside Python, is left alone)."""
    noted: list[int] = []
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, *EXIT_SIGNALS):
            handler = signal.getsignal(sig)
            if handler is not signal.SIG_IGN and handler is not None:
                previous[sig] = signal.signal(sig, lambda signum, frame: noted.append(signum))
    try:
        yield noted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    except ServerRefusedConfig as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(str(exc), file=sys.stderr)
        return 3
