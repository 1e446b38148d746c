"""`difftest layers --json` and `difftest quant --json`: parseable results, exit codes, and the
JSON file in the -o folder (in-process tiny-llama shims behind the debug protocol)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from test_layers import build, shim_endpoint

from difftest.cli import build_parser, whitebox
from difftest.cli import layers as layers_cmd
from difftest.cli import quant as quant_cmd

FAULT_MODULE = "model.layers.1.mlp.up_proj"


async def _run(monkeypatch: Any, command: Any, args: argparse.Namespace) -> int:
    """The command over fresh in-process servers (the command closes its clients when done)."""
    bad = build(scheme="fp8-block", faults=[f"scale-skipped@{FAULT_MODULE}"])
    async with shim_endpoint("reference", build()) as r, shim_endpoint("target", bad) as t:
        eps = {"reference": r, "target": t}

        async def fake_connect(name: str, url: str, api_key: str | None, timeout_s: float = 0):  # noqa: ANN202
            return eps[name]

        monkeypatch.setattr(whitebox, "connect", fake_connect)
        monkeypatch.setattr(whitebox.asyncio, "run", lambda coro: coro)  # already inside a loop
        return await command.run(args)  # main() would wrap the coroutine in int()


async def test_layers_and_quant_json(monkeypatch, tmp_path: Path, capsys) -> None:
    parse = build_parser().parse_args
    argv = ["--ref", "http://r", "--target", "http://t", "--json"]
    layers_code = await _run(monkeypatch, layers_cmd, parse(["layers", *argv, "-o", str(tmp_path / "l")]))
    layers = json.loads(capsys.readouterr().out)
    quant_code = await _run(monkeypatch, quant_cmd, parse(["quant", *argv]))
    quant = json.loads(capsys.readouterr().out)
    assert layers_code == layers["exit_code"] == 1
    (diff,) = layers["diffs"]
    assert diff["target"] == "target" and diff["kind"] == "accuracy" and diff["failed"]
    assert diff["guilty_module"] == FAULT_MODULE and any(p["flagged"] for p in diff["points"])
    assert json.loads((tmp_path / "l" / "layers.json").read_text()) == layers
    assert quant_code == quant["exit_code"] == 1
    (audit,) = quant["audits"]
    flagged = [m for m in audit["modules"] if m.get("flagged")]
    assert audit["flagged"] and [m["module"] for m in flagged] == [FAULT_MODULE]
