"""Compile the fast GEMM kernels for Hopper (sm90) on a machine without a GPU, before a GPU run.

    python bench/sm90_compile.py [--m 1 16 32 4096] [--only gemv fused] [--attention] [--configs NAME ...]

First the fused decode kernels (server_shim/fused_kernels.py: decode attention at SmolLM2's and
an MLA model's head shapes, RMSNorm, rotary at SmolLM2's and a Llama-8B's heads; fp16 and bf16;
`--attention`: only these), then the GEMMs.

For every Hopper candidate config in quant/tuning.py (N = K = 4096; fp8 tensor and block, int8
row, int4-g128 and mxfp4 with bf16 activations) this compiles the kernel the config selects down
to a cubin (Triton's own ptxas), with the specializations the JIT would make on a GPU (16-byte
aligned pointers, strides of 1, M = 1), and prints registers, spills, shared memory and ptxas's
"wgmma serialized" warnings, and the static SASS instruction count (conversions, MMAs) as a
rough proxy of the unpacking cost. A config that does not compile is a FAIL row and exit status 1: the
lowering errors a GPU run could only report, found at no GPU time. Register counts and the
warnings are those of this machine's Triton, which may differ from the GPU's.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, never interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from server_shim.quant import _fastpath, _gluon_mm8, _gluon_w4, tuning  # noqa: E402
from server_shim.quant import kernels as K  # noqa: E402

ONES = {"sak", "sbk", "sxk", "swk", "scn", "sas1", "sbs1", "ssg", "szg"}  # unit strides: JIT constexprs
DIV16 = {"N", "K", "K_PER", "sam", "sbn", "scm", "sxm", "swn"}  # multiples of 16 at N = K = 4096
# (name, kind, pointer types, fixed constexprs)
P8 = {
    "a_ptr": "*fp8e4nv",
    "b_ptr": "*fp8e4nv",
    "c_ptr": "*bf16",
    "as_ptr": "*fp32",
    "bs_ptr": "*fp32",
    "cnt_ptr": "*i32",
}
P4 = {
    "x_ptr": "*bf16",
    "w_ptr": "*u8",
    "c_ptr": "*bf16",
    "z_ptr": "*u8",
    "ws_ptr": "*fp32",
    "cnt_ptr": "*i32",
}
VARIANTS = [
    ("fp8 tensor", "mm8", P8, dict(A_MODE=0, B_MODE=0, GROUP=128, ACC_INT=False)),
    ("fp8 block", "mm8", P8, dict(A_MODE=2, B_MODE=2, GROUP=128, ACC_INT=False)),
    ("int8 row", "mm8", {**P8, "a_ptr": "*i8", "b_ptr": "*i8"}, dict(A_MODE=1, B_MODE=1, GROUP=128, ACC_INT=True)),
    # one token, the activation quantized inside the GEMV (_fastpath.mm8_act): its GEMV configs only
    ("int8 act", "mm8", {**P8, "a_ptr": "*bf16", "b_ptr": "*i8"},
     dict(A_MODE=1, B_MODE=1, GROUP=128, ACC_INT=True, QUANT_A=True, QMAX=127.0, AMAX_FLOOR=1e-12)),
    ("fp8 blk act", "mm8", {**P8, "a_ptr": "*bf16"},
     dict(A_MODE=2, B_MODE=2, GROUP=128, ACC_INT=False, QUANT_A=True, QMAX=448.0, AMAX_FLOOR=1e-12)),
    ("int4-g128", "wonly", {**P4, "s_ptr": "*fp32"}, dict(FORMAT=0, GROUP=128)),
    ("mxfp4", "wonly", {**P4, "s_ptr": "*u8"}, dict(FORMAT=1, GROUP=32)),
    # fp16 x (the shim's models): its own inline PTX in the int32-word tiles ("words" / "wordsk")
    ("int4 fp16", "wonly", {**P4, "x_ptr": "*fp16", "c_ptr": "*fp16", "s_ptr": "*fp32"}, dict(FORMAT=0, GROUP=128)),
    ("mxfp4 fp16", "wonly", {**P4, "x_ptr": "*fp16", "c_ptr": "*fp16", "s_ptr": "*u8"}, dict(FORMAT=1, GROUP=32)),
]  # fmt: skip


def kernel_and_consts(k, kind: str, cfg: tuning.Cfg, fixed: dict, m: int) -> tuple[object, dict]:
    """The kernel `cfg` launches and its constexprs, as _fastpath.py passes them."""
    split = cfg.split > 1
    if fixed.get("QUANT_A") and (cfg.path != "gemv" or m != 1):
        return None, {}  # the fused act-quant exists as a one-token GEMV only
    if kind == "mm8" and cfg.path == "wsp":  # Gluon; fp8 with exact accumulation only (_fastpath._wsp_ok)
        if fixed["ACC_INT"] or not _gluon_mm8.IMPORTED:
            return None, {}
        am, bmode = fixed["A_MODE"], fixed["B_MODE"]
        cbuf = _gluon_mm8.launch_buffers(am, bmode, cfg.stages, cfg.bn, 2, None)  # a bf16 out, as launched
        return _gluon_mm8._mm8_wsp_kernel, dict(PROGRAMS=132, GROUP_M=cfg.group_m, STAGES=cfg.stages, A_MODE=am,
                                                B_MODE=bmode, HAS_BIAS=False, CBUF=cbuf,
                                                **({} if cbuf else {"c_desc": None}))  # fmt: skip
    if kind == "wonly" and cfg.path in GLUON_W4:  # main() types x as int32 pairs, the zero points uint8
        if not _gluon_w4.IMPORTED or _gluon_w4.GROUPS[fixed["FORMAT"]] != fixed["GROUP"]:
            return None, {}
        x = torch.float16 if fixed.get("X_DTYPE") == "fp16" else torch.bfloat16
        fn = _gluon_w4._wonly_wordsg_kernel if cfg.path == "wordsg" else _gluon_w4._wonly_wordsq_kernel
        return fn, dict(
            FORMAT=fixed["FORMAT"], BF16=x == torch.bfloat16, HAS_BIAS=False, BLOCK_N=cfg.bn, SUB=cfg.warps,
            PLANES=_gluon_w4.planes_source(fixed["FORMAT"], x), EVEN_K=True,
            **({"PF": cfg.stages} if cfg.path == "wordsq" else {}),  # operands 1 or 2 steps ahead
        )  # fmt: skip
    if kind == "mm8":
        bk = min(cfg.bk, fixed["GROUP"]) if fixed["A_MODE"] == 2 else cfg.bk
        common = dict(
            fixed, HAS_BIAS=False, DECODE=0, SPLIT_OUT=split, EVEN_K=True, BLOCK_N=cfg.bn, BLOCK_K=bk
        )
        if cfg.path == "gemv":
            return k.gemv8, common
        if cfg.path in ("tma", "tmap"):  # operands through descriptors (main() types them); no split
            tma = dict(fixed, HAS_BIAS=False, FAST_ACC=False, BLOCK_M=cfg.bm, BLOCK_N=cfg.bn, BLOCK_K=bk,
                       GROUP_M=cfg.group_m, PROMOTE=min(bk, 128))  # fmt: skip
            if cfg.path == "tmap":  # persistent: an H200's 132 programs
                return k.mm8_tmap, dict(tma, PROGRAMS=132)
            return k.mm8_tma, tma
        if cfg.path == "lag" and fixed["ACC_INT"]:
            return None, {}  # int8 never runs "lag" configs (_fastpath.mm8 drops them)
        return k.mm8, dict(
            common,
            FAST_ACC=False,
            BLOCK_M=cfg.bm,
            GROUP_M=cfg.group_m,
            PROMOTE=min(bk, 128),
            LAG=cfg.path == "lag",
            SPLIT_FIN=split,
        )
    common = dict(fixed, HAS_BIAS=False, EVEN_K=True, BLOCK_N=cfg.bn, BLOCK_K=cfg.bk)
    if cfg.path == "gemv":
        return k.gemv4, dict(common, EMULATE_RNE=False, SPLIT_OUT=split)
    if cfg.path in _fastpath.WORD_GEMVS:  # main() gives it int32 words
        kern = _fastpath.gemv4_kernel(k, cfg.path)
        # bf16 x, aligned; mxfp4's halves widened by inline PTX, as on an NVIDIA GPU
        extra = {"FACTORED": True, "X_PAIRS": True, "PTX": True} if cfg.path == "gemvf" else {}
        return kern, dict(
            common, BLOCK_K=max(cfg.bk, fixed["GROUP"]), EMULATE_RNE=False, SPLIT_OUT=split, **extra
        )
    if cfg.path == "gemvg":
        return k.gemv4g, dict(common, BLOCK_K=max(cfg.bk, fixed["GROUP"]), EMULATE_RNE=False, SPLIT_OUT=split)
    if cfg.path == "deqb":  # its GEMM is torch.mm; its tiles are the dequantization kernel's
        return k.deq, dict(FORMAT=fixed["FORMAT"], GROUP=fixed["GROUP"], EMULATE_RNE=False, BLOCK_N=cfg.bn,
                           BLOCK_K=cfg.bk)  # fmt: skip
    if cfg.path == "deq":  # the GEMM half (main() gives it bf16 operands); the dequantization pass is fixed
        return k.mm16, dict(HAS_BIAS=False, DOT_IEEE=False, EVEN_K=True, BLOCK_M=cfg.bm, BLOCK_N=cfg.bn,
                            BLOCK_K=cfg.bk, GROUP_M=cfg.group_m)  # fmt: skip
    if cfg.path in _fastpath.WORD_PATHS and not _fastpath.words_tile(cfg, fixed["FORMAT"], fixed["GROUP"]):
        return None, {}  # a tile the words do not fit: _fastpath runs it as "fused" (compiled there)
    return _fastpath.wonly_tile_kernel(k, cfg.path), dict(
        common, DOT_IEEE=False, EMULATE_RNE=False, SPLIT_OUT=split, BLOCK_M=cfg.bm, GROUP_M=cfg.group_m,
        SPLIT_FIN=split and cfg.path in _fastpath.SELF_REDUCING,
        **({"PTX": True} if cfg.path in _fastpath.WORD_PATHS else {}),  # fp16 / bf16 x on sm90
        **({"SUB": cfg.k_steps} if cfg.path == "wordsb" else {}),  # a K step per warp
    )  # fmt: skip


def sass_text(cubin: Path) -> str:
    """The cubin's SASS (cuobjdump); empty when cuobjdump is missing or fails."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    try:
        r = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout


