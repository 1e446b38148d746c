"""bench/gemm.py --device cpu: its exactness checks under the interpreter (the activation quantizers
bit for bit; fp8 row and block scales with swapped strides and bias, normalized e4m3fnuz, int8),
run from a shell without TRITON_INTERPRET as a user runs it."""

from __future__ import annotations

from bench_scripts import run_cpu


def test_gemm_bench_checks_pass_on_cpu() -> None:
    r = run_cpu("gemm.py", "--workers", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    checks = [line for line in r.stdout.splitlines() if line.startswith("check ")]
    assert len(checks) >= 10 and all(line.endswith(" ok") for line in checks), r.stdout
    for kind in ("bit-exact", "fp8 block, swapped strides", "fp8 row", "e4m3fnuz (normalized)", "int8,"):
        assert any(kind in line for line in checks), kind
    assert r.stdout.rstrip().endswith("all checks passed (no timing on CPU)")
