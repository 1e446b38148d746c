"""The one reading rule of the environment's on/off switches (server_shim/switches.py)."""

from __future__ import annotations

import pytest

from server_shim.switches import env_switch


@pytest.mark.parametrize(
    ("value", "default", "want"),
    [(None, True, True), (None, False, False), ("0", True, False), (" Off ", True, False), ("false", True, False),
     ("no", True, False), ("1", False, True), ("ON", False, True), ("true", False, True), ("yes", False, True),
     ("", True, True), ("", False, False), ("2", True, True), ("2", False, False)],
)  # fmt: skip
def test_env_switch(value, default, want, monkeypatch) -> None:  # noqa: ANN001
    if value is None:
        monkeypatch.delenv("DIFFTEST_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("DIFFTEST_TEST_SWITCH", value)
    assert env_switch("DIFFTEST_TEST_SWITCH", default) is want
