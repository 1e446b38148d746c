"""The 4-bit GEMM kernels never read past the end of their operands.

A load past a tensor's end usually reads a neighbour's bytes and changes nothing (a masked-off
lane's value is discarded), so no numeric test sees it -- until the allocator puts the tensor at
the end of a mapping and the GPU faults ("illegal memory access"), as the legacy mxfp4 kernel did
end to end on an H200: its tail K tile read the scales of groups past K. Here every operand is
copied so that its last byte is the last readable one, the next page mapped PROT_NONE, and the
kernels run under the Triton interpreter, which reads memory directly: a read past the end is a
SIGSEGV. The kernels run in a child process so that a fault fails the test instead of pytest.
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
# whose groups lie past K; M = 1 takes the GEMV paths, M = 3 the tiles
CASES = [("mxfp4", 3, 40, 72), ("mxfp4", 1, 40, 72), ("int4", 3, 40, 200), ("int4", 1, 40, 200)]


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


def run_child(impl: str) -> None:
    """Every case through `impl`'s kernels with guarded operands, checked against float64."""
    import torch

    from server_shim.quant import kernels as K

    K.KERNEL_IMPL = impl
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    for scheme, M, N, Kd in CASES:
        keep: list = []
        group = 32 if scheme == "mxfp4" else 128
        G = -(-Kd // group)
        x = torch.randn(M, Kd, generator=g).to(torch.bfloat16)
        q = torch.randint(0, 16, (N, Kd), dtype=torch.uint8, generator=g)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        per_k = torch.arange(Kd) // group
        if scheme == "mxfp4":
            e = torch.randint(120, 130, (N, G), dtype=torch.uint8, generator=g)
            sign = torch.where(q >= 8, -1.0, 1.0).double()
            w = e2m1[(q & 7).long()] * sign * torch.exp2(e.double() - 127)[:, per_k]
            out = K.mxfp4_gemm(
                guarded(x, keep), guarded(packed, keep), guarded(e, keep), out_dtype=torch.float32
            )
        else:
            s = torch.rand(N, G, generator=g) * 0.1 + 0.01
            z = torch.randint(0, 16, (N, G), dtype=torch.uint8, generator=g)
            w = (q.double() - z.double()[:, per_k]) * s.double()[:, per_k]
            out = K.int4_gemm(guarded(x, keep), guarded(packed, keep), guarded(s, keep), guarded(z, keep),
                              out_dtype=torch.float32)  # fmt: skip
        ref = x.double() @ w.T
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (scheme, M, err)  # bf16 rounding of the weight (or none): far below 1e-2
        print(f"{impl} {scheme} M={M} N={N} K={Kd}: ok (rel err {err:.1e})", flush=True)


@pytest.mark.parametrize("impl", ["legacy", "fast"])
def test_4bit_kernels_read_nothing_past_their_operands(impl: str) -> None:
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
