"""bench/fault_kernels_check.py on CPU: its verdicts are the ones the GPU run gives (every fault of a
scheme reproduced by the pinned fast kernels, one line each), and a bad argument is a one-line error."""

from __future__ import annotations

import subprocess

import pytest
from bench_scripts import run_cpu


def _check(*args: str) -> subprocess.CompletedProcess:
    return run_cpu("fault_kernels_check.py", *args)


@pytest.mark.slow
def test_every_int4_fault_reproduces_in_the_pinned_kernels() -> None:
    r = _check("--schemes", "int4-g128")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    # 5 int4 faults (garbage, transposed, shuffle-ignored, skipped, transpose-noop) x 2 configs
    assert len(rows) == 10 and all(line.startswith("ok") and line.endswith("shown") for line in rows)
    assert {"gemvf:1x1x256:w2:s1:k1", "wordsk:16x32x128:w2:s4:k2"} == {line.split()[4] for line in rows}
    assert r.stdout.rstrip().endswith("10/10 reproduce")


def test_an_unknown_scheme_is_a_one_line_error() -> None:
    r = _check("--schemes", "int3")
    assert r.returncode == 2 and "ok " not in r.stdout
    assert r.stderr.strip().splitlines() == [
        "fault_kernels_check: unknown scheme 'int3' (known: fp8-tensor fp8-token fp8-block int8 int4-g128 mxfp4)"
    ]
