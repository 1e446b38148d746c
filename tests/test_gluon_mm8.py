"""The warp-specialized Gluon fp8 GEMM ("wsp", quant/_gluon_mm8.py), which the interpreter cannot run.

What CI can check without a GPU: where it may run (sm90 with Gluon, never the interpreter, ROCm or
another generation); that a pinned "wsp" config elsewhere runs the plain-Triton "tmap" kernel with
the same numbers; and that the kernel compiles for sm90 with no spills and unserialized MMAs
(ptxas serializes every MMA when a partial is read while the next step's MMAs run -- the variant
this kernel avoids). On a GPU, bench/gluon_mm8.py checks it against float64 and bit for bit
against "tmap" before timing it.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import (see tests/test_kernels.py)

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from test_kernels_fast import _spy_on, expand, fp8_data, rel  # noqa: E402

from server_shim.quant import _fastpath, _gluon_mm8, arch, tuning  # noqa: E402
from server_shim.quant import kernels as K  # noqa: E402
from server_shim.switches import SwitchError  # noqa: E402

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
WSP = tuning.Cfg("wsp", 128, 128, 128, 4, 4)
FN = torch.float8_e4m3fn


def test_it_runs_only_on_sm90_with_gluon(monkeypatch: pytest.MonkeyPatch) -> None:
    assert arch._sm90_gluon("sm90") is _gluon_mm8.IMPORTED
    monkeypatch.setattr(arch, "device_arch", lambda device: "sm90")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert arch.warp_specialized_fp8("cuda") is _gluon_mm8.IMPORTED
    monkeypatch.setenv("DIFFTEST_TRITON_GLUON", "0")  # the switch back to "tmap"
    assert not arch.warp_specialized_fp8("cuda")
    monkeypatch.setenv("DIFFTEST_TRITON_GLUON", "off")  # read like every switch: "off" is off, not ignored
    assert not arch.warp_specialized_fp8("cuda")
    monkeypatch.setenv("DIFFTEST_TRITON_GLUON", "nope")
    with pytest.raises(SwitchError, match="DIFFTEST_TRITON_GLUON"):
        arch.warp_specialized_fp8("cuda")
    monkeypatch.undo()
    for name in ("sm80", "sm89", "sm100", "gfx942", "gfx950", "cpu"):
        assert not arch._sm90_gluon(name), name
    assert not arch.warp_specialized_fp8("cpu")


def test_it_is_offered_only_for_exact_fp8_it_can_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a device that can run it: fp8 e4m3fn with exact accumulation, block groups of 128, a float
    out -- not int8, fast accumulation, e4m3fnuz, other groups or an int out; never on this CPU."""
    a = torch.zeros(4, 128, dtype=FN)
    out = torch.zeros(4, 4, dtype=torch.bfloat16)
    ok = dict(blocked=False, group=128, acc_int=False, fast_acc=False)
    assert not _fastpath._wsp_ok(a, out, **ok)  # this machine
    monkeypatch.setattr(_fastpath, "_warp_specialized_of", lambda device_key: True)  # as on an H200
    assert _fastpath._wsp_ok(a, out, **ok) and _fastpath._wsp_ok(a, out, **{**ok, "blocked": True})
    assert _fastpath._wsp_ok(a, out.float(), **ok) and _fastpath._wsp_ok(a, out.half(), **ok)
    for bad in (dict(acc_int=True), dict(fast_acc=True), dict(blocked=True, group=64)):
        assert not _fastpath._wsp_ok(a, out, **{**ok, **bad}), bad
    assert not _fastpath._wsp_ok(a.to(torch.float8_e4m3fnuz), out, **ok)
    assert not _fastpath._wsp_ok(a, out.to(torch.int32), **ok)
    wsp = [c for c in tuning.candidates("hopper", "mm8", 4096, 4096, 4096) if c.path == "wsp"]
    assert wsp and all((c.bm, c.bk, c.warps) == (128, 128, 4) and c.bn in (128, 256) for c in wsp)
    assert {c.bn for c in wsp} == {128, 256}


