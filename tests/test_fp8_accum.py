"""bench/fp8_accum.py on CPU: its Triton fp8 GEMM computes a @ b.T under the interpreter (which
accumulates in fp32, so every promotion interval lands within fp32 rounding of float64) -- the
kernel whose GPU errors are set beside `_scaled_mm`'s is a correct one."""

from __future__ import annotations

from bench_scripts import run_cpu


def test_every_promotion_interval_computes_the_product_on_cpu() -> None:
    r = run_cpu("fp8_accum.py")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.strip().startswith("triton")]
    assert len(rows) == 2 * 4  # two cases x (promote every 64 / 128 / 256, never)
    for row in rows:
        max_err, rms_err = float(row[-2]), float(row[-1])
        assert max_err < 1e-6 and rms_err < 1e-6, row