def loop_ops(sass: str) -> Counter[str]:
    """The opcodes of the last loop in the SASS (the body between a backward branch and its target,
    predicates dropped): a kernel's K loop, where its per-step cost is."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)]
    body: list[str] = []
    for addr, text in ins:
        back = re.search(r"BRA\s.*?(0x[0-9a-f]+)", text)
        if back and int(back.group(1), 16) < addr:
            lo = int(back.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
    return Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)


def sass_ops(cubin: Path, keep: list[str] | None = None) -> str:
    """The static SASS instruction count and the integer / conversion / MMA share, a rough proxy of
    the unpacking cost; empty without cuobjdump. keep: the SASS text is appended to it."""
    text = sass_text(cubin)
    if keep is not None:
        keep.append(text)
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text)
    if not ops:
        return ""
    conv = sum(o in ("F2F", "I2F", "F2I", "I2FP", "F2FP") for o in ops)
    mma = sum(o.startswith(("HMMA", "HGMMA", "QGMMA", "IGMMA", "IMMA", "WGMMA")) for o in ops)
    # shared memory: what a tile stages (cp.async LDGSTS, stores) and reads back (LDS, ldmatrix)
    smem = sum(o.startswith(("LDS", "STS", "LDGSTS")) for o in ops)
    return f" sass {len(ops)} (cvt {conv}, mma {mma}, smem {smem})"


def compile_one(
    fn, ptrs: dict, consts: dict, warps: int, stages: int, m: int, scalars: dict | None = None,
    div16: set | None = None, options: dict | None = None, sass: list[str] | None = None,
) -> str:  # fmt: skip
    """Compile for sm90; ptxas's register / spill line and its wgmma warnings, or raise.
    scalars: non-pointer arguments that are not i32 (name -> type); div16: arguments the JIT would
    see as multiples of 16 (default DIV16); options: more compile options, as the launch passes them;
    sass: the cubin's SASS is appended to it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    consts = dict(consts)
    for param in fn.params:  # a constexpr left at its default: the JIT specializes on that value too
        if param.is_constexpr and param.name not in consts and param.default is not inspect.Parameter.empty:
            consts[param.name] = param.default
    for n in names:
        if n in ONES or (n == "M" and m == 1):
            consts[n] = 1
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            default = (
                "*bf16" if n == "bias_ptr" else "*i32" if n == "ws_ptr" and consts.get("ACC_INT") else "*fp32"
            )
            sig[n] = ptrs.get(n, default)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = (scalars or {}).get(n, "i32")
            if n in (DIV16 if div16 is None else div16):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource
    if _gluon_mm8.IMPORTED:
        from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

        if isinstance(fn, GluonJITFunction):
            source = GluonASTSource
    src = source(fn, sig, {(names.index(n),): v for n, v in consts.items()}, attrs)
    ck = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 128),
        options={"num_warps": warps, "num_stages": stages, **(options or {})},
    )
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((p for p in (bindir / "ptxas-blackwell", bindir / "ptxas") if p.exists()), None)
    if ptxas is None:
        return f"smem {ck.metadata.shared} (no ptxas for details)"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(ck.asm["ptx"])
        r = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        ops = sass_ops(Path(d) / "k.cubin", sass) if r.returncode == 0 else ""
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    serial = " wgmma-serialized" if "C7514" in r.stderr else ""
    return (f"regs {regs.group(1) if regs else '?'} spill {spill.group(1) if spill else '?'} B "
            f"smem {ck.metadata.shared}{serial}{ops}")  # fmt: skip


