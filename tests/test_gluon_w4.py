"""The Gluon 4-bit GEMM for M <= 16 ("wordsg", quant/_gluon_w4.py), which the interpreter cannot run.

What CI can check without a GPU: where it may run (an NVIDIA GPU from sm80 with Gluon, never the
interpreter or ROCm); which operands it takes; that a pinned "wordsg" config elsewhere runs the
plain-Triton "wordsb" kernel -- the same sums -- and matches float64; and that its configs
compile for sm90 without spills in the loop. It is in no tuner list (read from HBM, as a decode
step reads its weights, it was slower than "gemvf" and "wordsb"); on a GPU, `bench/wonly_sweep.py
--configs wordsg:...` and bench/fault_kernels_check.py check it against float64 before timing it.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import (see tests/test_kernels.py)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from test_kernels_fast import _spy_on, rel  # noqa: E402

from server_shim.quant import _gluon_w4, arch, tuning  # noqa: E402
from server_shim.quant import formats as F  # noqa: E402
from server_shim.quant import kernels as K  # noqa: E402

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
WORDSG = tuning.Cfg("wordsg", 16, 16, 128, 4, 1)
WORDSQ = tuning.Cfg("wordsq", 16, 16, 128, 4, 1)


def test_it_runs_only_on_nvidia_sm80_and_later_with_gluon(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("sm80", "sm89", "sm90", "sm100"):
        assert arch._gluon_mma(name) is _gluon_w4.IMPORTED, name
    for name in ("sm75", "sm70", "gfx942", "gfx950", "cpu"):
        assert not arch._gluon_mma(name), name
    monkeypatch.setattr(arch, "device_arch", lambda device: "sm90")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert arch.gluon_mma_w4("cuda") is _gluon_w4.IMPORTED
    monkeypatch.setenv("DIFFTEST_TRITON_GLUON", "0")  # the switch back to "wordsb" (and "tmap" for "wsp")
    assert not arch.gluon_mma_w4("cuda")
    monkeypatch.setenv("DIFFTEST_TRITON_GLUON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not arch.gluon_mma_w4("cuda")


def test_it_takes_only_operands_it_can_read() -> None:
    """16-bit x of at most 16 rows made of whole int32 pairs, the words' view, uint8 zero points
    for int4, and the group its scale indexing assumes (int4 128, mxfp4 32)."""
    x = torch.zeros(16, 256, dtype=torch.bfloat16)
    words = torch.zeros(8, 32, dtype=torch.int32)
    z8 = torch.zeros(8, 2, dtype=torch.uint8)
    if not _gluon_w4.IMPORTED:
        assert not _gluon_w4.runs(x, words, z8, 0, 128)
        pytest.skip("this triton has no Gluon")
    assert _gluon_w4.runs(x, words, z8, 0, 128) and _gluon_w4.runs(x.half(), words, z8, 1, 32)
    assert not _gluon_w4.runs(torch.zeros(17, 256, dtype=torch.bfloat16), words, z8, 0, 128)  # 17 rows
    assert not _gluon_w4.runs(x.float(), words, z8, 0, 128)  # fp32 x: no 16-bit MMA operand
    assert not _gluon_w4.runs(x, None, z8, 0, 128)  # no word view (K % 8, unaligned rows)
    assert not _gluon_w4.runs(x, words, z8.float(), 0, 128)  # float zero points
    assert _gluon_w4.runs(x, words, z8.float(), 1, 32)  # (mxfp4 has none)
    assert not _gluon_w4.runs(x, words, z8, 0, 64) and not _gluon_w4.runs(x, words, z8, 1, 128)
    odd = torch.zeros(16, 257, dtype=torch.bfloat16)
    assert not _gluon_w4.runs(odd[:, 1:], words, z8, 0, 128)  # rows of 257: not whole pairs, unaligned
    assert not _gluon_w4.runs(x.t().contiguous().t(), words, z8, 0, 128)  # column-major x


@pytest.mark.parametrize("cfg", [WORDSG, WORDSQ], ids=lambda c: c.path)
@pytest.mark.parametrize("scheme", ["int4-g128", "mxfp4"])
def test_pinned_where_gluon_cannot_run_it_is_wordsb(
    force, monkeypatch: pytest.MonkeyPatch, scheme: str, cfg: tuning.Cfg
) -> None:
    """Under the interpreter a pinned (or stored, or tuned: "wordsq" is in Hopper's M <= 16 list)
    Gluon config launches "wordsb" with its tile (16 rows, K steps of 128, a step per warp) and
    matches float64: M = 5, N = 40 (a partial row tile), K = 640 (one step of four warps past K), bias."""
    force(cfg)
    spies = _spy_on(monkeypatch, "wonly_wordsb", "wonly_words", "wonly_fused")
    g = torch.Generator().manual_seed(11)
    M, N, Kd = 5, 40, 640
    x = torch.randn(M, Kd, generator=g).to(torch.bfloat16)
    qw = F.quantize_weight(torch.randn(N, Kd, generator=g) * 0.02, scheme)
    bias = torch.randn(N, generator=g)
    scales = F.logical_scales(qw)
    if scheme == "int4-g128":
        out = K.int4_gemm(x, qw.data, scales, qw.zeros, out_dtype=torch.float32, bias=bias)
    else:
        out = K.mxfp4_gemm(x, qw.data, scales, out_dtype=torch.float32, bias=bias)
    assert {n: s.launches for n, s in spies.items()} == {
        "wonly_wordsb": 1,
        "wonly_words": 0,
        "wonly_fused": 0,
    }
    ref = x.double() @ F.dequantize(qw).double().T + bias.double()
    assert rel(out, ref) < 1e-6


@pytest.mark.skipif(not _gluon_w4.IMPORTED, reason="this triton has no Gluon")
def test_it_compiles_for_sm90_without_spills() -> None:
    """Every "wordsg" / "wordsq" config sm90_compile.py knows, int4-g128 and mxfp4 with bf16 and
    fp16 x, compiled for sm90 by this machine's triton and ptxas (the layout conversions it asserts trivial included)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "bench/sm90_compile.py", "--m", "16", "--only", "wordsg", "wordsq"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    rows = [line for line in r.stdout.splitlines() if " wordsg:" in line or " wordsq:" in line]
    # bench/sm90_compile.py's PINNED_ONLY ("wordsg", 16 and 32 columns) and Hopper's two "wordsq"
    listed = 4
    assert r.returncode == 0 and len(rows) == 4 * listed, r.stdout[-2000:] + r.stderr[-2000:]
    for stages in (1, 2):  # int4-g128, mxfp4; bf16, fp16 x
        assert sum(f" wordsq:16x16x128:w4:s{stages}:" in row for row in rows) == 4
    for row in rows:
        assert row.startswith("ok"), row
        if "no ptxas" not in row:
            assert "spill 0 B" in row, row


_ANATOMY_COMPILE = """
import sys, torch
sys.path.insert(0, "bench")
import sm90_compile as S
from server_shim.quant import _gluon_w4 as G
ptrs = {"x_ptr": "*i32", "w_ptr": "*i32", "c_ptr": "*bf16", "s_ptr": "*fp32", "z_ptr": "*u8", "bias_ptr": "*bf16"}
base = dict(FORMAT=0, BF16=True, HAS_BIAS=False, BLOCK_N=16, SUB=4, PLANES=G.planes_source(0, torch.bfloat16),
            EVEN_K=True)
for anatomy in (None, 0, 1, 2, 3):
    consts = base if anatomy is None else {**base, "ANATOMY": anatomy}
    print(anatomy, S.compile_one(G._wonly_wordsg_kernel, ptrs, consts, 4, 1, 16, div16={"N", "K", "sxm", "swn", "scm"}))
"""


@pytest.mark.skipif(not _gluon_w4.IMPORTED, reason="this triton has no Gluon")
def test_its_anatomy_switch_leaves_the_kernel_alone_and_keeps_the_math_in_the_loop() -> None:
    """bench/wordsb_anatomy.py times the Gluon tile with parts taken out (ANATOMY): 0 must compile
    to exactly the kernel the shim runs, and "nothing loaded in the loop" must keep its 16 MMAs
    (were they hoisted, that row would time an empty loop and claim the tile's arithmetic is free)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", _ANATOMY_COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    rows = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line[:1] in "N0123")
    assert r.returncode == 0 and len(rows) == 5, r.stdout[-2000:] + r.stderr[-2000:]
    if "no ptxas" in rows["0"]:
        pytest.skip("no ptxas for sm90 here")
    assert rows["0"] == rows["None"]
    for anatomy in ("0", "1", "2"):
        assert "mma 16" in rows[anatomy], rows[anatomy]
    assert "mma 0" in rows["3"], rows["3"]


def test_a_pinned_gluon_config_names_only_the_tile_it_runs() -> None:
    """The Gluon word kernels have fixed tiles: a pinned name with another size would silently run
    theirs, so it is refused where it is read."""
    assert tuning.Cfg.parse("wordsq:16x16x128:w4:s1:k1") == WORDSQ
    assert tuning.Cfg.parse("wordsg:16x32x128:w4:s1:k1").bn == 32  # "wordsg" takes 16 or 32 columns
    for name, why in (
        ("wordsq:16x32x128:w4:s1:k1", "wordsq tiles are 16x16x128 (BMxBNxBK), not 16x32x128"),
        ("wordsg:16x16x64:w4:s1:k1", "wordsg tiles are 16x16x128 (BMxBNxBK), not 16x16x64"),
        ("wordsq:32x16x128:w4:s1:k1", "wordsq tiles are 16x16x128 (BMxBNxBK), not 32x16x128"),
        ("wordsq:16x16x128:w4:s3:k1", "wordsq loads its operands 1 or 2 K steps ahead (s1, s2), not s3"),
    ):
        with pytest.raises(ValueError) as e:
            tuning.Cfg.parse(name)
        assert str(e.value) == why


def test_hopper_tunes_wordsq_at_m_up_to_16_only() -> None:
    two_ahead = tuning.Cfg("wordsq", 16, 16, 128, 4, 2)
    for m in (1, 8, 16):
        listed = tuning.candidates("hopper", "wonly", m, 4096, 4096)
        assert WORDSQ in listed and two_ahead in listed, m
    for m in (17, 64, 4096):
        assert all(c.path != "wordsq" for c in tuning.candidates("hopper", "wonly", m, 4096, 4096)), m
    assert all(c.path != "wordsq" for c in tuning.candidates("cdna", "wonly", 16, 4096, 4096))
