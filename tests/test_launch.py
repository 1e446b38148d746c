"""Launcher: real subprocesses (tests/helpers_servers.py, stdlib only), health, teardown, errors."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from interrupts import default_sigint

from server_shim import launch, launch_spec
from server_shim.errors import LaunchError, ServerRefusedConfig
from server_shim.launch import build_argv, launch_servers, main_pair
from server_shim.launch_spec import ServerSpec, SpecError, auto_golden, spec_from_table

FAKE = Path(__file__).with_name("helpers_servers.py")
ROOT = Path(__file__).resolve().parent.parent


def fake(name: str, *flags: str, **kw) -> ServerSpec:
    """A spec running the fake server; a unique --name token lets us find its processes in /proc."""
    token = f"{name}-{uuid.uuid4().hex[:8]}"
    args = " ".join(shlex.quote(f) for f in flags)
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))} --port {{port}} --name {token} {args}"
    return ServerSpec(name=name, command=cmd, startup_timeout_s=kw.pop("startup_timeout_s", 20.0), **kw)


def start_and_stop(specs: list[ServerSpec], *, log_dir: Path) -> None:
    with launch_servers(specs, log_dir=log_dir):
        pass


def token_of(spec: ServerSpec) -> str:
    return spec.command.split("--name ")[1].split()[0]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a reaped-later orphan counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def pids_with(token: str) -> list[int]:
    """Live processes whose command line contains `token` (psutil-free)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if token in cmdline and int(entry.name) != os.getpid() and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_dead(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# ----------------------------------------------------------------------------- pairs and teardown


def test_pair_starts_both_answer_and_teardown_leaves_nothing(tmp_path: Path) -> None:
    ref, tgt = fake("reference"), fake("target")
    with launch_servers([ref, tgt], log_dir=tmp_path) as servers:
        assert set(servers) == {"reference", "target"}
        assert servers["reference"].url != servers["target"].url
        pids = [s.pid for s in servers.values()]
        for server in servers.values():
            assert alive(server.pid)
            body = httpx.get(server.url + "/v1/models", trust_env=False).json()
            assert body["data"][0]["id"] == token_of(server.spec)
            assert server.log_path == tmp_path / f"{server.name}.log"
    assert wait_dead(pids) == []
    assert pids_with(token_of(ref)) == [] and pids_with(token_of(tgt)) == []
    assert "listening on" in (tmp_path / "reference.log").read_text()


def test_teardown_reaches_workers_in_the_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    with launch_servers([fake("engine", "--child-pid-file", str(pid_file))], log_dir=tmp_path) as servers:
        child = int(pid_file.read_text())
        assert alive(child) and alive(servers["engine"].pid)
    assert wait_dead([child]) == []


def test_sigterm_ignored_escalates_to_sigkill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "TERM_GRACE_S", 0.3)
    with launch_servers([fake("stubborn", "--ignore-term")], log_dir=tmp_path) as servers:
        proc = servers["stubborn"]._proc
    assert proc.returncode == -signal.SIGKILL
    assert not alive(proc.pid)


def test_keyboard_interrupt_inside_block_tears_down(tmp_path: Path) -> None:
    spec = fake("ref")
    with pytest.raises(KeyboardInterrupt), launch_servers([spec], log_dir=tmp_path) as servers:
        pid = servers["ref"].pid
        raise KeyboardInterrupt
    assert wait_dead([pid]) == [] and pids_with(token_of(spec)) == []