def attention_variants() -> list[tuple[str, dict, dict, set]]:
    """fused_kernels.decode_attention at SmolLM2-135M's shapes (9 query / 3 kv heads, dim 64) and
    tiny-moe's MLA (dims 48 / 32), fp16 and bf16; the strides as the slot cache gives them."""
    out = []
    for dt in ("fp16", "bf16"):
        ptrs = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "o_ptr": f"*{dt}", "pos_ptr": "*i64"}
        for label, dqk, dv, group in (("smollm2", 64, 64, 3), ("mla", 48, 32, 1)):
            bdk, bdv = 1 << (max(dqk, 16) - 1).bit_length(), 1 << (max(dv, 16) - 1).bit_length()
            consts = dict(GROUP=group, D_QK=dqk, D_V=dv, BLOCK_DK=bdk, BLOCK_DV=bdv,
                          BLOCK_N=max(16, min(64, 4096 // max(bdk, bdv))), sqd=1, skd=1, svd=1, sod=1)  # fmt: skip
            div16 = {"sqb", "sqh", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "kv_len"}
            out.append((f"{label} {dt}", ptrs, consts, div16))
    return out


def compile_attention() -> int:
    """Compile the fused decode attention kernel for sm90; the number of failures."""
    from server_shim import fused_kernels

    fn = fused_kernels._build().attn
    fails = 0
    for label, ptrs, consts, div16 in attention_variants():
        t0 = time.time()
        try:
            info = compile_one(fn, ptrs, consts, 4, 1, 0, scalars={"scale": "fp32"}, div16=div16)
            print(f"ok   decode-attn {label:14} {info} ({time.time() - t0:.1f} s)", flush=True)
        except Exception as e:  # the row says what failed; the exit status says that one did
            fails += 1
            msg = str(e).strip().splitlines()
            print(f"FAIL decode-attn {label:14} {type(e).__name__}: {msg[0] if msg else ''}")
    for dt in ("fp16", "bf16"):
        t0 = time.time()
        try:
            ptrs = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "o_ptr": f"*{dt}"}
            consts = {"BLOCK": 1024}  # SmolLM2's hidden 576
            info = compile_one(fused_kernels._build().rmsnorm, ptrs, consts, 4, 1, 0, scalars={"eps": "fp32"},
                               div16={"sx", "so", "N"})  # fmt: skip
            print(f"ok   rmsnorm     {dt:14} {info} ({time.time() - t0:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001
            fails += 1
            msg = str(e).strip().splitlines()
            print(f"FAIL rmsnorm     {dt:14} {type(e).__name__}: {msg[0] if msg else ''}")
    for label, ptrs, consts, div16 in rotary_variants():
        t0 = time.time()
        try:
            info = compile_one(
                fused_kernels._build().rotary,
                ptrs,
                consts,
                consts.pop("warps"),
                1,
                0,
                div16=div16,
                options={"enable_fp_fusion": False},  # as fused_kernels.rotary launches it
            )
            print(f"ok   rotary      {label:14} {info} ({time.time() - t0:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001
            fails += 1
            msg = str(e).strip().splitlines()
            print(f"FAIL rotary      {label:14} {type(e).__name__}: {msg[0] if msg else ''}")
    return fails


def rotary_variants() -> list[tuple[str, dict, dict, set]]:
    """fused_kernels.rotary at a decode step (T = 1, a constexpr to the JIT) for SmolLM2-135M's heads
    (9 q + 3 k, dim 64) and a Llama-3-8B's (32 + 8, dim 128), fp16 and bf16; the strides of the
    attention forward's transposed views (unit last-dim strides: constexprs to the JIT)."""
    out = []
    for dt in ("fp16", "bf16"):
        ptrs = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "cos_ptr", "sin_ptr")}
        for label, hq, hk, d in (("smollm2", 9, 3, 64), ("llama8b", 32, 8, 128)):
            half = d // 2
            bhalf = 1 << (half - 1).bit_length()
            block_h = min(1 << (hq + hk - 1).bit_length(), max(1, 2048 // bhalf))
            consts = dict(HALF=half, BLOCK_H=block_h, BLOCK_HALF=bhalf, T=1, sqd=1, skd=1, sod=1, spd=1,
                          scd=1, ssd=1, warps=4 if block_h * bhalf >= 1024 else 1)  # fmt: skip
            div16 = {"sqb", "sqh", "sqt", "skb", "skh", "skt", "sob", "soh", "sot", "spb", "sph", "spt",
                     "scb", "sct", "ssb", "sst"}  # fmt: skip
            out.append((f"{label} {dt}", ptrs, consts, div16))
    return out


# the config paths each GEMM kind dispatches (`--configs` compiles a name for the kinds that have its path)
PATHS_OF = {
    "mm8": frozenset(("tile", "lag", "tma", "tmap", "gemv", "quant2", "wsp")),
    "wonly": frozenset(("tile", "tilek", "deq", "deqb", "fused", "fusedk", "words", "wordsk", "wordsb", "gemv",
                        "gemvg", "gemvw", "gemvx", "gemvr", "gemvf", "wordsg", "wordsq")),
}  # fmt: skip
GLUON_W4 = ("wordsg", "wordsq")  # the Gluon 4-bit kernels of quant/_gluon_w4.py
# configs in no tuner list that can still be pinned (bench/wonly_sweep.py --configs): compiled as well
PINNED_ONLY = {"wonly": (tuning.Cfg("wordsg", 16, 16, 128, 4, 1), tuning.Cfg("wordsg", 16, 32, 128, 4, 1))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--m", type=int, nargs="+", default=[1, 16, 32, 4096], help="M values (default 1 16 32 4096)"
    )
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="only these config paths (tile lag tma tmap wsp gemv gemvg gemvw gemvx gemvr gemvf fused fusedk words wordsk wordsb wordsg wordsq tilek deq deqb)",
    )
    ap.add_argument(
        "--attention", action="store_true", help="only the fused decode kernels (attention, RMSNorm, rotary)"
    )
    ap.add_argument(
        "--configs", nargs="+", default=None, metavar="NAME",
        help="only these configs by name (tuning.Cfg.name, e.g. wordsb:16x32x128:w4:s3:k2), listed or not",
    )  # fmt: skip
    args = ap.parse_args()
    try:
        pinned = [tuning.Cfg.parse(n) for n in args.configs or ()]
    except ValueError as e:
        print(f"sm90_compile: {e}", file=sys.stderr)
        return 2
    fails = 0
    if not pinned:
        fails = compile_attention()
        print(
            f"fused decode: {len(attention_variants())} attention + 2 RMSNorm + {len(rotary_variants())} rotary"
            f" variants compiled for sm90, {fails} failed"
        )
    if args.attention:
        return 1 if fails else 0
    k = K._build()
    seen: set = set()
    for label, kind, ptrs, fixed in VARIANTS:
        for m in args.m:
            if pinned:  # a config names no kind: compiled for the kinds whose dispatch has its path
                cands = [c for c in pinned if m <= c.bm and c.path in PATHS_OF[kind]]
            else:
                cands = tuning.candidates("hopper", kind, m, 4096, 4096)
                cands += [c for c in PINNED_ONLY.get(kind, ()) if m <= c.bm]
            for cfg in cands:
                if args.only and cfg.path not in args.only:
                    continue
                if "fp16" in label and cfg.path not in (*_fastpath.WORD_PATHS, *GLUON_W4):
                    continue  # fp16 x changes only the word tiles' code (their PTX)
                x16 = {"X_DTYPE": "fp16" if "fp16" in label else "bf16"} if cfg.path in GLUON_W4 else {}
                fn, consts = kernel_and_consts(k, kind, cfg, {**fixed, **x16}, m)
                if fn is None:
                    continue
                cptrs = ptrs  # this config's pointer types (the variant's, unless its kernel differs)
                if cfg.path in _fastpath.WORD_GEMVS + _fastpath.WORD_PATHS:
                    cptrs = {**ptrs, "w_ptr": "*i32"}
                if cfg.path == "deqb":
                    cptrs = {**ptrs, "o_ptr": "*bf16"}
                if cfg.path in GLUON_W4:  # x as int32 pairs, the words int32, int4's zero points uint8
                    cptrs = {
                        **ptrs,
                        "x_ptr": "*i32",
                        "w_ptr": "*i32",
                        "z_ptr": "*u8",
                        "bias_ptr": ptrs["c_ptr"],
                    }
                if cfg.path == "deq":
                    cptrs = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16"}
                scalars = None
                options = None
                if cfg.path == "wsp":  # Gluon descriptors carry their shared-memory layout
                    scalars = {
                        "a_desc": _gluon_mm8.descriptor_type("a", cfg.bn),
                        "b_desc": _gluon_mm8.descriptor_type("b", cfg.bn),
                        "c_desc": _gluon_mm8.descriptor_type("c", cfg.bn),  # unused where c_desc is None
                    }
                    options = {"maxnreg": _gluon_mm8.MAXNREG}
                if cfg.path in ("tma", "tmap"):  # the descriptors' types: element type and block shape
                    el, bk = ptrs["a_ptr"][1:], consts["BLOCK_K"]
                    scalars = {"a_desc": f"tensordesc<{el}[{cfg.bm}, {bk}]>",
                               "b_desc": f"tensordesc<{el}[{cfg.bn}, {bk}]>",
                               "c_desc": f"tensordesc<bf16[{cfg.bm}, {cfg.bn}]>"}  # fmt: skip
                key = (
                    fn,
                    tuple(sorted(consts.items())),
                    tuple(sorted((scalars or {}).items())),
                    cfg.warps,
                    cfg.stages,
                    m == 1,
                    tuple(sorted(cptrs.items())),
                )
                if key in seen:
                    continue
                seen.add(key)
                t0 = time.time()
                try:
                    info = compile_one(fn, cptrs, consts, cfg.warps, cfg.stages, m, scalars, options=options)
                    print(
                        f"ok   {label:10} M={m:<5} {cfg.name:32} {info} ({time.time() - t0:.1f} s)",
                        flush=True,
                    )
                except Exception as e:  # the row says what failed; the exit status says that one did
                    fails += 1
                    msg = str(e).strip().splitlines()
                    print(
                        f"FAIL {label:10} M={m:<5} {cfg.name:32} {type(e).__name__}: {msg[0] if msg else ''}"
                    )
    print(f"{len(seen)} GEMM kernels compiled for sm90 (+ decode attention), {fails} failed in all")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
