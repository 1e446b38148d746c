"""The warpgroup-MMA int4 tile ("wordsw", quant/_gluon_w4w.py): an experiment that only
bench/wordsw.py runs (on a Hopper GPU, against float64). What CI can check without a GPU: which
operands it takes, and that it compiles for sm90 -- its register operand's layout conversion
asserted free, no spills -- in both 16-bit dtypes."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import (see tests/test_kernels.py)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from server_shim.quant import _gluon_w4w  # noqa: E402
from server_shim.quant import formats as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_it_takes_only_operands_its_descriptors_and_sums_fit() -> None:
    x = torch.randn(16, 256).to(torch.bfloat16)
    qw = F.quantize_weight(torch.randn(64, 256), "int4-g128")
    words = qw.data.view(torch.int32)
    assert _gluon_w4w.runs(x, words, qw.zeros, 0, 128) is _gluon_w4w.IMPORTED
    assert not _gluon_w4w.runs(x, words, qw.zeros, 1, 32)  # mxfp4
    assert not _gluon_w4w.runs(x, words, qw.zeros, 0, 64)  # a group that is not one K step
    assert not _gluon_w4w.runs(x, None, qw.zeros, 0, 128)  # no int32 word view
    assert not _gluon_w4w.runs(x, words, qw.zeros.float(), 0, 128)  # zero points not uint8
    assert not _gluon_w4w.runs(torch.randn(17, 256).to(torch.bfloat16), words, qw.zeros, 0, 128)  # M > 16
    assert not _gluon_w4w.runs(x.float(), words, qw.zeros, 0, 128)  # fp32 x
    assert not _gluon_w4w.runs(torch.randn(16, 192).to(torch.bfloat16), words, qw.zeros, 0, 128)  # K % 128
    assert not _gluon_w4w.runs(
        torch.randn(256, 16).to(torch.bfloat16).t(), words, qw.zeros, 0, 128
    )  # K-strided x
    odd = torch.randn(16, 257).to(torch.bfloat16)[:, 1:]  # rows not 16-byte aligned
    assert not _gluon_w4w.runs(odd, words, qw.zeros, 0, 128)


_COMPILE = """
import sys, torch
sys.path.insert(0, "bench")
import sm90_compile as S
from server_shim.quant import _gluon_w4w as W
ptrs = {"c_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "bias_ptr": "*bf16"}
for dt, anatomy in ((torch.bfloat16, 0), (torch.float16, 0), (torch.bfloat16, 3)):  # 3: bench/wordsw.py --anatomy
    bf16 = dt == torch.bfloat16
    consts = dict(BF16=bf16, HAS_BIAS=not bf16, STEPS=8, SPLIT=4, DQ=W.dequant_ptx(bf16), ANATOMY=anatomy)
    desc = {"x_desc": W.descriptor_type("x", dt), "w_desc": W.descriptor_type("w", dt)}
    print(dt, S.compile_one(W._wonly_wordsw_kernel, ptrs, consts, 4, 1, 16, desc, div16={"N", "K", "K_PER", "scm"}))
"""


@pytest.mark.skipif(not _gluon_w4w.IMPORTED, reason="this triton has no Gluon")
def test_it_compiles_for_sm90_without_spills() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    rows = [line for line in r.stdout.splitlines() if line.startswith("torch.")]
    assert r.returncode == 0 and len(rows) == 3, r.stdout[-2000:] + r.stderr[-2000:]
    for row in rows:
        if "no ptxas" not in row:
            assert "spill 0 B" in row, row


def test_its_bench_says_where_it_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/wordsw.py on a machine without a Hopper GPU: a one-line reason and exit status 0."""
    sys.path.insert(0, str(ROOT / "bench"))
    import wordsw

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the bench would run")
    assert wordsw.main([]) == 0
    assert "needs a Hopper GPU" in capsys.readouterr().err