@pytest.mark.parametrize("mode", ["tensor", "row", "block"])
def test_pinned_where_gluon_cannot_run_it_is_tmap(force, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Under the interpreter a pinned (or stored) "wsp" config launches the persistent "tmap"
    kernel -- the same sums -- and matches float64 (M = 37, N = 136: partial tiles; bias)."""
    if _fastpath._descriptor_type() is None:
        pytest.skip("this triton has no host tensor descriptors")
    force(WSP)
    spies = _spy_on(monkeypatch, "mm8_tma", "mm8_tmap", "mm8")
    g = torch.Generator().manual_seed(7)
    M, N, Kd = 37, 136, 256
    a, b = fp8_data((M, Kd), FN, 8), fp8_data((N, Kd), FN, 9)
    if mode == "tensor":
        sa, sb = torch.tensor([0.02]), torch.tensor([0.03])
        ea, eb = sa.double(), sb.double()
    elif mode == "row":
        sa, sb = torch.rand(M, 1, generator=g) + 0.01, torch.rand(N, 1, generator=g) + 0.01
        ea, eb = sa.double(), sb.double()
    else:
        sa, sb = torch.rand(M, 2, generator=g) + 0.01, torch.rand(2, 2, generator=g) + 0.01
        ea, eb = expand(sa, M, Kd, 1, 128), expand(sb, N, Kd, 128, 128)
    bias = torch.randn(N, generator=g)
    out = K.fp8_gemm(a, sa, b, sb, a_scale_mode=mode, b_scale_mode=mode, out_dtype=torch.float32, bias=bias)
    assert {n: s.launches for n, s in spies.items()} == {"mm8_tma": 0, "mm8_tmap": 1, "mm8": 0}
    ref = (a.double() * ea) @ (b.double() * eb).T + bias.double()
    assert rel(out, ref) < 1e-6


@pytest.mark.skipif(not _gluon_mm8.IMPORTED, reason="this triton has no Gluon")
@pytest.mark.parametrize("bulk_store", ["0", "1"])
def test_it_compiles_for_sm90_without_spills_or_serialized_mmas(bulk_store: str) -> None:
    """Every "wsp" candidate, fp8 tensor and block scales, compiled for sm90 by this machine's
    triton and ptxas, storing from the registers and by bulk copies (DIFFTEST_TRITON_BULK_STORE):
    it must compile, spill nothing and keep its MMAs pipelined."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFTEST_TRITON_BULK_STORE": bulk_store}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "bench/sm90_compile.py", "--m", "4096", "--only", "wsp"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    rows = [line for line in r.stdout.splitlines() if " wsp:" in line]
    assert r.returncode == 0 and rows, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(rows) == 2 * sum(c.path == "wsp" for c in tuning.candidates("hopper", "mm8", 4096, 4096, 4096))
    for row in rows:
        assert row.startswith("ok"), row
        if "no ptxas" not in row:
            assert re.search(r"spill 0 B", row) and "wgmma-serialized" not in row, row


def test_its_benchmark_says_it_needs_a_hopper_and_exits_0_here() -> None:
    """`make bench` runs bench/gluon_mm8.py on every machine: without an sm90 GPU it must say so
    and succeed, not fail the target."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "bench/gluon_mm8.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "needs an sm90 GPU" in r.stdout


@pytest.mark.skipif(not _gluon_mm8.IMPORTED, reason="this triton has no Gluon")
def test_the_bulk_store_takes_the_shared_memory_the_stages_leave() -> None:
    """Output pieces (64 x 128, both consumers') staged for the bulk-copy store, worked by hand from
    227 KiB = 232448 B less 1024 for barriers: a 128 x 256 stage is 384 x 128 = 49152 B, a 128 x 128
    one 32768 B; the pieces of both consumers 2 x 64 x 128 x 2 B = 32768 B in bf16."""
    ob = _gluon_mm8.out_buffers
    assert ob(0, 0, 4, 256, 2) == 1  # 232448 - 1024 - 4 x 49152 = 34816: one piece, not two (65536)
    assert ob(0, 0, 3, 256, 2) == 2  # 83968 left: a piece per 128 columns
    assert ob(1, 1, 5, 128, 2) == 1  # 67584 left; a 128-column tile has one piece
    assert ob(0, 0, 6, 128, 2) == 1  # 34816 left
    assert ob(0, 0, 4, 256, 4) == 0  # fp32 pieces of 65536 B do not fit: stores from the registers
    assert ob(2, 2, 3, 256, 2) == 0  # block scales on 256 columns: no registers to spare
    assert ob(2, 2, 6, 128, 2) == 1


def test_the_bulk_store_needs_a_row_major_aligned_float_output() -> None:
    storable = _gluon_mm8._bulk_storable
    assert storable(torch.zeros(64, 256, dtype=torch.bfloat16))
    assert storable(torch.zeros(64, 256, dtype=torch.float32))
    assert not storable(torch.zeros(256, 64, dtype=torch.bfloat16).T)  # column-major
    assert not storable(torch.zeros(64, 9, dtype=torch.bfloat16)[:, :8])  # rows 18 B apart
    assert not storable(torch.zeros(64, 256, dtype=torch.int32))


def test_the_bulk_store_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, the switch leaves the default (on: checked bit for bit on a GPU); off, or declined by
    the caller, the launch stages no pieces; a bad value is an error, not the default."""
    monkeypatch.delenv("DIFFTEST_TRITON_BULK_STORE", raising=False)
    assert _gluon_mm8.BULK_STORE is True
    assert _gluon_mm8.launch_buffers(0, 0, 3, 256, 2, None) == 2
    assert _gluon_mm8.launch_buffers(0, 0, 3, 256, 2, False) == 0
    monkeypatch.setenv("DIFFTEST_TRITON_BULK_STORE", "off")
    assert _gluon_mm8.launch_buffers(0, 0, 3, 256, 2, None) == 0
    assert _gluon_mm8.launch_buffers(0, 0, 3, 256, 2, True) == 2
    monkeypatch.setenv("DIFFTEST_TRITON_BULK_STORE", "maybe")
    with pytest.raises(SwitchError, match="DIFFTEST_TRITON_BULK_STORE"):
        _gluon_mm8.launch_buffers(0, 0, 3, 256, 2, None)
