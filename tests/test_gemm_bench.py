"""bench/gemm.py --device cpu: its exactness checks under the interpreter (the activation quantizers
bit for bit; fp8 row and block scales with swapped strides and bias, normalized e4m3fnuz, int8),
run from a shell without TRITON_INTERPRET as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from bench_scripts import ROOT, run_cpu


def test_gemm_bench_checks_pass_on_cpu() -> None:
    r = run_cpu("gemm.py", "--workers", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = [line for line in r.stdout.splitlines() if line.startswith("check ")]
    assert len(checks) >= 10 and all(line.endswith(" ok") for line in checks), r.stdout
    for kind in ("bit-exact", "fp8 block, swapped strides", "fp8 row", "e4m3fnuz (normalized)", "int8,"):
        assert any(kind in line for line in checks), kind
    assert r.stdout.rstrip().endswith("all checks passed (no timing on CPU)")


def test_the_hbm_table_divides_by_bf16_timed_the_same_way(monkeypatch) -> None:  # noqa: ANN001
    """bf16 10 µs and int4 5 µs from HBM: 2.00x; a row without cold timings is left out."""
    import importlib.util

    from bench_scripts import ROOT

    monkeypatch.setenv("DIFFTEST_TRITON_TUNE_CACHE", "0")
    spec = importlib.util.spec_from_file_location("gemm_bench", ROOT / "bench" / "gemm.py")
    gemm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gemm)
    rows = [{"M": 16, "N": 64, "K": 32, "cold_ms": {"torch bf16": 0.010, "triton int4-g128": 0.005}},
            {"M": 4096, "N": 64, "K": 32, "ms": {}}]  # fmt: skip
    table = gemm.cold_markdown(rows).splitlines()
    assert table[-1] == "| 16 | 64 | 32 | 10.00 (1.00x) | 5.00 (2.00x) |"
    assert not any(line.startswith("| 4096") for line in table)
    assert gemm.cold_markdown(rows[1:]) == ""


def test_cold_timing_says_it_needs_a_gpu_and_exits_0_without_one() -> None:
    """bench/cold_timing.py on a machine without a GPU: one line, exit status 0 (like gluon_mm8)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would time")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cold_timing.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "needs a CUDA or ROCm GPU" in done.stdout


def test_mm8_sweep_checks_pinned_split_tiles_on_cpu() -> None:
    """bench/mm8_sweep.py --device cpu: each pinned config (here a split that sums itself) checked
    against float64 under the interpreter; a name that is no config is one line and exit status 2."""
    r = run_cpu("mm8_sweep.py", "--m", "16", "--configs", "tile:16x32x128:w4:s1:k2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ok   fp8 block M=16" in r.stdout and r.stdout.rstrip().endswith("all checks passed")
    bad = run_cpu("mm8_sweep.py", "--configs", "tile:16x32")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a triton config name" in bad.stderr
