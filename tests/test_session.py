"""difftest.session: each server probed once, its /debug/config fetched once per run, clients
closed; commands that need the debug protocol say which server lacks it (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import FAKE_URL, FakeBehaviour, FakeServer, make_fake_app
from live_fakes import live_fake
from test_runner import run_with_golden, write_config

from difftest.cli import main
from difftest.errors import ConformanceError, InfraError
from difftest.session import ClientOptions, Server, Session


def _server(name: str, fake: FakeServer) -> Server:
    return Server(name, FAKE_URL, transport=fake.transport())


async def test_probed_once_and_closed() -> None:
    ref, tgt = FakeServer(debug=True), FakeServer(debug=False)
    session = Session([_server("ref", ref), _server("tgt", tgt)], ClientOptions(max_retries=0))
    async with session as s:
        assert list(s) == ["ref", "tgt"] and s["ref"].caps.debug and not s["tgt"].caps.debug
        assert s["ref"].caps.echo_consistent and s["tgt"].caps.teacher_forced  # a real probe, not made up
        config = await s["ref"].client.debug_config()
        assert config["model"] == "fake-model" and await s["ref"].client.debug_config() is config
        s.require_debug("ref")
        with pytest.raises(ConformanceError, match=r"tgt \(http://fake.invalid\): HTTP 404") as info:
            s.require_debug("ref", "tgt")
        assert info.value.exit_code == 2 and "ref (" not in str(info.value)
        clients = [ep.client for ep in s.endpoints.values()]
    assert ref.requests.count(("GET", "/debug/config")) == 1  # the probe's, then the client's copy
    assert ref.requests.count(("POST", "/v1/completions")) == tgt.requests.count(("POST", "/v1/completions"))
    assert all(c._http.is_closed for c in clients) and not session.endpoints


async def test_a_failed_probe_closes_every_client() -> None:
    dead = FakeServer(die_after=0)
    session = Session([_server("ok", FakeServer()), _server("dead", dead)], ClientOptions(max_retries=0))
    with pytest.raises(InfraError, match="dead .* fails /v1/completions"):  # 5xx: the server's fault
        await session.open()
    assert not session.endpoints


def test_of_urls_keys_and_repr() -> None:
    s = Session.of_urls({"t": "http://x.test/v1", "r": "http://r.test"}, api_key="sekrit", keys={"r": "own"})
    assert "sekrit" not in repr(s.servers) and "own" not in repr(s.servers)
    assert (s.servers["t"].api_key, s.servers["r"].api_key) == ("sekrit", "own")


@pytest.mark.slow
def test_a_run_asks_each_server_for_its_debug_config_once(tmp_path: Path) -> None:
    """`difftest run` with the white-box part on: the probe's GET is the only one per server (the
    cache fingerprint and the layer diff read the client's copy). It used to be five for a target."""
    apps = {name: make_fake_app(FakeBehaviour(debug=True)) for name in ("ref", "gold", "tgt")}
    assert run_with_golden(tmp_path, apps, "on") == 0
    for name, app in apps.items():
        assert app.state.fake.requests.count(("GET", "/debug/config")) == 1, name


def test_server_of_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    from server_shim.launch_spec import ServerSpec

    monkeypatch.setenv("DIFFTEST_SESSION_KEY", "k1")
    remote = ServerSpec(name="r", url="http://r.test/v1", api_key_env="DIFFTEST_SESSION_KEY")
    s = Server.of_spec(remote)
    assert (s.url, s.api_key) == ("http://r.test/v1", "k1") and s.cache_identity["url"] == "http://r.test/v1"
    shim = ServerSpec(name="t", model="tiny-llama", port=1234)
    launched = Server.of_spec(shim, "http://127.0.0.1:1234")
    assert (
        launched.url == "http://127.0.0.1:1234" and "port" not in launched.cache_identity
    )  # fresh port each run
    with pytest.raises(ValueError, match="no URL"):
        Server.of_spec(shim)


def test_whitebox_on_with_a_side_without_debug_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`whitebox = "on"` ran black-box and PASSed (exit 0) when the target served no /debug; the gap
    was only a warning inside report.json."""
    apps = {"ref": make_fake_app(FakeBehaviour(debug=True)), "tgt": make_fake_app(FakeBehaviour(debug=False))}
    with live_fake(app=apps["ref"]) as ref, live_fake(app=apps["tgt"]) as tgt:
        cfg = write_config(tmp_path, ref, [{"name": "t", "url": tgt}], extra_run='whitebox = "on"')
        code = main(["run", str(cfg), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "not serving the debug protocol" in err and "t (" in err and "reference (" not in err
    assert not (tmp_path / "out" / "report.json").exists()  # stopped after conformance: nothing judged
