"""bench/wordsr_w4.py without a GPU: the tile whose warps share x compiles for sm90 with its operand
layouts asserted free and nothing spilled, in both formats and 16-bit dtypes; which settings fit
which shapes; and the timing mode's one-line answers where it cannot run (the float64 check runs on
a GPU only: Gluon kernels do not run under the Triton interpreter)."""

from __future__ import annotations

import os

# before any triton import: the module under test imports the kernels, and a triton imported
# compiled would break every interpreter test collected after this file (tests/test_kernels.py)
os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import wordsr_w4  # noqa: E402


@pytest.mark.skipif(not wordsr_w4.IMPORTED, reason="this triton has no Gluon")
def test_it_compiles_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "bench/wordsr_w4.py", "--compile"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if "no ptxas" in r.stdout:
        pytest.skip("this triton build ships no ptxas")
    rows = [line for line in r.stdout.splitlines() if " G 4 split 4: " in line]
    assert [line.split()[:2] for line in rows] == [
        ["int4-g128", "bfloat16"], ["int4-g128", "float16"], ["mxfp4", "bfloat16"], ["mxfp4", "float16"],
    ]  # fmt: skip
    # 16 MMAs a K step (two n8 tiles x eight k16), no shared memory beyond the split's barrier
    assert all(" spill 0 B " in line and "mma 16" in line for line in rows), rows


def test_which_settings_fit_which_shapes() -> None:
    assert wordsr_w4.fits(16, 4096, 4096, 4, 8) is None
    assert wordsr_w4.fits(5, 1000, 4224, 4, 3) is None  # a ragged N: the last program masked
    assert wordsr_w4.fits(17, 4096, 4096, 4, 1) == "M = 17 > 16"
    assert wordsr_w4.fits(16, 4096, 4224, 4, 2) == "K = 4224 is not 2 splits of whole 128-wide K steps"


def test_the_timing_mode_says_why_it_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert wordsr_w4.main(["--splits", "0"]) == 2
    assert capsys.readouterr().err.strip() == "--splits: every split count is at least 1"
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the bench would run")
    assert wordsr_w4.main([]) == 0
    assert "needs an NVIDIA GPU (sm80+)" in capsys.readouterr().err


def test_the_experiments_check_fails_a_wrong_or_unsteady_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/_gemm_cases.check_then_time, which wordsr and wordsw pass before any timing: an answer
    off the reference, or one that changes between two runs, is a FAIL line and no timing."""
    import _gemm_cases as C

    ref = torch.ones(8, dtype=torch.float64)
    out = torch.empty(8)
    assert C.check_then_time("off", lambda: out.fill_(1.5), out, ref, 4e-3) is None
    runs = iter([1.0, 1.0 + 2**-20])  # both within tolerance, not the same bits
    assert C.check_then_time("unsteady", lambda: out.fill_(next(runs)), out, ref, 4e-3) is None
    assert capsys.readouterr().out.splitlines() == [
        "FAIL off: rel err 5.0e-01, same bits twice: True",
        "FAIL unsteady: rel err 0.0e+00, same bits twice: False",
    ]