def test_ctrl_c_while_waiting_for_health_tears_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = fake("ref", "--delay", "30")

    def interrupted(client, server):  # Ctrl-C lands while the launcher polls /health
        assert alive(server.pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "_probe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        start_and_stop([spec], log_dir=tmp_path)
    assert pids_with(token_of(spec)) == []


def test_exception_inside_block_tears_down_and_propagates(tmp_path: Path) -> None:
    spec = fake("ref")
    with pytest.raises(RuntimeError, match="boom"), launch_servers([spec], log_dir=tmp_path) as servers:
        pid = servers["ref"].pid
        raise RuntimeError("boom")
    assert wait_dead([pid]) == []


# ----------------------------------------------------------------------------- start failures


def test_command_that_exits_at_once_gives_code_and_log_tail(tmp_path: Path) -> None:
    good, bad = fake("good", "--delay", "1"), fake("bad", "--exit", "7")
    with pytest.raises(LaunchError) as info, launch_servers([good, bad], log_dir=tmp_path):
        pass
    msg = str(info.value)
    assert "'bad'" in msg and "code 7" in msg
    assert "CUDA out of memory (pretend)" in msg and str(tmp_path / "bad.log") in msg
    assert pids_with(token_of(good)) == []  # the healthy one went too


def test_a_shim_that_refuses_its_flags_is_a_config_error_with_its_reason(tmp_path: Path) -> None:
    """The shim exits 2 on flags it refuses; the launch says why in one line (not a log dump of
    an 'infrastructure' failure), and difftest maps it to exit 2. Other programs' exit 2 is not."""
    spec = ServerSpec(
        name="t", model="tiny-llama", device="cpu", quant="fp8-block", faults=("scale-transposed@nomatch.*",)
    )
    with pytest.raises(ServerRefusedConfig) as info, launch_servers([spec], log_dir=tmp_path):
        pass
    assert str(info.value) == (
        "server 't' refused its configuration: fault scale-transposed@nomatch.* matches no quantized "
        f"module (log: {tmp_path / 't.log'})"
    )
    with pytest.raises(LaunchError) as other, launch_servers([fake("bad", "--exit", "2")], log_dir=tmp_path):
        pass
    assert not isinstance(other.value, ServerRefusedConfig) and "code 2" in str(other.value)


def test_occupied_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port {port} is already in use"):
            start_and_stop([fake("ref", port=port)], log_dir=tmp_path)


def test_explicit_free_port_is_used(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with launch_servers([fake("ref", port=port)], log_dir=tmp_path) as servers:
        assert servers["ref"].url == f"http://127.0.0.1:{port}"


def test_startup_timeout_names_server_and_last_answer(tmp_path: Path) -> None:
    spec = fake("slow", "--delay", "30", startup_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=r"'slow' .* not healthy after 0.5s \(last answer: Connect"):
        start_and_stop([spec], log_dir=tmp_path)
    assert time.monotonic() - t0 < 25  # gave up at its timeout, not when the server (30 s) came up
    assert pids_with(token_of(spec)) == []


def test_startup_missed_only_without_log_progress_or_past_the_stretch() -> None:
    """Timeout 10 s, stretch 3x: at 12 s a launch whose logs grew 1 s ago is still starting; one
    silent for 11 s is not; at 31 s even a busy one has missed it."""
    missed = launch._startup_missed
    assert launch.STARTUP_STRETCH == 3.0
    assert not missed(10.0, now=9.0, start=0.0, progress_at=0.0)  # inside the timeout
    assert not missed(10.0, now=12.0, start=0.0, progress_at=11.0)  # past it, but progressing
    assert missed(10.0, now=12.0, start=0.0, progress_at=1.0)  # past it, silent for 11 s
    assert missed(10.0, now=31.0, start=0.0, progress_at=30.5)  # past 3 x 10 s: busy or not


def test_a_server_whose_log_grows_gets_more_than_its_startup_timeout(tmp_path: Path) -> None:
    """A server that logs progress for 2 s (a GEMM warm-up) and never answers: with a 1 s timeout it
    is given up on only once its log has been silent for 1 s, not at 1 s."""
    cmd = "bash -c 'for i in 1 2 3 4 5 6 7 8 9 10; do echo tuned config $i; sleep 0.2; done; sleep 30' {port}"
    spec = ServerSpec(name="tuning", command=cmd, startup_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(
        LaunchError, match=r"'tuning' .* not healthy after 1s \(last answer: .*logs last grew"
    ):
        start_and_stop([spec], log_dir=tmp_path)
    assert 2.0 <= time.monotonic() - t0 < 20  # past its 1 s while the log grew; then gave up


def test_missing_executable_is_a_launch_error(tmp_path: Path) -> None:
    spec = ServerSpec(name="nope", command="/nonexistent/engine --port {port}")
    with pytest.raises(LaunchError, match="'nope': cannot run '/nonexistent/engine'"):
        start_and_stop([spec], log_dir=tmp_path)


def test_duplicate_names_refused(tmp_path: Path) -> None:
    with (
        pytest.raises(LaunchError, match="repeated: a"),
        launch_servers([fake("a"), fake("a")], log_dir=tmp_path),
    ):
        pass


def test_command_without_port_placeholder_needs_port(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"no \{port\} placeholder"):
        start_and_stop([ServerSpec(name="x", command="engine serve")], log_dir=tmp_path)


# ----------------------------------------------------------------------------- health variants, url, env


def test_health_falls_back_to_v1_models(tmp_path: Path) -> None:
    with launch_servers([fake("nohealth", "--no-health")], log_dir=tmp_path) as servers:
        assert httpx.get(servers["nohealth"].url + "/health", trust_env=False).status_code == 404


def test_api_key_from_env_is_used_for_health_and_never_logged(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("DIFFTEST_TEST_KEY", "s3cret-key")
    spec = fake("keyed", "--api-key", "{api_key}", api_key_env="DIFFTEST_TEST_KEY")
    with launch_servers([spec], log_dir=tmp_path) as servers:
        assert httpx.get(servers["keyed"].url + "/v1/models", trust_env=False).status_code == 401
    assert "s3cret-key" not in (tmp_path / "keyed.log").read_text()
    assert "puts the key on a command line" in caplog.text and "s3cret-key" not in caplog.text
    monkeypatch.delenv("DIFFTEST_TEST_KEY")
    with pytest.raises(LaunchError, match="DIFFTEST_TEST_KEY .* is not set"):
        start_and_stop([spec], log_dir=tmp_path)


def test_env_gpus_and_cwd_reach_the_process(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    spec = fake(
        "envy",
        *("--print-env", "FOO", "--print-env", "CUDA_VISIBLE_DEVICES", "--print-env", "HIP_VISIBLE_DEVICES"),
        env={"FOO": "bar"},
        gpus="2,3",
        cwd=str(work),
    )
    with launch_servers([spec], log_dir=tmp_path):
        pass
    text = (tmp_path / "envy.log").read_text()
    assert "FOO=bar" in text and "CUDA_VISIBLE_DEVICES=2,3" in text and "HIP_VISIBLE_DEVICES=2,3" in text
    assert f"cwd={work}" in text


def test_url_server_is_health_checked_not_started(tmp_path: Path) -> None:
    with launch_servers([fake("real")], log_dir=tmp_path / "a") as started:
        url = started["real"].url
        with launch_servers([ServerSpec(name="remote", url=url + "/v1/")], log_dir=tmp_path / "b") as servers:
            remote = servers["remote"]
            assert remote.url == url and remote.pid is None and remote.exit_code() is None
        assert started["real"].exit_code() is None  # leaving the url block stopped nothing
    with pytest.raises(LaunchError, match="'gone' at http://127.0.0.1:9 not healthy"):
        start_and_stop(
            [ServerSpec(name="gone", url="http://127.0.0.1:9", startup_timeout_s=0.3)], log_dir=tmp_path
        )


# ----------------------------------------------------------------------------- argv and TOML tables


def test_shim_argv_carries_every_option() -> None:
    spec = ServerSpec(
        name="t",
        model="tiny-llama",
        dtype="float32",
        device="cpu",
        quant="fp8-block",
        backend="triton",
        quant_skip=("lm_head", "model.layers.0.*"),
        faults=("scale-transposed@model.layers.1.mlp.down_proj",),
        ck_free=True,
        batch_invariant=True,
        debug=True,
        seed=5,
        extra_args=("--max-model-len", "512"),
    )
    argv = build_argv(spec, 4321, api_key="k")
    assert argv[:4] == [sys.executable, "-m", "server_shim", "serve"]
    pairs = {(a, b) for a, b in zip(argv[4:], argv[5:], strict=False)}
    for part in [
        ("--model", "tiny-llama"), ("--port", "4321"), ("--host", "127.0.0.1"), ("--dtype", "float32"),
        ("--device", "cpu"), ("--seed", "5"), ("--quant", "fp8-block"), ("--backend", "triton"),
        ("--quant-skip", "lm_head"), ("--quant-skip", "model.layers.0.*"),
        ("--fault", "scale-transposed@model.layers.1.mlp.down_proj"), ("--max-model-len", "512"),
    ]:  # fmt: skip
        assert part in pairs
    assert {"--ck-free", "--batch-invariant", "--debug"} <= set(argv)
    assert argv[-2:] == ["--max-model-len", "512"]  # extra_args last
    assert "k" not in argv  # the key travels by environment (launch._start), never on the command line
    assert "--ck-free" not in build_argv(ServerSpec(name="p", model="m"), 1)


def test_command_template_substitutes_and_keeps_json_braces() -> None:
    spec = ServerSpec(
        name="v", model="org/m", command="vllm serve {model} --port {port} --host {host} --x '{\"a\": 1}'"
    )
    assert build_argv(spec, 8001) == [
        "vllm",
        "serve",
        "org/m",
        "--port",
        "8001",
        "--host",
        "127.0.0.1",
        "--x",
        '{"a": 1}',
    ]


def test_spec_from_table_checks_keys_types_and_choices() -> None:
    spec = spec_from_table(
        {"model": "tiny-llama", "quant": "int8", "faults": "scale-skipped", "gpus": [0, 1]}, default_name="r"
    )
    assert (
        spec.name == "r" and spec.faults == ("scale-skipped",) and spec.gpus == "0,1" and spec.kind == "shim"
    )
    cases = [
        ({"model": "m", "quantt": "int8"}, "quantt", "did you mean 'quant'"),
        ({"model": "m", "seed": "1"}, "seed", "must be an integer, got str '1'"),
        ({"model": "m", "debug": 1}, "debug", "must be true or false"),
        ({"model": "m", "quant": "fp8-blok"}, "quant", "did you mean 'fp8-block'"),
        ({"model": "m", "backend": "cuda"}, "backend", "must be one of auto, torch"),
        ({"model": "m", "faults": ["scale-transposd@x"]}, "faults", "did you mean 'scale-transposed'"),
        (
            {"model": "m", "quant": "fp8-token", "faults": ["scale-transposed"]},
            "faults",
            "cannot exist in scheme 'fp8-token'",
        ),
        ({"model": "m", "port": 70000}, "port", "1..65535"),
        ({"command": "e --port {port}", "quant": "int8"}, "quant", "only to built-in shim"),
        ({"url": "http://h", "env": {"A": "b"}}, "env", "does not apply to a 'url' server"),
        ({"model": "m", "env": {"A": [1]}}, "env", "env.A"),
        ({"dtype": "float32"}, None, "needs one of 'model', 'command' or 'url'"),
        ({"command": "c", "url": "u"}, "url", "not both"),
        ({"model": "m", "name": "a b"}, "name", "must be letters"),
    ]
    for table, key, text in cases:
        with pytest.raises(SpecError, match=text) as info:
            spec_from_table(table, default_name="r")
        assert info.value.key == key, table


def test_auto_golden_is_torch_without_faults() -> None:
    target = ServerSpec(
        name="t",
        model="m",
        quant="fp8-token",
        backend="vendor",
        faults=("garbage-gemm",),
        ck_free=True,
        port=9000,
    )
    golden = auto_golden(target)
    assert (golden.name, golden.backend, golden.faults, golden.ck_free, golden.port) == (
        "t-golden",
        "torch",
        (),
        False,
        None,
    )
    assert (golden.model, golden.quant) == ("m", "fp8-token")
    with pytest.raises(SpecError, match="name the golden server yourself"):
        auto_golden(ServerSpec(name="x", url="http://h"))


# ----------------------------------------------------------------------------- `pair`


def _pair_config(tmp_path: Path, *commands: str) -> Path:
    lines = ['[run]\nprompts = "p.jsonl"\n', f"[reference]\ncommand = {commands[0]!r}\n"]
    lines += [
        f'[[target]]\nname = "t{i}"\ncommand = {c!r}\nexpect = "pass"\n' for i, c in enumerate(commands[1:])
    ]
    path = tmp_path / "pair.toml"
    path.write_text("\n".join(lines))
    return path


def test_main_pair_config_error_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[reference]\nmodel = "m"\nquantt = "int8"\n')
    assert main_pair(str(path)) == 2
    assert "did you mean 'quant'" in capsys.readouterr().err
    assert main_pair(str(tmp_path / "missing.toml")) == 2


@pytest.mark.parametrize(("sig", "want"), [(signal.SIGINT, 0), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_main_pair_serves_until_ctrl_c_or_sigterm(tmp_path: Path, sig: signal.Signals, want: int) -> None:
    """SIGTERM (a cancelled CI job) must tear the servers down too, not orphan them."""
    cmd = f"{sys.executable} {FAKE} --port {{port}} --name pairtok-{uuid.uuid4().hex[:8]}"
    path = _pair_config(tmp_path, cmd, cmd)
    code = f"import sys; from server_shim.launch import main_pair; sys.exit(main_pair({str(path)!r}))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=default_sigint,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C" in line:
            break
    urls = [ln.split()[1] for ln in lines if ln.startswith(("reference", "t0"))]
    assert len(urls) == 2
    for url in urls:
        assert httpx.get(url + "/health", trust_env=False).status_code == 200
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == want
    token = cmd.split("--name ")[1]
    assert pids_with(token) == []
    assert (tmp_path / "runs" / "pair-pair" / "logs" / "t0.log").exists()


# ----------------------------------------------------------------------------- real shims


@pytest.mark.slow
@pytest.mark.skipif(
    not (ROOT / "server_shim" / "__main__.py").exists(), reason="server_shim CLI not written yet"
)
def test_two_real_tiny_llama_shims(tmp_path: Path) -> None:
    specs = [
        ServerSpec(name=n, model="tiny-llama", device="cpu", startup_timeout_s=300) for n in ("ref", "tgt")
    ]
    with launch_servers(specs, log_dir=tmp_path) as servers:
        pids = [s.pid for s in servers.values()]
        texts = []
        for server in servers.values():
            body = {"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
            resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60, trust_env=False)
            assert resp.status_code == 200, resp.text
            texts.append(resp.json()["choices"][0]["text"])
        assert texts[0] == texts[1]  # same seeded model, greedy
    assert wait_dead(pids) == []


# ----------------------------------------------------------------------------- a launcher that is SIGKILLed

_ORPHAN_PARENT = """
import sys, time
from pathlib import Path
from server_shim.launch import ServerSpec, launch_servers
cmd = sys.argv[1]
specs = [ServerSpec(name=n, command=cmd.replace("NAME", n), startup_timeout_s=20) for n in ("a", "b")]
with launch_servers(specs, log_dir=Path(sys.argv[2])) as servers:
    print(" ".join(str(s.pid) for s in servers.values()), flush=True)
    time.sleep(600)
"""


def test_servers_stop_by_themselves_when_the_launcher_is_sigkilled(tmp_path: Path) -> None:
    """SIGKILL runs no teardown: the kernel's parent-death signal must stop the servers (they used to
    live on, holding their ports)."""
    token = f"orphan-{uuid.uuid4().hex[:8]}"
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))} --port {{port}} --name {token}-NAME"
    parent = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_PARENT, cmd, str(tmp_path)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        assert sorted(pids) == sorted(p for p in pids_with(token) if p != parent.pid)
        parent.kill()
        parent.wait(timeout=10)
        assert wait_dead(pids, timeout=15) == []
        assert pids_with(token) == []
    finally:
        parent.kill()
        for pid in pids_with(token):  # only if the test failed: leave nothing behind
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_launched_shim_gets_its_key_by_environment_not_argv(tmp_path: Path, monkeypatch) -> None:
    """The key is not in /proc/PID/cmdline (readable by every user) nor in the log; /health is open."""
    key = f"sk-{uuid.uuid4().hex}"
    monkeypatch.setenv("DIFFTEST_TEST_SHIM_KEY", key)
    spec = ServerSpec(
        name="keyed",
        model="tiny-llama",
        device="cpu",
        api_key_env="DIFFTEST_TEST_SHIM_KEY",
        startup_timeout_s=300,
    )
    with launch_servers([spec], log_dir=tmp_path) as servers:
        server = servers["keyed"]
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert key.encode() not in cmdline and b"serve" in cmdline
        assert httpx.get(server.url + "/health", trust_env=False).status_code == 200
        assert httpx.get(server.url + "/v1/models", trust_env=False).status_code == 401
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(server.url + "/v1/models", headers=auth, trust_env=False).status_code == 200
    assert key not in (tmp_path / "keyed.log").read_text()


def test_every_spec_option_reaches_the_shim_flags_it_parses() -> None:
    """The option table is the one source: every spec key becomes a flag that `serve` parses back
    to the same value (a row added to options.OPTIONS needs no other launcher change)."""
    from server_shim.__main__ import build_parser
    from server_shim.options import BOOLEAN, SPEC_OPTIONS, STRINGS, from_namespace

    samples = {"quant": "int8", "backend": "torch", "faults": ("scale-skipped",), "rounding_noise": "auto"}
    values = {}
    for o in SPEC_OPTIONS:
        if o.name in samples:
            values[o.name] = samples[o.name]
        elif o.kind == BOOLEAN:
            values[o.name] = True
        elif o.kind == STRINGS:
            values[o.name] = ("a", "b")
        elif o.kind == "integer":
            values[o.name] = 7
        else:
            values[o.name] = "x1"
    spec = ServerSpec(name="s", model="tiny-llama", **values)
    argv = build_argv(spec, 1234)
    args = build_parser().parse_args(argv[3:])  # drop `python -m server_shim`
    opts = from_namespace(args)
    for name, value in values.items():
        assert getattr(opts, name) == value, name
    assert (opts.model, opts.port, opts.host) == ("tiny-llama", 1234, "127.0.0.1")
    assert set(launch_spec.SPEC_KEYS) >= {o.name for o in SPEC_OPTIONS}
    assert tuple(o.name for o in SPEC_OPTIONS) == launch_spec.SHIM_ONLY


def test_a_users_thread_count_sets_both_openmp_and_mkl() -> None:
    # our share of the cores where the user set nothing
    assert launch.thread_env({}, 2) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    # OMP_NUM_THREADS alone also sets MKL's (the share instead ran MKL on 2 threads where the user
    # asked for 1: spinning threads, 304 s instead of 45 s on a busy machine)
    assert launch.thread_env({"OMP_NUM_THREADS": "1"}, 2) == {"MKL_NUM_THREADS": "1"}
    assert launch.thread_env({"MKL_NUM_THREADS": "3"}, 2) == {"OMP_NUM_THREADS": "3"}
    # both set: nothing changes; an empty value counts as unset
    assert launch.thread_env({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "4"}, 2) == {}
    assert launch.thread_env({"OMP_NUM_THREADS": ""}, 2) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def test_the_shim_sleeps_its_idle_openmp_threads_unless_told_otherwise() -> None:
    code = "import os, server_shim.__main__; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "ACTIVE"


def test_the_health_wait_reports_its_status_to_the_caller(tmp_path: Path) -> None:
    """on_status hears the wait begin (nothing healthy), each server turn healthy in the order it
    answered (the slow one last), and last a status with nothing pending: what a caller shows
    while a cold server tunes for minutes."""
    statuses: list[launch.StartupStatus] = []
    go = tmp_path / "quick-is-up"  # the slow one listens only once the quick one was seen healthy:
    # a fixed 4 s delay lost the race on a loaded 2-core runner (the quick one's start took longer)

    def heard(status: launch.StartupStatus) -> None:
        statuses.append(status)
        if "quick" in status.healthy:
            go.touch()

    specs = [fake("slow", "--wait-file", str(go)), fake("quick")]
    with launch_servers(specs, log_dir=tmp_path, on_status=heard):
        pass
    assert statuses[0].healthy == () and set(statuses[0].pending) == {"slow", "quick"}
    assert statuses[-1].healthy == ("quick", "slow") and statuses[-1].pending == ()
    assert all(s.total == 2 for s in statuses)
    assert [s.elapsed_s for s in statuses] == sorted(s.elapsed_s for s in statuses)


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_cwd_that_is_no_folder_is_named_not_the_program(tmp_path: Path, kind: str) -> None:
    """Was: "cannot run '<python>': No such file or directory" (a LaunchError, exit 3) for a cwd
    gone between the config check and the launch: the interpreter blamed, and CI retried it."""
    from difftest.errors import USAGE, exit_code_for

    cwd = tmp_path / "gone"
    if kind == "file":
        cwd.write_text("")
    with pytest.raises(
        SpecError, match=r"'cwdless': key 'cwd': .*gone' is not a folder to start the server"
    ) as info:
        start_and_stop([fake("cwdless", cwd=str(cwd))], log_dir=tmp_path)
    assert sys.executable not in str(info.value) and info.value.key == "cwd"
    assert exit_code_for(info.value) == USAGE


def test_popen_failure_blames_the_cwd_only_where_it_failed(tmp_path: Path) -> None:
    """A folder that is there but may not be entered: the OSError's reason, with the cwd; a missing
    program under a good cwd is still the program's."""
    spec = ServerSpec(name="locked", command="engine --port {port}", cwd=str(tmp_path))
    denied = launch.popen_failure(spec, "engine", PermissionError(13, "Permission denied", str(tmp_path)))
    assert isinstance(denied, SpecError)
    assert str(denied) == f"server 'locked': key 'cwd': {str(tmp_path)!r}: Permission denied"
    missing = launch.popen_failure(
        spec, "engine", FileNotFoundError(2, "No such file or directory", "engine")
    )
    assert type(missing) is LaunchError
    assert str(missing) == "server 'locked': cannot run 'engine': No such file or directory"
