"""A real third-party engine: configs/external.toml runs `transformers serve` (transformers[serving])
beside the shim on the same smollm2 weights. Two servers of one model must PASS, with what
transformers serve cannot do (logprobs, echo, /tokenize, /debug) reported, never failed (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("transformers.cli.serving") is None
        or importlib.util.find_spec("fastapi") is None,
        reason="transformers[serving] is not installed (make setup installs it with the test extra)",
    ),
]


def test_transformers_serve_against_the_shim(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "difftest", "run", str(ROOT / "configs" / "external.toml"), "-o", str(out),
         "--limit", "3", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    (target,) = summary["targets"]
    assert target["name"] == "transformers-serve" and target["verdict"] == "PASS"
    report = json.loads((out / "report.json").read_text())
    (t,) = report["targets"]
    checks = {c[0]: c[1] for c in t["conformance"]["checks"]}
    # what transformers serve lacks, found by the probe and reported
    assert checks["logprobs cap"] == "fail" and checks["echo"] == "fail" and checks["/tokenize"] == "warn"
    assert checks["completions"] == "ok" and checks["greedy determinism"] == "ok"
    acc = next(c for c in t["comparisons"] if c["kind"] == "accuracy")
    text = json.dumps(report)
    assert "tokenized with shim's /tokenize" in text
    assert "teacher-forced metrics disabled" in text
    # two float32 servers of one model: the same greedy tokens (near-ties aside)
    assert acc["aggregate"]["token_match"] >= 0.9 and acc["aggregate"]["failed_requests"] == 0
    assert acc["aggregate"]["n_prompts"] == 3
