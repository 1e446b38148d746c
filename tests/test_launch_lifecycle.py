"""Launcher lifecycle against signals and port thieves: SIGHUP / SIGTERM / a second SIGTERM / SIGKILL
of the launcher leave no process of a launched server's group (workers included), a port answered
by another process is refused, and a `url` server's timeout does not talk about logs it has not."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from interrupts import default_sigint
from test_launch import FAKE, ROOT, alive, pids_with, start_and_stop, wait_dead

from server_shim import launch
from server_shim.errors import LaunchError
from server_shim.launch_spec import ServerSpec

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

# Two servers, each forking a worker into its group (`--child-pid-file`): the workers are what
# the parent-death signal never reached. argv: the fake's extra flags, the log/pid folder.
_LAUNCHER = """
import logging, sys, time
from pathlib import Path
from server_shim.launch import ServerSpec, launch_servers
logging.basicConfig(level=logging.WARNING)
fake, token, flags, folder = sys.argv[1:5]
specs = [
    ServerSpec(name=n, startup_timeout_s=20,
               command=f"{sys.executable} {fake} --port {{port}} --name {token}-{n} {flags} "
                       f"--child-pid-file {folder}/{n}.child")
    for n in ("a", "b")
]
with launch_servers(specs, log_dir=Path(folder)) as servers:
    print(" ".join(str(s.pid) for s in servers.values()), flush=True)
    time.sleep(600)
"""


def _launcher(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[str], str, list[int]]:
    """A launcher process with its two servers up; returns it, their token and every pid of theirs."""
    token = f"life-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(FAKE), token, " ".join(flags), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    leaders = [int(p) for p in proc.stdout.readline().split()]
    assert len(leaders) == 2, proc.stderr.read() if proc.poll() is not None else "no pids"
    workers = [int((tmp_path / f"{n}.child").read_text()) for n in ("a", "b")]
    pids = leaders + workers
    assert all(alive(p) for p in pids)
    return proc, token, pids


def _cleanup(proc: subprocess.Popen[str], token: str, pids: list[int]) -> None:
    """Only where a test failed: leave nothing behind (the workers' command lines lack the token)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in {*pids_with(token), *(p for p in pids if alive(p))}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_tear_down_every_group_and_say_so(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGHUP (a closed terminal or ssh session) used to kill the launcher with no teardown: the
    servers died of the parent-death signal, their workers lived on. SIGTERM exited silently."""
    proc, token, pids = _launcher(tmp_path)
    try:
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 128 + sig
        assert wait_dead(pids) == [] and pids_with(token) == []
        err = proc.stderr.read()
        assert f"{sig.name} received: stopping the servers" in err and "Traceback" not in err
    finally:
        _cleanup(proc, token, pids)


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT)]
)  # an uncaught KeyboardInterrupt ends Python by SIGINT itself
def test_a_second_signal_kills_at_once_instead_of_skipping_the_kill(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """Servers that ignore SIGTERM: the second SIGTERM used to raise inside the grace wait and skip
    the SIGKILL, leaving them running. Now it, like a second Ctrl-C, ends the 10 s grace at once."""
    proc, token, pids = _launcher(tmp_path, "--ignore-term")
    try:
        proc.send_signal(sig)
        time.sleep(0.5)  # inside teardown's grace period
        t0 = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code
        assert time.monotonic() - t0 < launch.TERM_GRACE_S - 2
        assert wait_dead(pids) == [] and pids_with(token) == []
        err = proc.stderr.read()
        assert f"{sig.name} during teardown; killing servers" in err
    finally:
        _cleanup(proc, token, pids)


def test_sigkill_of_the_launcher_stops_the_workers_too(tmp_path: Path) -> None:
    """SIGKILL runs no teardown; the parent-death signal reaches only the process the launcher
    started. The watchdog stops the whole group: workers included."""
    proc, token, pids = _launcher(tmp_path)
    try:
        proc.kill()
        proc.wait(timeout=10)
        assert wait_dead(pids, timeout=launch.TERM_GRACE_S + 5) == []
        assert pids_with(token) == []
    finally:
        _cleanup(proc, token, pids)


def test_the_watchdog_stops_the_groups_it_still_watches_at_eof_and_no_others() -> None:
    """At EOF (its launcher gone, or done) the watchdog stops the groups still registered, whole
    (a worker forked into the group included), and leaves a forgotten one alone: its id may be
    reused by then. Then it exits."""
    groups = [
        subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                          "time.sleep(60)"], start_new_session=True)
        for _ in range(2)
    ]  # fmt: skip
    try:
        time.sleep(0.5)  # the workers are forked
        kept, stopped = (_group_pids(g.pid) for g in groups)
        assert len(kept) == len(stopped) == 2
        watchdog = launch._GroupWatchdog()
        watchdog.watch(groups[0].pid)
        watchdog.watch(groups[1].pid)
        watchdog.forget(groups[0].pid)
        watchdog.close()
        assert groups[1].wait(timeout=5) == -signal.SIGTERM  # reaped: a zombie would hold its group
        assert watchdog._proc.wait(timeout=5) == 0
        assert wait_dead(stopped) == [] and all(alive(p) for p in kept)
    finally:
        for g in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g.pid, signal.SIGKILL)
            g.wait()


def _group_pids(pgid: int) -> list[int]:
    return [p for p in launch._all_pids() if alive(p) and _pgid(p) == pgid]


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError):
        return None


# ----------------------------------------------------------------------------- the port's owner


def test_a_port_served_by_another_process_is_refused(tmp_path: Path) -> None:
    """The launched command is still "loading" while a process of another session (not its group)
    serves its port: its 200 on /health used to be taken for the launched server's."""
    token = f"thief-{uuid.uuid4().hex[:8]}"
    thief = f"[sys.executable, {str(FAKE)!r}, '--port', sys.argv[1], '--name', {token!r}]"
    code = f"import subprocess, sys, time; subprocess.Popen({thief}, start_new_session=True); time.sleep(30)"
    spec = ServerSpec(name="slow", command=f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {{port}}")
    try:
        with pytest.raises(LaunchError) as info:
            start_and_stop([spec], log_dir=tmp_path)
        (thief_pid,) = pids_with(token)
        assert re.fullmatch(
            rf"server 'slow': port \d+ is served by another process \(pid {thief_pid}, python\S*\), not by "
            r"the launched one \(pid \d+\) or its process group: .*",
            str(info.value),
        )
    finally:
        for pid in pids_with(token):
            os.kill(pid, signal.SIGKILL)


def test_a_container_runtimes_proxy_is_not_taken_for_a_thief(tmp_path: Path) -> None:
    """`docker run -p {port}:8000 ...`: the host port is served by docker-proxy, a process of
    dockerd's, never of the launched command; refusing it refused every containerised engine."""
    token = f"proxy-{uuid.uuid4().hex[:8]}"
    proxy = f"[sys.executable, {str(FAKE)!r}, '--port', sys.argv[1], '--name', {token!r}]"
    docker = tmp_path / "docker"  # stands in for the runtime: its listener in another session
    docker.write_text(
        f"#!{sys.executable}\nimport subprocess, sys, time\n"
        f"subprocess.Popen({proxy}, start_new_session=True)\ntime.sleep(30)\n"
    )
    docker.chmod(0o755)
    spec = ServerSpec(name="boxed", command=f"{shlex.quote(str(docker))} {{port}}")
    try:
        start_and_stop([spec], log_dir=tmp_path)  # healthy, not refused
    finally:
        for pid in pids_with(token):
            os.kill(pid, signal.SIGKILL)


def test_a_listener_in_the_servers_session_is_its_own(tmp_path: Path) -> None:
    """A worker that serves the port from a process group of its own (same session) is the server's."""
    token = f"split-{uuid.uuid4().hex[:8]}"
    argv = f"[sys.executable, {str(FAKE)!r}, '--port', sys.argv[1], '--name', {token!r}]"
    code = f"import os, sys; os.setpgid(0, 0); os.execv(sys.executable, {argv})"
    worker = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {code!r}, sys.argv[1]]); time.sleep(60)"
    spec = ServerSpec(
        name="split", command=f"{shlex.quote(sys.executable)} -c {shlex.quote(worker)} {{port}}"
    )
    try:
        start_and_stop([spec], log_dir=tmp_path)
    finally:  # its own group: teardown's killpg does not reach it
        for pid in pids_with(token):
            os.kill(pid, signal.SIGKILL)


