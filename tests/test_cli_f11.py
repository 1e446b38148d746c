"""CLI options (tester t14): `layers CONFIG` launches only the servers its diffs use, `run --limit`
is recorded in the signature, and `--api-key-env SERVER=VAR` naming a server the flag gives no
key to is refused."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
from live_fakes import live_fake

from difftest.cli import main
from difftest.cli import options as o
from difftest.cli.run import with_overrides
from difftest.cli.whitebox import _plan
from difftest.config import load_config
from difftest.errors import UsageError
from difftest.signature import run_signature

SHIM = 'model = "tiny-llama"\ndtype = "float32"\ndevice = "cpu"\n'


def _config(tmp_path: Path, body: str) -> Path:
    (tmp_path / "p.jsonl").write_text(
        '{"id": "a", "prompt": "the quick brown fox"}\n{"id": "b", "prompt": "one two three"}\n'
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[run]\nprompts = "p.jsonl"\nmax_tokens = 4\noutput_dir = "{tmp_path / "out"}"\n{body}')
    return cfg


def _args(config: Path | None = None, **kw: object) -> argparse.Namespace:
    base = {"config": config, "ref": None, "target": None, "golden": None, "api_key_env": []}
    return argparse.Namespace(**(base | kw))


def test_layers_config_launches_no_rounding_twin(tmp_path: Path) -> None:
    """The bug: `layers CONFIG` launched every golden's rounding twin (`null = "twin"`, the default),
    a model loaded per golden that no diff asks: 3 extra smollm2 servers on configs/default.toml."""
    cfg = _config(
        tmp_path,
        f'[reference]\nname = "ref"\n{SHIM}[[target]]\nname = "fp8"\n{SHIM}quant = "fp8-block"\ngolden = "auto"\n',
    )
    every = {s.name for s in load_config(cfg).servers()}
    specs, urls, jobs = _plan(_args(cfg))
    launched = {s.name for s in specs}
    assert every - launched == {f"{jobs[0].golden}-twin"}  # the twin existed, and only it is left out
    assert launched == {"ref", "fp8", jobs[0].golden} and urls == {}
    assert all(s.debug for s in specs)


def test_run_limit_is_recorded_in_the_signature(tmp_path: Path) -> None:
    """The bug: signature.run.limit kept the config's value under `run --limit N`, while -j and
    --timeout were folded in."""
    cfg = load_config(
        _config(
            tmp_path,
            '[reference]\nurl = "http://127.0.0.1:9"\n[[target]]\nname = "t"\nurl = "http://127.0.0.1:9"\n',
        )
    )
    args = _args(limit=1, concurrency=3, timeout=7.0)
    run = run_signature(with_overrides(cfg, args), {}, [], None)["run"]
    assert (run["limit"], run["concurrency"], run["request_timeout_s"]) == (1, 3, 7.0)
    assert run_signature(with_overrides(cfg, _args(limit=None)), {}, [], None)["run"]["limit"] is None


def test_run_limit_end_to_end(tmp_path: Path, capsys) -> None:
    with live_fake() as ref, live_fake() as tgt:
        cfg = _config(tmp_path, f'[reference]\nurl = "{ref}"\n[[target]]\nname = "t"\nurl = "{tgt}"\n')
        main(["run", str(cfg), "--limit", "1", "-o", str(tmp_path / "r")])
    sig = json.loads((tmp_path / "r" / "report.json").read_text())["signature"]
    assert sig["run"]["limit"] == 1 and sig["prompts"]["count"] == 1


def test_api_key_env_naming_a_launched_shim_is_refused_before_any_server(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """The bug: `run --api-key-env fp8=MYKEY` with a launched shim `fp8` was a normal run: the flag
    gives only running url servers a key, so it did nothing, without a word."""
    import difftest.cli.run as run_cmd
    import difftest.noise_run
    import difftest.session

    def started(*a: object, **k: object) -> None:
        raise AssertionError("a server was started")

    monkeypatch.setenv("MYKEY", "k")
    monkeypatch.setattr(run_cmd, "execute_and_finish", started)
    monkeypatch.setattr(difftest.noise_run, "measure_noise", started)
    monkeypatch.setattr(difftest.session, "launch_shown", started)
    cfg = _config(
        tmp_path, f'[reference]\nname = "ref"\n{SHIM}[[target]]\nname = "fp8"\n{SHIM}quant = "fp8-block"\n'
    )
    for command in ("run", "noise", "layers"):
        assert main([command, str(cfg), "--api-key-env", "fp8=MYKEY"]) == 2, command
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0 and "Traceback" not in err
        assert (
            "--api-key-env fp8=MYKEY: server 'fp8' takes no key from this flag: it is launched (shim)" in err
        )


def test_api_key_env_only_for_servers_it_keys(tmp_path: Path, monkeypatch) -> None:
    """A url server with its own api_key_env, and a recorded reference, take no key from the flag
    either; a plain url server, VAR for every server, and a family with one taker still do."""
    monkeypatch.setenv("MYKEY", "k")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # else the fallback key of every url server
    cfg = load_config(_config(tmp_path, (
        '[reference]\nurl = "http://127.0.0.1:9"\n'
        '[[target]]\nname = "own"\nurl = "http://127.0.0.1:9"\napi_key_env = "MYKEY"\n'
        '[[target]]\nname = "t1"\nurl = "http://127.0.0.1:9"\n'
        f'[[target]]\nname = "t2"\n{SHIM}\n'
    )))  # fmt: skip
    with pytest.raises(
        UsageError, match="server 'own' takes no key from this flag: its table names api_key_env = 'MYKEY'"
    ):
        with_overrides(cfg, _args(api_key_env=["own=MYKEY"]))
    keyed = with_overrides(cfg, _args(api_key_env=["t=MYKEY"]))  # t1 takes it, t2 (a shim) not
    assert {s.name: s.api_key_env for s in keyed.servers()} == {
        "reference": None, "own": "MYKEY", "t1": "MYKEY", "t2": None
    }  # fmt: skip
    assert with_overrides(cfg, _args(api_key_env=["MYKEY"])).reference.api_key_env == "MYKEY"
    refusals = {"reference": "it is a recorded baseline", "target1": "it is launched (shim)"}
    with pytest.raises(UsageError, match="server 'target1' takes no key"):
        o.check_key_takers(o.key_envs(["target=MYKEY"]), refusals)


def test_api_key_env_naming_a_recorded_reference_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MYKEY", "k")
    cfg = load_config(
        _config(
            tmp_path,
            '[reference]\nurl = "http://127.0.0.1:9"\n[[target]]\nname = "t"\nurl = "http://127.0.0.1:9"\n',
        )
    )
    recorded = dataclasses.replace(cfg, baseline=tmp_path / "base")  # as [reference] baseline = "base" loads
    with pytest.raises(
        UsageError, match="server 'reference' takes no key from this flag: it is a recorded baseline"
    ):
        with_overrides(recorded, _args(api_key_env=["reference=MYKEY"]))


@pytest.mark.parametrize(
    ("expect", "failed", "worst_open", "code"),
    [
        ("pass", False, 0, 0),  # clean, as expected
        ("pass", True, 0, 1),  # a fault found
        ("pass", True, 3, 1),  # a fault found beats an unmade diff
        ("pass", False, 4, 4),  # nothing decided
        ("fail", True, 0, 0),  # a negative control caught
        ("fail", True, 3, 0),  # caught, though another diff was not made
        ("fail", False, 0, 1),  # a negative control found clean: its fault went unseen
        ("fail", False, 3, 3),  # not caught, but a diff was not made: the servers', not a verdict
    ],
)
def test_layers_gates_each_target_on_its_expect(
    expect: str, failed: bool, worst_open: int, code: int
) -> None:
    from difftest.cli.layers import expected_code

    assert expected_code(expect, failed, worst_open) == code


@pytest.mark.slow
def test_layers_config_with_a_caught_negative_control_exits_0(tmp_path: Path, capsys) -> None:
    """The bug: `layers CONFIG` read no `expect`, so a config with a negative control (as
    configs/default.toml has) exited 1 whatever its kernels did; `run` on the same config exits 0."""
    fault = 'faults = ["scale-skipped@model.layers.1.mlp.down_proj"]\n'
    cfg = _config(
        tmp_path,
        f'[reference]\nname = "ref"\n{SHIM}'
        f'[[target]]\nname = "bad"\n{SHIM}quant = "fp8-block"\nexpect = "fail"\n{fault}',
    )
    out = tmp_path / "lay"
    assert main(["layers", str(cfg), "-o", str(out), "--json"]) == 0, capsys.readouterr().err
    found = json.loads((out / "layers.json").read_text())
    assert found["exit_code"] == 0 and found["diffs"][0]["expect"] == "fail" and found["diffs"][0]["failed"]
    cfg.write_text(cfg.read_text().replace(fault, ""))  # the same control without its fault: not caught
    assert main(["layers", str(cfg), "-o", str(out), "--json"]) == 1


def test_a_control_whose_faults_the_replay_cannot_reach_is_undecided_not_missed() -> None:
    """(t17) configs/fault-demo.toml's slot-tile control exited 1 under `layers CONFIG` ("no fault
    found: NOT as expected"), though the replay (slots 0 and 1) cannot see a fault from slot 16 on."""
    from difftest.cli.layers import expected_code, out_of_reach

    assert out_of_reach(["slot-tile"]) == ["slot-tile"] and out_of_reach(["slot-tile@*.down_proj"]) == [
        "slot-tile"
    ]
    assert out_of_reach(["slot-tile", "scale-skipped"]) == [] and out_of_reach([]) == []
    assert expected_code("fail", False, 0, blind=True) == 4
    assert expected_code("fail", True, 0, blind=True) == 0  # found anyway: as expected
    assert expected_code("pass", False, 0, blind=True) == 0


