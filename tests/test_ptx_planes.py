"""The 4-bit word tiles' inline PTX, which CI cannot run on a GPU: its strings executed by
tests/ptx_emu.py against the formats' own decoding (every nibble / code, zero point and scale
exponent, fp16 and bf16), and the kernels that embed it compiled for sm90 by ptxas."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import (see tests/test_kernels.py)

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import ptx_emu  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from bench_scripts import run_cpu  # noqa: E402

from server_shim.quant import _fast_w4 as w4  # noqa: E402
from server_shim.quant import _triton_fast as fast  # noqa: E402
from server_shim.quant import formats as F  # noqa: E402
from server_shim.quant import kernels as K  # noqa: E402

triton = pytest.importorskip("triton")
tl = triton.language
ROOT = Path(__file__).resolve().parents[1]
HALF = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _pairs_kernel(z_ptr, e_ptr, nz_ptr, f1_ptr, f2_ptr, N: tl.constexpr, DT: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(nz_ptr + o, w4._int4_zero_pairs(tl.load(z_ptr + o), DT))
    f1, f2 = w4._mx_scale_pairs(tl.load(e_ptr + o), DT)
    tl.store(f1_ptr + o, f1)
    tl.store(f2_ptr + o, f2)


def _operands(dtype: torch.dtype) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Zero points 0..15 and e8m0 codes 0..255 with the kernel's own $9 / $10 operands for them."""
    K._build()  # decorates the helpers the kernel calls
    z = torch.arange(256, dtype=torch.uint8) % 16
    e = torch.arange(256, dtype=torch.int32)
    nz, f1, f2 = (torch.empty(256, dtype=torch.int32) for _ in range(3))
    triton.jit(_pairs_kernel)[(1,)](z, e, nz, f1, f2, N=256, DT=HALF[dtype])
    return z.tolist(), e.tolist(), nz.tolist(), f1.tolist(), f2.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_planes_are_q_minus_z(dtype: torch.dtype) -> None:
    asm = fast.planes_ptx(bf16=dtype == torch.bfloat16)
    z, _, nz, _, _ = _operands(dtype)
    g = torch.Generator().manual_seed(5)
    words = [0x76543210, 0xFEDCBA98, 0x0F0F0F0F, 0xF0F0F0F0] + torch.randint(
        0, 2**32, (28,), generator=g
    ).tolist()
    for i, word in enumerate(words):
        for zi in (i % 16, 0, 15):
            got = ptx_emu.as_half(ptx_emu.run(asm, {8: word, 9: nz[zi]}, 8), dtype).double()
            want = torch.tensor([((word >> (4 * j)) & 15) - z[zi] for j in range(8)], dtype=torch.float64)
            assert torch.equal(got, want), (hex(word), zi, got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mxfp4_planes_are_the_scaled_codes(dtype: torch.dtype) -> None:
    """Every code in every nibble position, every scale exponent: bit for bit the exact value
    e2m1 * 2**(e - 127) cast to x's dtype (fp16: overflow to inf, subnormals rounded once) -- but
    e = 255 (NaN) in fp16, which the kernel does not represent (it never occurs: quantize_weight's
    scales are finite)."""
    asm = fast.mx_planes_ptx(bf16=dtype == torch.bfloat16)
    _, e, _, f1, f2 = _operands(dtype)
    words = [
        0x76543210,
        0xFEDCBA98,
        0x1A2B3C4D,
        0x0F870F87,
        0xF078F078,
        0x9E8F0716,
    ]  # signs: same, alternating, mixed
    for code in e[: 255 if dtype == torch.float16 else 256]:
        scale = F.e8m0_decode(torch.tensor([code], dtype=torch.uint8)).double()
        for word in words:
            got = ptx_emu.as_half(ptx_emu.run(asm, {8: word, 9: f1[code], 10: f2[code]}, 8), dtype)
            codes = torch.tensor([(word >> (4 * j)) & 15 for j in range(8)], dtype=torch.uint8)
            want = (F.e2m1_decode(codes).double() * scale).to(dtype)
            same = torch.equal(got.view(torch.int16), want.view(torch.int16)) or (
                torch.isnan(want).all() and torch.isnan(got).all()
            )
            assert same, (code, hex(word), got, want)


def test_gemvf_widens_both_fp16_halves_exactly() -> None:
    """gemvf's mxfp4 route on NVIDIA: a register holding two codes' values as fp16 (magnitude at
    bits 9..11, sign at 15: e2m1 * 2**-14, the subnormal 0.5 * 2**-14 included) widened to two fp32
    by `F16_PAIR_TO_F32`, for every pair of codes: bit for bit what the plain casts give."""
    asm = fast.F16_PAIR_PTX
    codes = torch.arange(16, dtype=torch.uint8)
    want = (F.e2m1_decode(codes).double() * 2.0**-14).float()
    for a in range(16):
        for b in range(16):
            enc = [((q & 7) << 9) | ((q & 8) << 12) for q in (a, b)]
            lo, hi = ptx_emu.run(asm, {2: enc[0] | (enc[1] << 16)}, 2)
            got = torch.tensor([lo, hi], dtype=torch.int64).to(torch.int32).view(torch.float32)
            assert torch.equal(got.view(torch.int32), want[[a, b]].view(torch.int32)), (a, b, got)


def _sm90_compile(*args: str) -> subprocess.CompletedProcess:
    """bench/sm90_compile.py with `args` (compiled, never interpreted); skips where triton has no ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "bench/sm90_compile.py", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    if "no ptxas" in r.stdout:
        pytest.skip("this triton build ships no ptxas")
    return r


def test_word_tiles_compile_for_sm90() -> None:
    """ptxas (shipped in the triton wheel) assembles the word tiles' PTX for fp16 and bf16 x."""
    r = _sm90_compile("--m", "16", "--only", "words")
    assert r.returncode == 0 and "0 failed in all" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    for label in ("int4-g128", "mxfp4", "int4 fp16", "mxfp4 fp16"):
        assert f"ok   {label:10} M=16" in r.stdout, label


def test_sm90_compile_takes_named_configs() -> None:
    """`--configs` compiles exactly the named configs, listed in a tuner list or not (a 32-wide split
    "wordsb" is in none), for the schemes whose dispatch has their path; a name that is not one is
    exit status 2 with a one-line message."""
    r = _sm90_compile("--m", "16", "--configs", "wordsb:16x32x128:w4:s3:k2")
    assert r.returncode == 0 and "0 failed in all" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("ok   ")]
    assert len(rows) == 4 and all("wordsb:16x32x128:w4:s3:k2" in row for row in rows), (
        rows
    )  # 2 schemes x 2 dtypes
    assert "decode-attn" not in r.stdout  # named configs only
    bad = _sm90_compile("--configs", "wordsb:16x32")
    assert bad.returncode == 2 and "not a triton config name" in bad.stderr and "Traceback" not in bad.stderr


