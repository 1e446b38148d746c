"""`difftest run` as a user runs it: a subprocess that launches real shim servers (slow).

- configs/ci-small.toml (tiny-llama): correct fp8-block passes, the negative control fails, exit 0;
- a fault injected into one module of smollm2-135m: FAIL, and the white-box replay names it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def difftest(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "difftest", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_ci_small_config_passes_its_gate(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = difftest("run", str(ROOT / "configs" / "ci-small.toml"), "-o", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    verdicts = {t["name"]: t["verdict"] for t in report["targets"]}
    assert set(verdicts) == {"fp8-block", "fp8-block-skipped"}
    assert "gate PASS" in proc.stdout
    skipped = next(t for t in report["targets"] if t["name"] == "fp8-block-skipped")
    assert any("scales look skipped" in (d.get("summary") or "") for d in skipped["layers"])
    # the batch-slot check is judged against three draws of the golden's own slot variance
    # (twice the golden, once its twin), each reported; the limit is the worst of them
    for t in report["targets"]:
        inv = t["invariance"]
        assert inv["baseline"] == "fp8-block-golden" and inv["baseline_draws"] == 3
        assert len(inv["baseline_draw_worst"]) == len(inv["baseline_draw_flips"]) == 3
        assert inv["baseline_worst"] == max(inv["baseline_draw_worst"])
    for name in ("report.md", "report.html", "junit.xml"):
        assert (out / name).stat().st_size > 0


def test_fault_in_one_smollm2_module_is_failed_and_named(tmp_path: Path) -> None:
    module = "model.layers.3.mlp.down_proj"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": t}) + "\n"
            for i, t in enumerate(["The capital of France is", "def add(a, b):\n    return", "1, 2, 3, 4,"])
        )
    )
    cfg = tmp_path / "fault.toml"
    cfg.write_text(
        f"""
[run]
prompts = ["{prompts}"]
max_tokens = 6
concurrency = 3
output_dir = "{tmp_path / "out"}"
batch_slot_check = false

[reference]
name = "fp32"
model = "smollm2-135m"
dtype = "float32"
device = "cpu"

[[target]]
name = "fp8-block-skipped"
model = "smollm2-135m"
dtype = "float32"
device = "cpu"
quant = "fp8-block"
faults = ["scale-skipped@{module}"]
golden = "auto"
expect = "fail"
"""
    )
    proc = difftest("run", str(cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (target,) = json.loads((tmp_path / "out" / "report.json").read_text())["targets"]
    exact = next(d for d in target["layers"] if d["kind"] == "exactness")
    assert exact["guilty_module"] == module
    assert module in (target["verdict"]["localisation"] or "")