def test_layers_jobs_carry_the_targets_faults(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        f'[reference]\nname = "ref"\n{SHIM}[[target]]\nname = "t"\n{SHIM}quant = "fp8-block"\n'
        'expect = "fail"\nfaults = ["slot-tile"]\n',
    )
    (job,) = _plan(_args(cfg))[2]
    assert job.expect == "fail" and job.faults == ("slot-tile",)


def test_jobs_carry_the_targets_scheme_and_the_compute_dtypes(tmp_path: Path) -> None:
    """What quant's reach depends on (ue8m0 on int8 is out of it where a server computes in bf16)."""
    cfg = _config(
        tmp_path,
        f'[reference]\nname = "ref"\n{SHIM.replace("float32", "float16")}[[target]]\nname = "t"\n'
        f'{SHIM.replace("float32", "bf16")}quant = "int8"\nexpect = "fail"\nfaults = ["ue8m0-rounding"]\n',
    )
    (job,) = _plan(_args(cfg))[2]
    assert job.scheme == "int8" and job.dtypes == ("float16", "bf16")


def test_api_key_env_naming_a_server_noise_never_asks_is_refused(tmp_path: Path, monkeypatch) -> None:
    """(t17) `noise` and `record` ask the reference alone: `--api-key-env t1=VAR` naming a url
    target was accepted and the key went nowhere."""
    monkeypatch.setenv("MYKEY", "k")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = load_config(_config(tmp_path, (
        '[reference]\nurl = "http://127.0.0.1:9"\n[[target]]\nname = "t1"\nurl = "http://127.0.0.1:9"\n'
    )))  # fmt: skip
    with pytest.raises(
        UsageError, match="server 't1' takes no key from this flag: this command asks the reference alone"
    ):
        with_overrides(cfg, _args(api_key_env=["t1=MYKEY"]), reference_only=True)
    assert (
        with_overrides(cfg, _args(api_key_env=["t1=MYKEY"])).targets[0].server.api_key_env == "MYKEY"
    )  # run
    only = with_overrides(
        cfg, _args(api_key_env=["MYKEY"]), reference_only=True
    )  # every server: the reference
    assert only.reference.api_key_env == "MYKEY"
