"""A tiny interpreter of the PTX subset our inline-asm dequantization uses, for CI (no GPU there).

It runs the very strings the kernels embed (`_triton_fast.planes_ptx`, `mx_planes_ptx`, gemvf's
`F16_PAIR_PTX`), one
invocation per call, on Python integers, so that the byte-permute selectors, the lookup tables,
the lop3 truth tables and the packed fmas are checked against the formats' own decoding. ptxas
on the device then only has to agree with the PTX ISA, which the instructions below follow:
prmt's default mode, lop3's immLut over (a, b, c) = (0xF0, 0xCC, 0xAA), fma.rn on both 16-bit
halves with one rounding (the operands here make the exact result representable in float64).
"""

from __future__ import annotations

import re

import torch

MASK = 0xFFFFFFFF
_HALF = {"bf16x2": torch.bfloat16, "f16x2": torch.float16}


def as_half(bits: list[int], dtype: torch.dtype) -> torch.Tensor:
    """16-bit patterns (0..0xFFFF) as a tensor of `dtype` (fp16 / bf16)."""
    return torch.tensor([b - 0x10000 if b & 0x8000 else b for b in bits], dtype=torch.int16).view(dtype)


def _half_value(bits: int, kind: str) -> float:
    return as_half([bits], _HALF[kind]).double().item()


def _half_bits(value: float, kind: str) -> int:
    return int(torch.tensor([value], dtype=torch.float64).to(_HALF[kind]).view(torch.int16).item()) & 0xFFFF


def prmt(a: int, b: int, c: int) -> int:
    """prmt.b32 default mode: byte i of the result is byte (c's nibble i & 7) of {b, a}, or that
    byte's sign replicated when the nibble's bit 3 is set."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def ptx_emu_f16(bits: int) -> float:
    """A 16-bit pattern's fp16 value (subnormals included)."""
    return _half_value(bits & 0xFFFF, "f16x2")


def lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def fma_x2(a: int, b: int, c: int, kind: str) -> int:
    """Both 16-bit halves: a * b + c rounded once to the half's format."""
    out = 0
    for shift in (0, 16):
        va, vb, vc = (_half_value((v >> shift) & 0xFFFF, kind) for v in (a, b, c))
        out |= _half_bits(va * vb + vc, kind) << shift
    return out


def run(asm: str, inputs: dict[int, int], n_out: int) -> list[int]:
    """Execute `asm` with $i = inputs[i]; the outputs $0 .. $(n_out - 1) (16- or 32-bit patterns)."""
    regs: dict[str, int] = {f"${i}": v & MASK for i, v in inputs.items()}

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok):
            return int(tok, 0) & MASK
        raise ValueError(f"unknown operand {tok!r}")

    for stmt in asm.replace("{ ", "").replace("\n", " ").split(";"):
        stmt = stmt.strip().strip("}").strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, _, rest = stmt.partition(" ")
        if op == "mov.b32" and rest.startswith("{"):
            dst, src = rest.split("}")
            lo, hi = (d.strip() for d in dst.strip("{").split(","))
            v = val(src.strip(", "))
            regs[lo], regs[hi] = v & 0xFFFF, v >> 16
            continue
        args = [t.strip() for t in rest.split(",")]
        d, ops = args[0], args[1:]
        if op == "mov.b32":
            regs[d] = val(ops[0])
        elif op == "and.b32":
            regs[d] = val(ops[0]) & val(ops[1])
        elif op == "shr.u32":
            regs[d] = val(ops[0]) >> val(ops[1])
        elif op == "shl.b32":
            regs[d] = (val(ops[0]) << val(ops[1])) & MASK
        elif op == "prmt.b32":
            regs[d] = prmt(val(ops[0]), val(ops[1]), val(ops[2]))
        elif op == "lop3.b32":
            regs[d] = lop3(val(ops[0]), val(ops[1]), val(ops[2]), val(ops[3]))
        elif op == "cvt.f32.f16":  # a 16-bit register widened: exact
            h = ptx_emu_f16(val(ops[0]))
            regs[d] = int(torch.tensor([h], dtype=torch.float32).view(torch.int32).item()) & MASK
        elif op.startswith("fma.rn."):
            regs[d] = fma_x2(val(ops[0]), val(ops[1]), val(ops[2]), op.removeprefix("fma.rn."))
        else:
            raise ValueError(f"ptx_emu does not know {op!r}")
    return [regs[f"${i}"] for i in range(n_out)]
