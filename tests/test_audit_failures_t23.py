"""A module the audit could not measure is not the target's fault (tester t23): a reference whose
/debug/module answered 500 made `difftest quant` flag every module of a clean target, so a negative
control passed the gate (exit 0) beside "nothing audited"; a reference of another model (HTTP 404
for each module) made a clean target exit 1."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from difftest.cli import quant as quant_cmd
from difftest.cli.layers import expected_code
from difftest.errors import RequestRejected, ServerError
from difftest.whitebox import audit as audit_mod

MODULES = {"m.q": {"scheme": "int8", "scale_shape": [4, 1]}, "m.k": {"scheme": "int8", "scale_shape": [4, 1]}}


def _endpoint(name: str) -> Any:
    async def debug_config() -> dict[str, Any]:
        return {"modules": MODULES}

    return SimpleNamespace(name=name, client=SimpleNamespace(name=name, debug_config=debug_config))


def _raising(exc: Exception):  # noqa: ANN202
    async def audit_module(*_: Any) -> dict[str, Any]:
        raise exc

    return audit_module


@pytest.mark.parametrize(
    ("exc", "failure", "flagged"),
    [
        (ServerError("ref: POST /debug/module failed: HTTP 500: boom", server="ref", status_code=500), "infrastructure", False),
        (ServerError("tgt: GET /debug/quant timed out", server="tgt"), "infrastructure", False),
        (RequestRejected("ref: no module named 'm.q'", server="ref", status_code=404, reason="HTTP 404"), "refused", False),
        (RequestRejected("tgt: refused", server="tgt", status_code=400, reason="HTTP 400"), None, True),
        (KeyError("scale"), None, True),  # the target's unreadable /debug/quant: its module flagged
    ],
)  # fmt: skip
async def test_who_failed_decides_whether_the_module_is_flagged(monkeypatch, exc, failure, flagged) -> None:  # noqa: ANN001
    monkeypatch.setattr(audit_mod, "audit_module", _raising(exc))
    rows = await audit_mod.audit(_endpoint("tgt"), _endpoint("ref"))
    assert [r["flagged"] for r in rows] == [flagged, flagged]
    assert [r.get("failure") for r in rows] == [failure, failure]
    assert all(not quant_cmd.audited(r) for r in rows)


@pytest.mark.parametrize(
    ("failure", "expect", "code"),
    [
        ("infrastructure", "fail", 3),
        ("infrastructure", "pass", 3),
        ("refused", "fail", 2),
        ("refused", "pass", 2),
    ],
)
def test_a_failed_audit_is_the_servers_or_the_requests_never_a_found_fault(
    failure: str, expect: str, code: int
) -> None:
    rows = [
        {"module": "m.q", "flagged": False, "audited": False, "failure": failure, "notes": ["not audited: x"]}
    ]
    bad = any(r.get("flagged") for r in rows)
    open_code = quant_cmd.FAILURE_EXIT.get(quant_cmd._worst_failure(rows), 0)
    assert expected_code(expect, bad, open_code) == code  # a control with nothing measured was 0
    assert (
        quant_cmd.failed_audits(rows)
        == "1 of 1 modules not audited (the target not blamed): m.q: not audited: x"
    )
    line = quant_cmd.control_line("t", bad, [], False, 1)
    assert "undecided: 1 modules could not be audited" in line and "as expected" not in line
    assert quant_cmd._worst_failure(rows + [{"failure": "infrastructure"}]) == "infrastructure"
