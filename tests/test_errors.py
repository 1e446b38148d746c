"""difftest.errors: one tree, facts as real attributes, and exit 2 for every config-shaped mistake
(docs/design.md "Errors and exit codes")."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import httpx
import pytest

import difftest
from difftest import errors
from difftest.cli import main
from difftest.client import CompletionClient
from difftest.conformance import probe
from difftest.errors import (
    CacheMiss,
    ConfigError,
    ConformanceError,
    DifftestError,
    InfraError,
    NoiseFloorError,
    OutputError,
    RequestRejected,
    ServerError,
    UnreadableBody,
    UsageError,
    exit_code_for,
)
from server_shim.errors import LaunchError, ServerRefusedConfig
from server_shim.launch_spec import SpecError


@pytest.mark.parametrize(
    ("cls", "parent", "code"),
    [
        (UsageError, DifftestError, 2),
        (ConfigError, UsageError, 2),
        (NoiseFloorError, UsageError, 2),
        (CacheMiss, UsageError, 2),
        (OutputError, UsageError, 2),
        (ConformanceError, DifftestError, 2),
        (RequestRejected, DifftestError, 2),
        (InfraError, DifftestError, 3),
        (ServerError, InfraError, 3),
        (UnreadableBody, ServerError, 3),
    ],
)
def test_the_tree_its_docstring_draws(cls: type[DifftestError], parent: type, code: int) -> None:
    assert cls.__bases__ == (parent,) and cls.exit_code == code
    assert cls.__name__ in (errors.__doc__ or "")


def test_every_exception_of_the_differ_lives_in_errors_py() -> None:
    found = []
    for info in pkgutil.walk_packages(difftest.__path__, "difftest."):
        if info.name == "difftest.__main__":
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found.append(f"{info.name}.{name}")
    assert found and all(f.startswith("difftest.errors.") for f in found), found


def test_exit_codes_of_the_launchers_errors() -> None:
    assert exit_code_for(SpecError("a command without {port}", key="port")) == 2  # config-shaped
    assert exit_code_for(LaunchError("server 'x' exited with code 1")) == 3
    assert exit_code_for(ServerRefusedConfig("server 'x' refused its configuration: ...")) == 2
    assert exit_code_for(ConfigError("x.toml:3: bad")) == 2
    assert exit_code_for(ValueError("a bug")) is None  # a traceback, not a one-liner


def _client(handler, **kw) -> CompletionClient:  # noqa: ANN001
    return CompletionClient("http://s.test", name="s", transport=httpx.MockTransport(handler), **kw)


async def test_request_errors_carry_the_servers_words() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "echo is not supported", "param": "echo"}})

    async with _client(refuse) as c:
        with pytest.raises(RequestRejected) as info:
            await c.completions({"prompt": "x", "echo": True}, use_cache=False)
    e = info.value
    assert (e.server, e.status_code, e.reason) == ("s", 400, "HTTP 400: echo is not supported")
    assert e.body["error"]["param"] == "echo" and str(e).startswith("s: POST /v1/completions rejected")

    async def nop(_: float) -> None:
        return None

    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"message": "overloaded"}})

    async with _client(down, max_retries=1, sleep=nop) as c:
        with pytest.raises(ServerError) as info2:
            await c.get_json("/v1/models")
    assert (info2.value.status_code, info2.value.reason) == (503, "HTTP 503: overloaded")
    assert "failed after 2 attempt(s)" in str(info2.value)


async def test_probe_quotes_the_reason_not_the_prefix() -> None:
    """The probe used to read a `.detail` attached to the exception after it was raised."""

    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "completions are switched off"}})

    async with _client(server, max_retries=0) as c:
        with pytest.raises(ConformanceError) as info:
            await probe(c)
    assert str(info.value).endswith("cannot serve /v1/completions: HTTP 400: completions are switched off")


def test_config_error_locates_the_key(tmp_path: Path) -> None:
    from difftest.config import load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[run]\nprompts = ["p.jsonl"]\nmax_tokenz = 3\n[reference]\nname = "r"\nurl = "http://x"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert (info.value.path, info.value.line, info.value.key) == (cfg, 3, "max_tokenz")


def _run_config(tmp_path: Path, target: str) -> Path:
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "1+2="}\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[run]\nprompts = ["p.jsonl"]\noutput_dir = "out"\n[reference]\nname = "r"\nurl = "http://127.0.0.1:9"\n'
        f"[[target]]\n{target}\n"
    )
    return cfg


@pytest.mark.parametrize(
    ("target", "says"),
    [
        # the launcher can only tell when it starts the server; it used to exit 3 (infrastructure)
        ('name = "t"\ncommand = "my-engine --serve"', "no {port} placeholder"),
        (
            'name = "t"\ncommand = "my-engine --port {port}"\napi_key_env = "DIFFTEST_UNSET_KEY_VAR"',
            "is not set",
        ),
    ],
)
def test_config_shaped_launch_mistakes_exit_2(
    tmp_path: Path,
    target: str,
    says: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DIFFTEST_UNSET_KEY_VAR", raising=False)
    assert main(["run", str(_run_config(tmp_path, target)), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
