"""`golden = "auto"` is the target's model and scheme on the reference backend with no faults and
no rounding noise; shim flags that have a table key are refused in `extra_args` (exit 2).

The bug: a target with `extra_args = ["--fault", "ue8m0-rounding@..."]` and `golden = "auto"` gave
a golden launched with the same --fault (the golden copied extra_args): exactness KL 0 and the
negative control PASSed. `rounding_noise = "0.05"` on a target reached its golden likewise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import MINIMAL, write

from difftest.config import load_config
from difftest.errors import ConfigError
from server_shim.launch import build_argv
from server_shim.launch_spec import ServerSpec, SpecError, auto_golden, spec_from_table

FAULT = "ue8m0-rounding@model.layers.2.mlp.down_proj"


def _config(tmp_path: Path, target_lines: str) -> Path:
    """test_config's minimal config, its target expected to fail, with `target_lines` added."""
    return write(tmp_path, f'{MINIMAL}expect = "fail"\n{target_lines}\n', "c.toml")


@pytest.mark.parametrize(
    ("args", "flag", "key"),
    [
        (["--fault", FAULT], "--fault", "faults"),
        ([f"--fault={FAULT}"], "--fault", "faults"),
        (["--backend", "triton"], "--backend", "backend"),
        (["--ck-free"], "--ck-free", "ck_free"),
        (["--quant", "int8"], "--quant", "quant"),
        (["--rounding-noise", "0.05"], "--rounding-noise", "rounding_noise"),
        (["--max-batch-size", "4", "--debug"], "--debug", "debug"),
        (["--port", "9000"], "--port", "port"),
    ],
)
def test_a_keyed_flag_in_extra_args_is_a_config_error(
    tmp_path: Path, args: list[str], flag: str, key: str
) -> None:
    quoted = ", ".join(f'"{a}"' for a in args)
    with pytest.raises(
        ConfigError, match=rf"c\.toml:\d+: \[\[target\]\] key 'extra_args': {flag} is what key '{key}' sets"
    ) as info:
        load_config(_config(tmp_path, f"extra_args = [{quoted}]"))
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--host=0.0.0.0"]])
def test_extra_args_cannot_move_a_launched_shim_off_loopback(tmp_path: Path, args: list[str]) -> None:
    """argparse keeps the last --host: the launcher's 127.0.0.1 would lose to this one."""
    quoted = ", ".join(f'"{a}"' for a in args)
    with pytest.raises(ConfigError, match=r"extra_args': --host is set by difftest .*127\.0\.0\.1") as info:
        load_config(_config(tmp_path, f"extra_args = [{quoted}]"))
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_extra_args_without_a_key_still_reach_the_shim_and_its_golden(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, 'extra_args = ["--max-batch-size", "4"]'))
    (t,) = cfg.targets
    assert t.golden is not None and t.golden.extra_args == ("--max-batch-size", "4")
    assert build_argv(t.golden, 1)[-2:] == ["--max-batch-size", "4"]


def test_a_command_servers_extra_args_are_the_engines_own() -> None:
    """Only the shim's flags are known: an engine's `--quant` means whatever the engine says."""
    spec = spec_from_table({"command": "eng --port {port}", "extra_args": ["--quant", "x"]}, default_name="e")
    assert spec.extra_args == ("--quant", "x")


def test_auto_golden_drops_the_targets_rounding_noise(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, f'rounding_noise = "0.05"\nfaults = ["{FAULT}"]'))
    (t,) = cfg.targets
    assert t.server.rounding_noise == "0.05" and t.golden is not None and t.twin is not None
    assert (t.golden.rounding_noise, t.golden.faults, t.golden.backend) == ("0", (), "torch")
    assert t.twin.rounding_noise == "auto" and t.twin.faults == ()  # the twin's noise is its own
    golden_argv = build_argv(t.golden, 1)
    assert "--rounding-noise" not in golden_argv and "--fault" not in golden_argv
    twin_argv = build_argv(t.twin, 1)
    assert twin_argv[twin_argv.index("--rounding-noise") + 1] == "auto" and "--fault" not in twin_argv


def test_auto_golden_of_a_noisy_target_is_the_clean_targets_golden(tmp_path: Path) -> None:
    """Two targets that differ only in faults or noise share one golden server."""
    cfg = load_config(
        _config(
            tmp_path,
            'rounding_noise = "0.05"\n[[target]]\nname = "u"\nmodel = "tiny-llama"\nquant = "fp8-block"\n'
            'golden = "auto"',
        )
    )
    t, u = cfg.targets
    assert t.golden is u.golden


def test_auto_golden_unit() -> None:
    target = ServerSpec(name="t", model="m", quant="int8", rounding_noise="auto", faults=("scale-skipped",))
    golden = auto_golden(target)
    assert (golden.rounding_noise, golden.faults) == ("0", ())
    with pytest.raises(SpecError, match="extra_args.*--fault is what key 'faults' sets"):
        spec_from_table({"model": "m", "extra_args": ["--fault", "scale-skipped"]}, default_name="t")