def test_listening_inodes_find_a_listening_socket() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert os.fstat(sock.fileno()).st_ino not in (launch._listening_inodes(port) or set())
        sock.listen()
        assert launch._listening_inodes(port) == {os.fstat(sock.fileno()).st_ino}
        assert os.fstat(sock.fileno()).st_ino in launch._socket_inodes(os.getpid())


# ----------------------------------------------------------------------------- url servers


def test_a_url_servers_timeout_does_not_talk_about_logs(tmp_path: Path) -> None:
    """A url server has no log: "the starting servers' logs last grew …" described nothing of it."""
    with pytest.raises(LaunchError) as info:
        start_and_stop(
            [ServerSpec(name="gone", url="http://127.0.0.1:9", startup_timeout_s=0.3)], log_dir=tmp_path
        )
    msg = str(info.value)
    assert msg.startswith("server 'gone' at http://127.0.0.1:9 not healthy after 0.3s (last answer: Connect")
    assert "log" not in msg and msg.endswith("s)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_the_cli_says_which_signal_ended_it(
    sig: signal.Signals, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM ended `difftest run` with 143 and not a word on stderr (Ctrl-C said "interrupted")."""
    import difftest.cli.probe as probe
    from difftest.cli import main

    def terminated(args: object) -> int:
        raise launch.Terminated(sig)

    monkeypatch.setattr(probe, "run", terminated)
    assert main(["probe", "http://127.0.0.1:9"]) == 128 + sig
    assert capsys.readouterr().err == f"difftest: interrupted ({sig.name})\n"
