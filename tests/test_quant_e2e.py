"""bench/quant_e2e.py on the CPU (Triton interpreter): the smoke run its GPU numbers come from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from server_shim.quant import tuning

ROOT = Path(__file__).resolve().parents[1]


def test_quant_e2e_reports_the_configs_each_triton_gemm_ran(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "DIFFTEST_TRITON_TUNE_CACHE": "0"}
    cmd = [sys.executable, str(ROOT / "bench" / "quant_e2e.py"), "--device", "cpu", "--model", "tiny-llama",
           "--dtype", "float32", "--batches", "1", "--tokens", "2", "--schemes", "int8", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["scheme"], r["impl"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("none", "-"), ("int8", "legacy"), ("int8", "fast")}
    configs = rows[("int8", "fast")]["triton_configs"]
    # tiny-llama's linears: at least its attention and MLP shapes, each an int8 "mm8" key (the
    # prompt's prefill) or, for the batch-1 decode steps, an "mm8q" one (act-quant inside the GEMV)
    assert all("|mm8|torch.int8|" in key or "|mm8q|torch.float32|torch.int8|" in key for key in configs)
    assert sum("|mm8|" in key for key in configs) >= 2 and sum("|mm8q|" in key for key in configs) >= 2
    for choice in configs.values():
        tuning.Cfg.parse(choice["config"])  # a real config name, not a placeholder
        assert choice["tuned_us"] is None  # the interpreter times nothing
    assert "triton_configs" not in rows[("int8", "legacy")]  # the legacy kernels autotune by themselves
    assert rows[("int8", "fast")]["b1_tok_s"] > 0
