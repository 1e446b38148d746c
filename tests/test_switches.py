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
