"""The quantized GEMM kernels never read past the end of their operands.

A load past a tensor's end usually reads a neighbour's bytes and changes nothing (a masked-off
lane's value is discarded), so no numeric test sees it -- until the allocator puts the tensor at
the end of a mapping and the GPU faults ("illegal memory access"), as the legacy mxfp4 kernel did
end to end on an H200: its tail K tile read the scales of groups past K. Here every operand is
copied so that its last byte is the last readable one, the next page mapped PROT_NONE, and the
kernels run under the Triton interpreter, which reads memory directly: a read past the end is a
SIGSEGV. The kernels run in a child process so that a fault fails the test instead of pytest;
the references are tests/test_kernels.py's (float64, written apart from the kernels).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (scheme, M, N, K): K not a multiple of the kernels' K tiles, so the tail tile has masked k
# whose groups lie past K; M = 1 takes the GEMV paths, M = 3 the tiles. "fp8-block-colmajor": the
# weight's block scales stored column-major (a transposed view, as DeepSeek checkpoints and the MoE
# experts' stacked scales hold them), so the last element in memory is not the last row's; the
# 4-bit "-colmajor" cases read their group scales (and zeros) the same way, as the last expert of
# an MoE stack with a col-major layout does.
SCHEMES = ("mxfp4", "mxfp4-colmajor", "int4", "int4-colmajor", "fp8-block", "fp8-block-colmajor", "int8")
CASES = [(scheme, m, 300, 72 if scheme.startswith("mxfp4") else 200) for scheme in SCHEMES for m in (3, 1)]


def guarded(t, keep: list):  # noqa: ANN001, ANN201 - torch is imported in the child only
    """A contiguous copy of `t` that ends exactly where a PROT_NONE page begins."""
    import torch

    page = mmap.PAGESIZE
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // page) + 1
    buf = mmap.mmap(-1, pages * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(base + (pages - 1) * page), ctypes.c_size_t(page), 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    keep.append(buf)
    start = (pages - 1) * page - nbytes
    raw = torch.frombuffer(buf, dtype=torch.uint8)[start : start + nbytes]
    out = raw.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def guarded_scales(scheme: str, s, keep: list):  # noqa: ANN001, ANN201
    """`s` guarded as stored: row-major, or ("-colmajor") a transposed view of its guarded
    transpose, so that its last byte in memory is that of its last group, not of its last row."""
    return guarded(s.T.contiguous(), keep).T if scheme.endswith("colmajor") else guarded(s, keep)


def four_bit(scheme: str, x, q, group: int, g, keep: list):  # noqa: ANN001, ANN201
    """(kernel output, float64 reference) of a 4-bit weight-only GEMM with guarded operands."""
    import torch
    from test_kernels import E2M1, expand, pack_nibbles

    from server_shim.quant import kernels as K

    N, Kd = q.shape
    G = -(-Kd // group)
    packed = pack_nibbles(q)
    if scheme.startswith("mxfp4"):
        e = torch.randint(120, 130, (N, G), dtype=torch.uint8, generator=g)
        sign = torch.where(q >= 8, -1.0, 1.0).double()
        w = E2M1[(q & 7).long()] * sign * expand(torch.exp2(e.double() - 127), N, Kd, 1, group)
        out = K.mxfp4_gemm(guarded(x, keep), guarded(packed, keep), guarded_scales(scheme, e, keep),
                           out_dtype=torch.float32)  # fmt: skip
    else:
        s = torch.rand(N, G, generator=g) * 0.1 + 0.01
        z = torch.randint(0, 16, (N, G), dtype=torch.uint8, generator=g)
        w = (q.double() - expand(z, N, Kd, 1, group)) * expand(s, N, Kd, 1, group)
        out = K.int4_gemm(guarded(x, keep), guarded(packed, keep), guarded_scales(scheme, s, keep),
                          guarded_scales(scheme, z, keep), out_dtype=torch.float32)  # fmt: skip
    return out, x.double() @ w.T


def eight_bit(scheme: str, M: int, N: int, Kd: int, g, keep: list):  # noqa: ANN001, ANN201
    """(kernel output, float64 reference) of a block-scaled fp8 or per-row int8 GEMM, guarded."""
    import torch
    from test_kernels import expand

    from server_shim.quant import kernels as K

    if scheme == "int8":
        a = torch.randint(-127, 128, (M, Kd), dtype=torch.int8, generator=g)
        b = torch.randint(-127, 128, (N, Kd), dtype=torch.int8, generator=g)
        sa, sb = torch.rand(M, 1, generator=g) + 0.5, torch.rand(N, 1, generator=g) + 0.5
        out = K.int8_gemm(guarded(a, keep), guarded(sa, keep), guarded(b, keep), guarded(sb, keep),
                          out_dtype=torch.float32)  # fmt: skip
        return out, (a.double() * sa.double()) @ (b.double() * sb.double()).T
    G = -(-Kd // 128)
    a = torch.randn(M, Kd, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(N, Kd, generator=g).to(torch.float8_e4m3fn)
    sa = torch.rand(M, G, generator=g) + 0.5
    sb = torch.rand(-(-N // 128), G, generator=g) + 0.5
    sb_arg = guarded_scales(scheme, sb, keep)
    out = K.fp8_gemm(guarded(a, keep), guarded(sa, keep), guarded(b, keep), sb_arg,
                     a_scale_mode="block", b_scale_mode="block", out_dtype=torch.float32)  # fmt: skip
    return out, (a.double() * expand(sa, M, Kd, 1, 128)) @ (b.double() * expand(sb, N, Kd, 128, 128)).T


def run_child(impl: str) -> None:
    """Every case through `impl`'s kernels with guarded operands, checked against float64."""
    import torch

    from server_shim.quant import kernels as K

    K.KERNEL_IMPL = impl
    g = torch.Generator().manual_seed(5)
    for scheme, M, N, Kd in CASES:
        keep: list = []
        if scheme.startswith(("mxfp4", "int4")):
            x = torch.randn(M, Kd, generator=g).to(torch.bfloat16)
            q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
            out, ref = four_bit(scheme, x, q, 32 if scheme.startswith("mxfp4") else 128, g, keep)
        else:
            out, ref = eight_bit(scheme, M, N, Kd, g, keep)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (scheme, M, err)  # bf16 rounding of a 4-bit weight (or none): far below 1e-2
        print(f"{impl} {scheme} M={M} N={N} K={Kd}: ok (rel err {err:.1e})", flush=True)


@pytest.mark.parametrize("impl", ["legacy", "fast"])
def test_quantized_kernels_read_nothing_past_their_operands(impl: str) -> None:
    pytest.importorskip("triton")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    r = subprocess.run([sys.executable, __file__, impl], capture_output=True, text=True, env=env, timeout=600,
                       cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, (
        f"exit {r.returncode} (-11: a read past an operand's end)\n{r.stdout}\n{r.stderr[-3000:]}"
    )
    assert r.stdout.count(": ok") == len(CASES), r.stdout


if __name__ == "__main__":
    run_child(sys.argv[1])