def test_the_inline_ptx_is_chosen_only_where_it_runs() -> None:
    """NVIDIA only, with the packed 16-bit fma of x's dtype (bf16x2 from sm80, fp16x2 from sm53):
    never ROCm, the CPU interpreter or fp32 x, which take the plain-Triton planes."""
    from server_shim.quant.arch import _packed_half_ptx

    assert _packed_half_ptx("sm90", torch.bfloat16) and _packed_half_ptx("sm80", torch.bfloat16)
    assert _packed_half_ptx("sm100", torch.float16) and _packed_half_ptx("sm75", torch.float16)
    assert not _packed_half_ptx("sm75", torch.bfloat16)
    assert not _packed_half_ptx("sm90", torch.float32)
    assert not _packed_half_ptx("gfx942", torch.bfloat16) and not _packed_half_ptx("cpu", torch.float16)


def test_word_tiles_check_runs_on_cpu() -> None:
    """bench/word_tiles_check.py's float64 checks pass under the interpreter (the GPU run is the same
    script with the PTX planes)."""
    r = run_cpu("word_tiles_check.py")
    assert r.returncode == 0 and "all match float64" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("ok   ") == 36 and "FAIL" not in r.stdout  # 2 dtypes x 6 configs x 3 shape-schemes


def test_the_ptx_switch_turns_the_inline_ptx_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """DIFFTEST_TRITON_PTX=0 sends an NVIDIA GPU to the plain-Triton planes; any other value than an
    on / off word stops the build (never read as the default)."""
    from types import SimpleNamespace

    from server_shim.quant import _fastpath, arch
    from server_shim.switches import SwitchError

    asked: list[tuple[str, torch.dtype]] = []
    monkeypatch.setattr(arch, "packed_half_ptx", lambda device, dtype: asked.append((device, dtype)) or True)
    _fastpath._packed_half_ptx_of.cache_clear()  # as on an H200, from here
    cuda = torch.device("cuda:0")
    assert _fastpath.ptx_planes(SimpleNamespace(ptx=True, interp=False), cuda, torch.bfloat16)
    assert not _fastpath.ptx_planes(SimpleNamespace(ptx=False, interp=False), cuda, torch.bfloat16)
    assert not _fastpath.ptx_planes(SimpleNamespace(ptx=True, interp=True), cuda, torch.bfloat16)
    assert not _fastpath.ptx_planes(
        SimpleNamespace(ptx=True, interp=False), torch.device("cpu"), torch.bfloat16
    )
    # the device's properties are read once per device and dtype, not on every launch
    assert _fastpath.ptx_planes(SimpleNamespace(ptx=True, interp=False), cuda, torch.bfloat16)
    assert asked == [("cuda:0", torch.bfloat16)]
    _fastpath._packed_half_ptx_of.cache_clear()  # no fake answer left behind for other tests
    for value, want in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv("DIFFTEST_TRITON_PTX", value)
        monkeypatch.setattr(K, "_built", None)
        assert K._build().ptx is want, value
    monkeypatch.setenv("DIFFTEST_TRITON_PTX", "nvidia")
    monkeypatch.setattr(K, "_built", None)
    with pytest.raises(SwitchError, match="DIFFTEST_TRITON_PTX"):
        K._build()
