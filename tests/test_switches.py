"""The one reading rule of the environment's on/off switches (server_shim/switches.py)."""

from __future__ import annotations

import pytest

from server_shim.switches import env_switch


@pytest.mark.parametrize(
    ("value", "default", "want"),
    [(None, True, True), (None, False, False), ("0", True, False), (" Off ", True, False), ("false", True, False),
     ("no", True, False), ("1", False, True), ("ON", False, True), ("true", False, True), ("yes", False, True),
     ("", True, True), ("", False, False)],
)  # fmt: skip
def test_env_switch(value, default, want, monkeypatch) -> None:  # noqa: ANN001
    if value is None:
        monkeypatch.delenv("DIFFTEST_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("DIFFTEST_TEST_SWITCH", value)
    assert env_switch("DIFFTEST_TEST_SWITCH", default) is want


@pytest.mark.parametrize("value", ["2", "enabled", "of"])
def test_a_value_neither_on_nor_off_is_an_error_not_the_default(value, monkeypatch) -> None:  # noqa: ANN001
    from server_shim.switches import SwitchError, check_switches

    monkeypatch.setenv("DIFFTEST_TEST_SWITCH", value)
    with pytest.raises(SwitchError, match=f"DIFFTEST_TEST_SWITCH='{value}' is neither on"):
        env_switch("DIFFTEST_TEST_SWITCH", True)
    check_switches()  # not a switch the shim reads: no error
    monkeypatch.setenv("DIFFTEST_CK_FREE", value)
    with pytest.raises(SwitchError, match="DIFFTEST_CK_FREE"):
        check_switches()


def test_every_switch_the_shim_reads_is_checked() -> None:
    """SWITCHES lists every name passed to env_switch in server_shim (a new switch must join it)."""
    import re
    from pathlib import Path

    from server_shim.switches import SWITCHES

    root = Path(__file__).resolve().parents[1] / "server_shim"
    read: set[str] = set()
    for path in root.rglob("*.py"):
        text = path.read_text()
        consts = dict(re.findall(r'^([A-Z_]+) = "(DIFFTEST_[A-Z0-9_]+)"', text, re.M))
        read |= set(re.findall(r'env_switch\("(DIFFTEST_[A-Z0-9_]+)"', text))
        read |= {consts[c] for c in re.findall(r"env_switch\(([A-Z_]+),", text)}
    assert read == set(SWITCHES)


def test_every_variable_the_shim_reads_is_known() -> None:
    """KNOWN_VARIABLES holds every DIFFTEST_* name the shim reads: the config check refuses any other
    in a shim's `env` table, so a forgotten name there would refuse a good config."""
    import re
    from pathlib import Path

    from server_shim.switches import KNOWN_VARIABLES, unknown_variable_problem

    root = Path(__file__).resolve().parents[1] / "server_shim"
    named = {
        m for p in root.rglob("*.py") for m in re.findall(r'"(DIFFTEST_[A-Z0-9_]*[A-Z0-9])"', p.read_text())
    }
    assert named <= set(KNOWN_VARIABLES), named - set(KNOWN_VARIABLES)
    assert unknown_variable_problem("DIFFTEST_FUSED_NROM") == (
        "DIFFTEST_FUSED_NROM is no variable the shim reads; did you mean DIFFTEST_FUSED_NORM?"
    )
    assert unknown_variable_problem("PATH") is None and unknown_variable_problem("DIFFTEST_CK_FREE") is None


def test_switches_read_a_given_environment_not_the_process() -> None:
    from server_shim.switches import SwitchError, check_switches, env_choice, env_switch

    assert env_switch("DIFFTEST_CK_FREE", False, {"DIFFTEST_CK_FREE": "on"}) is True
    assert env_choice("DIFFTEST_TRITON_KERNELS", {"DIFFTEST_TRITON_KERNELS": "Legacy"}) == "legacy"
    with pytest.raises(SwitchError, match="DIFFTEST_TRITON_FACTORED_4BIT is no longer supported"):
        check_switches({"DIFFTEST_TRITON_FACTORED_4BIT": "1"})
