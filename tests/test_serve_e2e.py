"""The real CLI: `python -m server_shim serve` as a subprocess (slow: smollm2-135m), and its user errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server_shim", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args",
    [
        ("serve",),
        ("serve", "--model", "x", "--port", "abc"),
        ("frobnicate",),
        ("serve", "--model", "x", "--log-level", "loud"),
        ("serve", "--model", "x", "--max-waiting", "0"),
        ("serve", "--model", "x", "--quant", "fp7"),
    ],
    ids=["no-model", "bad-port", "bad-command", "bad-level", "zero-queue", "bad-scheme"],
)
def test_bad_arguments_one_line_exit_2(args):
    r = _cli(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def _refused_at_start(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> str:
    """`serve` of tiny-llama on the CPU with env `name`=value: its one stderr line (exit 2, no traceback)."""
    monkeypatch.setenv(name, value)
    r = _cli(
        "serve",
        "--model",
        "tiny-llama",
        "--device",
        "cpu",
        "--port",
        str(_free_port()),
        "--log-level",
        "error",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r.stderr


def test_mistyped_switch_stops_the_server_one_line_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """DIFFTEST_CK_FREE=enabled is neither on nor off: refused before any model loads, never the default."""
    assert "DIFFTEST_CK_FREE='enabled' is neither on" in _refused_at_start(
        monkeypatch, "DIFFTEST_CK_FREE", "enabled"
    )


@pytest.mark.parametrize("value", ["256MB", "0", "-5"])
def test_a_bad_debug_byte_cap_stops_the_server_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """DIFFTEST_DEBUG_MAX_BYTES must be a positive integer: refused at start, never a traceback."""
    err = _refused_at_start(monkeypatch, "DIFFTEST_DEBUG_MAX_BYTES", value)
    assert f"DIFFTEST_DEBUG_MAX_BYTES={value!r} is not a positive number" in err


def test_the_debug_byte_cap_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from server_shim import debug

    monkeypatch.delenv("DIFFTEST_DEBUG_MAX_BYTES", raising=False)
    assert debug.response_cap() == 256 * 2**20
    monkeypatch.setenv("DIFFTEST_DEBUG_MAX_BYTES", " 4096 ")
    assert debug.response_cap() == 4096


def test_unknown_model_one_line_exit_2():
    r = _cli("serve", "--model", "/no/such/model", "--port", str(_free_port()), "--log-level", "error")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("server_shim: error: unknown model")


@pytest.mark.slow
def test_smollm2_answers_paris(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "server_shim", "serve", "--model", "smollm2-135m", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: teardown kills everything it started
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "server did not become healthy"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        r = httpx.post(
            f"{url}/v1/completions",
            json={
                "model": "smollm2-135m",
                "prompt": "The capital of France is",
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        assert "Paris" in text, text
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_debug_on_a_public_host_without_key_refuses_to_start():
    env = {k: v for k, v in os.environ.items() if k != "DIFFTEST_SHIM_API_KEY"}
    r = subprocess.run(
        [sys.executable, "-m", "server_shim", "serve", "--model", "tiny-llama", "--host", "0.0.0.0", "--debug",
         "--port", str(_free_port())],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 2
    assert "DIFFTEST_SHIM_API_KEY" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_api_key_is_not_a_flag():
    """A key on the command line is public (ps); the old --api-key flag is gone."""
    r = _cli("serve", "--model", "tiny-llama", "--api-key", "k")
    assert r.returncode == 2 and "--api-key" in r.stderr


def test_a_named_api_key_variable_that_is_unset_is_refused():
    """The bug: `--api-key-env MYKEY` with MYKEY unset served every route open, without a word."""
    env = {k: v for k, v in os.environ.items() if k != "DIFFTEST_UNSET_KEY_VAR"}
    r = subprocess.run(
        [sys.executable, "-m", "server_shim", "serve", "--model", "tiny-llama", "--api-key-env",
         "DIFFTEST_UNSET_KEY_VAR", "--port", str(_free_port())],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "server_shim: error: --api-key-env DIFFTEST_UNSET_KEY_VAR: that environment variable is not set "
        "(or empty); set it, or leave --api-key-env out to serve without a key"
    ]
