"""Quantization audit: are the stored scales what the config declares, and which reading of them
does the kernel actually compute with? (Step 5 of docs/design.md "White-box localisation".)

Per quantized module of the target's GET /debug/config:
- structure checks: weight dtype and shape, scale shape (block / group counts such as
  ceil(N/128) x ceil(K/128)) and scale strides against the scheme and the declared layout;
- a hypothesis test. Two weights are measured through POST /debug/module on an identity input
  (x = I_K gives x @ W^T = W^T; the zero input gives the bias, subtracted):
    W_ref  on the REFERENCE server (FP16, or the golden's own dequantized weight),
    W_eff  on the TARGET: the weight its kernel really multiplies with.
  The stored tensors (GET /debug/quant) are dequantized in numpy under each hypothesis --
  declared layout, transposed scale strides, shuffle toggled, unit scales, fp8 bits read as the
  other fp8 flavour, weight memory read transposed -- and each one's relative error against both
  is reported. A hypothesis other than the declared one that reconstructs W_eff clearly better
  is the hint ("scales look transposed"). The identity is scaled by PROBE = 45/64: a one-hot row
  quantizes exactly with its exact activation scale in every scheme (x / s = qmax), so W_eff is the
  weight path alone; with a scale rounded up to a power of two (ue8m0), fp8 codes it as 352 / 360
  of itself, and that reading is one more hypothesis. (An identity of ones is blind to it: 1.0 /
  2**-8 = 256 is an e4m3 value.) int8 needs a probe with more significant bits (`probe_value`):
  where both servers compute in fp16 / fp32 it gets one, and the same hypothesis; in bf16 it cannot.
- backend table: the same stored weights run through each backend (metadata `backend` of
  /debug/module) on one input, against the reference; a backend the device cannot run is listed
  with the server's reason.
MoE experts (one module, stored [E, N, K] per GEMM; the numpy recomputation in experts.py) are
not linear in their input, but on fixed routing each expert is two GEMMs around an activation: a
sample of experts (`sample_experts`: all of them up to EXPERT_SAMPLE, else evenly spaced, first
and last included) gets EXPERT_ROWS probe rows each, routed to it alone with weight 1, and the target's output is compared with the expert
recomputed in numpy under each hypothesis -- activation quantization and the compute dtype's
rounding included, both GEMMs read one way (one kernel runs both) or one of them alone
("unit-scales@down"), activation scales rounded to powers of two, and the combine without its
declared `combine_scale` (routed_scaling_factor). Structure checks cover gate_up_proj and
down_proj (`down` in the experts' /debug/config entry); the backend table runs fixed routing.
The router (which experts, with which weights) is not audited: `difftest layers` sees it.
`difftest run` audits the modules localisation blamed, once each (localise.py); `difftest quant`
audits every quantized module.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from difftest.collect import Endpoint
from difftest.errors import DifftestError, RequestRejected, ServerError, UnreadableBody
from difftest.metrics.tensors import rel_err, tensor_diff
from difftest.whitebox.activations import LayerThresholds
from difftest.whitebox.experts import (
    ACTIVATIONS,
    BLOCK,
    EXPERT_ROWS,
    FP8_QMAX,
    INT8_QMAX,
    WEIGHT_ONLY,
    declared_factor,
    expert_forward,
    expert_probe,
    expert_readings,
    expert_tensors,
    never_applied,
)
from difftest.whitebox.safetensors import (
    SafeTensors,
    decode,
    read_safetensors,
    unpack_nibbles,
    write_safetensors,
)
from server_shim import debug_protocol as P

log = logging.getLogger(__name__)

INT4_GROUP, MX_GROUP = 128, 32  # BLOCK (128), the fp8 block: experts.py
CLEAR_MARGIN = 0.5  # a rival hypothesis must at most halve the declared one's error to be named
EXPLAINED = 0.05  # a hypothesis "reconstructs" the kernel's weight within 5% rel err
BACKENDS = ("torch", "triton", "vendor")
BACKEND_COSINE_MIN = 0.999  # issue 6: a backend under this against its own torch arithmetic is flagged


def backend_cosine_min(scheme: str | None, against_reference: bool) -> float:
    """The cosine under which a backend's output is marked (informative, never the verdict).
    Against the target's own torch backend (the golden arithmetic on the same stored weights) a
    correct kernel is all but exact: BACKEND_COSINE_MIN. Against the reference's full-precision
    weights the scheme's own quantization error counts too, so the bound is the module budget the
    layer diffs use (`LayerThresholds.module_cosine`): with 0.999 every module of a correct
    int4-g128 or mxfp4 target (about 0.992) was marked, and the mark told nothing."""
    if not against_reference:
        return BACKEND_COSINE_MIN
    return min(BACKEND_COSINE_MIN, LayerThresholds().module_cosine(scheme))


BACKEND_ROWS = 4  # few rows: the Triton interpreter on CPU pays per program, not per FLOP
# The identity's value (see the docstring): exact in fp32 / fp16 / bf16, off the e4m3 grid after a
# power-of-two scale (45/64 * 2**9 = 360, between 352 and 384; e4m3fnuz: 180, between 176 and 192).
PROBE = 45 / 64
# int8's: an integer grid shows a power-of-two scale only through a fraction, which takes more
# significant bits than bf16 has without being a tie (8 bits: x.5 only). 1031/2048 (11 bits: exact
# in fp16 / fp32) over 2**-7 is 64.4375, coded as 64 (x0.9932); with its exact scale it is 127.
PROBE_INT8 = 1031 / 2048
WIDE_DTYPES = ("float16", "float32")  # the compute dtypes PROBE_INT8 is exact in
WEIGHT_DTYPES = {
    "fp8-tensor": ("float8_e4m3fn", "float8_e4m3fnuz"), "fp8-token": ("float8_e4m3fn", "float8_e4m3fnuz"),
    "fp8-block": ("float8_e4m3fn", "float8_e4m3fnuz"), "int8": ("int8",), "int4-g128": ("uint8",), "mxfp4": ("uint8",),
}  # fmt: skip
HINTS = {
    "transposed": "scales look transposed",
    "shuffle-toggled": "scale shuffle looks ignored",
    "unit-scales": "scales look skipped (read as 1)",
    "fnuz-unnormalized": "fp8 looks read as e4m3fnuz without normalisation (x0.5)",
    "weight-transposed": "weight looks read transposed (a transpose that did nothing)",
    "act-scales-pow2": "activation scales look rounded up to powers of two (ue8m0)",
    "routed-scaling-missing": "the expert combine looks to skip routed_scaling_factor",  # audit_module adds f
}
MOE_GEMMS = ("gate_up", "down")


# ---------------------------------------------------------------- structure checks (pure)


def expected_scale_shape(scheme: str, n: int, k: int) -> tuple[int, int]:
    return {
        "fp8-tensor": (1, 1), "fp8-token": (n, 1), "int8": (n, 1),
        "fp8-block": (math.ceil(n / BLOCK), math.ceil(k / BLOCK)),
        "int4-g128": (n, math.ceil(k / INT4_GROUP)), "mxfp4": (n, math.ceil(k / MX_GROUP)),
    }[scheme]  # fmt: skip


def expected_strides(shape: tuple[int, int], order: str) -> tuple[int, int]:
    r, c = shape
    return (c, 1) if order == "row-major" else (1, r)


def _strides_match(stride: tuple[int, int], want: tuple[int, int], shape: tuple[int, int]) -> bool:
    """A stride of a size-1 dimension is never read: it cannot be wrong."""
    return all(s == w or d == 1 for s, w, d in zip(stride, want, shape, strict=True))


def structure_checks(info: Mapping[str, Any]) -> dict[str, bool]:
    """Each check of the module's /debug/config entry, by name (False: wrong). An MoE experts
    module's entry describes gate_up_proj as a linear's, and down_proj under `down`: its checks are
    prefixed "down_" (down_proj's scales went unchecked while only gate_up was described)."""
    out = _gemm_checks(info)
    down = info.get("down")
    if info.get("kind") == "moe" and isinstance(down, Mapping):
        out |= {f"down_{k}": v for k, v in _gemm_checks({**info, **down}).items()}
    return out


def _logical_shape(info: Mapping[str, Any]) -> tuple[int, int]:
    """(N, K) of one GEMM: its declared out/in_features, else read off the stored weight shape
    (a 4-bit weight packs two codes a byte). Experts report the stored, packed shape like a
    linear: the logical [8, 256, 128] of a 4-bit expert read as packed made K twice too large."""
    scheme = str(info.get("scheme"))
    wshape = [int(x) for x in info.get("weight_shape", [])]
    n = int(info.get("out_features", wshape[-2] if len(wshape) >= 2 else 0))
    k = int(info.get("in_features", 0))
    if not k:
        k = wshape[-1] * (2 if scheme in WEIGHT_ONLY else 1) if wshape else 0
    return n, k


def _gemm_checks(info: Mapping[str, Any]) -> dict[str, bool]:
    scheme = str(info.get("scheme"))
    wshape = [int(x) for x in info.get("weight_shape", [])]
    sshape = [int(x) for x in info.get("scale_shape", [])]
    stride = [int(x) for x in info.get("scale_stride", [])]
    order = str((info.get("scale_layout") or {}).get("order", "row-major"))
    n, k = _logical_shape(info)
    out: dict[str, bool] = {"weight_dtype": str(info.get("weight_dtype")) in WEIGHT_DTYPES.get(scheme, ())}
    packed = math.ceil(k / 2) if scheme in WEIGHT_ONLY else k
    out["weight_shape"] = wshape[-2:] == [n, packed]
    if scheme not in WEIGHT_DTYPES or len(sshape) < 2:
        out["scale_shape"] = False
        return out
    want = expected_scale_shape(scheme, n, k)
    out["scale_shape"] = tuple(sshape[-2:]) == want
    out["scale_stride"] = len(stride) >= 2 and _strides_match(
        (stride[-2], stride[-1]), expected_strides(want, order), want
    )
    return out


# ---------------------------------------------------------------- dequantization (pure)


def _expand(s: np.ndarray, gr: int, gc: int, n: int, k: int) -> np.ndarray:
    return np.repeat(np.repeat(s, gr, axis=0)[:n], gc, axis=1)[:, :k]


def shuffle_perm(rows: int) -> np.ndarray:
    """The shim's declared shuffle: rows in tiles of 16 have their index transposed as a 4x4
    grid, the tail (< 16 rows) is reversed. shuffled[i] = logical[perm[i]]."""
    full = rows - rows % 16
    i = np.arange(full)
    base, r = i - i % 16, i % 16
    return np.concatenate([base + (r % 4) * 4 + r // 4, np.arange(rows - 1, full - 1, -1)]).astype(np.int64)


def reread(s: np.ndarray, declared: tuple[int, int], read: tuple[int, int]) -> np.ndarray:
    """Scales whose logical values `s` sit in memory at `declared` strides, read at `read` strides."""
    r, c = s.shape
    flat = np.empty(r * c, dtype=s.dtype)
    idx = (np.arange(r)[:, None] * declared[0] + np.arange(c)[None, :] * declared[1]).ravel()
    if len(np.unique(idx)) != r * c or idx.max() >= r * c:
        raise ValueError(f"strides {declared} do not tile a dense [{r}, {c}] tensor")
    flat[idx] = s.ravel()
    ridx = np.arange(r)[:, None] * read[0] + np.arange(c)[None, :] * read[1]
    return flat[ridx % (r * c)]


def dequantize(scheme: str, st: SafeTensors, n: int, k: int, *, scales: np.ndarray | None = None,
               weight_codes: np.ndarray | None = None, fp8_format: str | None = None) -> np.ndarray:  # fmt: skip
    """float64 [N, K] from stored tensors; `scales` are logical (already read per hypothesis)."""
    w = st.tensors["weight"] if weight_codes is None else weight_codes
    s = np.asarray(st.value("weight_scale") if scales is None else scales)
    if scheme in ("fp8-tensor", "fp8-token", "fp8-block"):
        fmt = fp8_format or fp8_flavour(st.dtypes["weight"])
        d = decode(w, fmt).astype(np.float64)
        return d * (_expand(s, BLOCK, BLOCK, n, k) if scheme == "fp8-block" else s.astype(np.float64))
    if scheme == "int8":
        return w.astype(np.float64) * s.astype(np.float64)
    if scheme == "int4-g128":
        q = unpack_nibbles(w, k).astype(np.float64)
        z = st.tensors["weight_zero"].astype(np.float64)
        return (q - _expand(z, 1, INT4_GROUP, n, k)) * _expand(s.astype(np.float64), 1, INT4_GROUP, n, k)
    if scheme == "mxfp4":
        v = decode(unpack_nibbles(w, k), "e2m1").astype(np.float64)
        return v * _expand(decode(s, "e8m0").astype(np.float64), 1, MX_GROUP, n, k)
    raise ValueError(f"cannot dequantize scheme {scheme!r}")


def probe_value(scheme: str, dtypes: Sequence[str | None]) -> float:
    """The identity's value for a module of `scheme` measured on servers computing in `dtypes`
    (an unknown dtype: None): PROBE_INT8 for int8 where every one is fp16 / fp32, else PROBE."""
    if scheme == "int8" and dtypes and all(d in WIDE_DTYPES for d in dtypes):
        return PROBE_INT8
    return PROBE


def hypotheses(scheme: str, st: SafeTensors, n: int, k: int, probe: float = PROBE) -> dict[str, np.ndarray]:
    """Every reading of the stored tensors that a real bug class produces, keyed by name (`probe`:
    the identity's value, which the pow2 activation-scale reading depends on)."""
    meta = st.metadata
    s = st.value("weight_scale") if scheme != "mxfp4" else st.tensors["weight_scale"]
    s = np.asarray(s).reshape(s.shape[-2:]) if s.ndim >= 2 else np.asarray(s).reshape(1, 1)
    r, c = s.shape
    order = meta.get(P.META_SCALE_ORDER, "row-major")
    shuffled = meta.get(P.META_SCALE_SHUFFLED, "false") == "true"
    declared = expected_strides((r, c), order)
    other = expected_strides((r, c), "col-major" if order == "row-major" else "row-major")
    unshuf = np.argsort(shuffle_perm(r))
    logical = s[unshuf] if shuffled else s
    out: dict[str, np.ndarray] = {"declared": dequantize(scheme, st, n, k, scales=logical)}
    if r > 1 and c > 1:
        t = reread(s, declared, other)
        out["transposed"] = dequantize(scheme, st, n, k, scales=t[unshuf] if shuffled else t)
    if r > 1:
        out["shuffle-toggled"] = dequantize(scheme, st, n, k, scales=s if shuffled else s[unshuf])
    ones = np.full_like(s, 127) if scheme == "mxfp4" else np.ones_like(s)
    out["unit-scales"] = dequantize(scheme, st, n, k, scales=ones)
    dt = st.dtypes.get("weight", "")
    if scheme.startswith("fp8"):
        if dt == "F8_E4M3FNUZ":  # on an fnuz arch the bug is the missing x2 of the scale
            out["fnuz-unnormalized"] = out["declared"] / 2.0
        else:
            out["fnuz-unnormalized"] = dequantize(scheme, st, n, k, scales=logical, fp8_format="e4m3fnuz")
        out["act-scales-pow2"] = out["declared"] * pow2_act_factor(fp8_flavour(dt), probe)
    # int8 at PROBE: exactly 90 after a power-of-two scale, no trace (factor 1)
    elif scheme == "int8" and (factor := pow2_act_factor("int8", probe)) != 1.0:
        out["act-scales-pow2"] = out["declared"] * factor
    raw = st.tensors["weight"]
    rows, cols = raw.shape[-2:]
    if rows > 1 and cols > 1:  # [N, K] memory read as if it were the transposed copy
        flipped = raw.reshape(-1)[: rows * cols].reshape(cols, rows).T
        out["weight-transposed"] = dequantize(
            scheme, st, n, k, scales=logical, weight_codes=np.ascontiguousarray(flipped)
        )
    return out


def fp8_flavour(safetensors_dtype: str) -> str:
    """The fp8 format of a stored weight dtype (activations are quantized to the same flavour)."""
    return "e4m3fnuz" if safetensors_dtype == "F8_E4M3FNUZ" else "e4m3fn"


def pow2_act_factor(fmt: str, value: float) -> float:
    """What a one-hot row of `value` comes back as, relative to itself, when its activation scale
    is rounded up to a power of two (pure): 2**ceil(log2(value / qmax)), the value coded to the
    nearest `fmt` number (an fp8 flavour, or "int8": the integers; ties to the even code), decoded."""
    scale = 2.0 ** math.ceil(math.log2(value / (INT8_QMAX if fmt == "int8" else FP8_QMAX[fmt])))
    if fmt == "int8":
        return float(np.round(value / scale) * scale / value)  # numpy and torch round ties to even
    grid = decode(np.arange(128, dtype=np.uint8), fmt).astype(np.float64)  # the non-negative codes
    grid = grid[np.isfinite(grid)]
    dist = np.abs(grid - value / scale)
    ties = np.flatnonzero(dist == dist.min())
    code = int(ties[0] if ties[0] % 2 == 0 else ties[-1])  # two ties are adjacent codes: one is even
    return float(grid[code] * scale / value)


def judge_hypotheses(vs_ref: Mapping[str, float], vs_kernel: Mapping[str, float]) -> tuple[str, str | None]:
    """(best hypothesis for what the kernel computes, hint or None)."""
    pool = vs_kernel if vs_kernel else vs_ref
    clean = {h: (v if math.isfinite(v) else math.inf) for h, v in pool.items()}
    best = min(clean, key=lambda h: (clean[h], h != "declared"))
    dec = clean.get("declared", math.inf)
    if best != "declared" and clean[best] <= CLEAR_MARGIN * dec and clean[best] <= EXPLAINED:
        return best, hint_of(best)
    if vs_kernel and dec > EXPLAINED and clean[best] > EXPLAINED:
        return best, "the kernel's weight matches no layout hypothesis (wrong kernel for the arch?)"
    if vs_ref and vs_ref.get("declared", 0.0) > 0.5:
        return best, "the stored weight does not reconstruct the reference weight"
    return best, None


def hint_of(name: str) -> str:
    """A hypothesis' hint; "h@down" is h in one expert GEMM only (down_proj's)."""
    h, _, gemm = name.partition("@")
    hint = HINTS.get(h, f"the weight reads as '{h}'")
    return f"{hint} (in {gemm}_proj only)" if gemm else hint


# ---------------------------------------------------------------- HTTP


# Rows of the identity sent per /debug/module request: servers cap request bodies (the shim at
# 8 MiB; an identity of K=1536 in fp32 is 9.4 MiB), so the identity goes in slices of 256 rows.
IDENTITY_ROWS = 256


async def effective_weight(ep: Endpoint, module: str, k: int, probe: float = PROBE) -> np.ndarray:
    """W [N, K] as `ep` computes it: (out(c I_K) - out(0)) / c = W^T (c = probe), in row slices.

    Each slice goes as one batch slot of `rows` tokens ([1, rows, K]): a 2-D input's rows are batch
    slots to a kernel, and a kernel that reads slot 0's scale rows for the others (slot-variant)
    would then turn the identity into garbage and the weight into "no layout hypothesis". The
    slot dependence is the replay's finding (two slots); the audit asks what the weight is."""

    async def out(x: np.ndarray) -> np.ndarray:
        body = write_safetensors({P.INPUT: x[None]}, {P.META_MODULE: module})
        raw = await ep.client.post_bytes(P.MODULE, body)
        y = read_safetensors(raw).value(P.OUTPUT).astype(np.float64)
        return y.reshape(x.shape[0], -1)

    eye = np.eye(k, dtype=np.float32) * np.float32(probe)
    parts = await asyncio.gather(*(out(eye[i : i + IDENTITY_ROWS]) for i in range(0, k, IDENTITY_ROWS)))
    bias = await out(np.zeros((1, k), np.float32))
    return (np.concatenate(parts, axis=0) - bias).T / probe


async def audit_module(target: Endpoint, reference: Endpoint | None, module: str,
                       info: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """One audit row (plain JSON values). `info`: the module's /debug/config entry (default: read
    from the target's config, which its client fetched once). `audited`: whether the kernel was
    measured (a hypothesis test ran); structure checks alone leave a wrong kernel unseen."""
    if info is None:
        info = (await target.client.debug_config()).get("modules", {}).get(module, {})
    scheme = str(info.get("scheme"))
    checks = structure_checks(info)
    row: dict[str, Any] = {
        "module": module, "scheme": scheme, "backend": info.get("backend"),
        "layout": info.get("scale_layout"), "checks": checks,
    }  # fmt: skip
    notes: list[str] = []
    hint = None
    kind = info.get("kind")
    measured: tuple[dict[str, float], dict[str, float]] | None = None
    if kind == "linear":
        measured = await _linear_hypotheses(target, reference, module, info, checks, notes)
        row["backends"] = await backend_table(
            target, reference, module, int(info.get("in_features", 0)), scheme=info.get("scheme")
        )
    elif kind == "moe":
        measured = await _experts_hypotheses(target, reference, module, info, checks, notes)
        routing, ref_routing = await _backend_routing(reference, module, info)
        row["backends"] = await backend_table(
            target, reference, module, _logical_shape(info)[1], scheme=info.get("scheme"),
            extras=routing, ref_extras=ref_routing,
        )  # fmt: skip
    else:
        notes.append(f"hypothesis test n/a: a {kind} module")
        row["backends"] = {}
    if measured is not None:
        vs_ref, vs_kernel = measured
        best, hint = judge_hypotheses(vs_ref, vs_kernel)
        if hint and best == "routed-scaling-missing":  # with its number, as the layer diff words it
            f = _combine_scale(info)
            hint = never_applied(1 / f, f)
        row.update(hypotheses=_round(vs_ref), kernel_hypotheses=_round(vs_kernel), best=best)
    row["audited"] = measured is not None
    row["hint"] = hint
    row["flagged"] = bool(hint) or not all(checks.values())
    row["notes"] = notes
    return row


def _check_metadata_order(meta: Mapping[str, str], info: Mapping[str, Any], checks: dict[str, bool]) -> None:
    if meta.get(P.META_SCALE_ORDER) not in (None, (info.get("scale_layout") or {}).get("order")):
        checks["metadata_order"] = False


async def _linear_hypotheses(target: Endpoint, reference: Endpoint | None, module: str, info: Mapping[str, Any],
                             checks: dict[str, bool], notes: list[str]) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """(rel err of each hypothesis vs the reference's weight, vs the target kernel's weight)."""
    scheme = str(info.get("scheme"))
    n, k = int(info.get("out_features", 0)), int(info.get("in_features", 0))
    st = await _get_quant(target, module)
    _check_metadata_order(st.metadata, info, checks)
    servers = [target] if reference is None else [target, reference]
    probe = probe_value(scheme, [await _compute_dtype(ep) for ep in servers])
    cands = hypotheses(scheme, st, n, k, probe)
    w_eff = await effective_weight(target, module, k, probe)
    vs_kernel = {h: rel_err(w_eff, w) for h, w in cands.items()}
    vs_ref: dict[str, float] = {}
    if reference is not None:
        try:
            w_ref = await effective_weight(reference, module, k, probe)
            vs_ref = {h: rel_err(w_ref, w) for h, w in cands.items()}
        except DifftestError as exc:
            notes.append(f"reference weight unavailable: {exc}")
    return vs_ref, vs_kernel


async def _experts_hypotheses(target: Endpoint, reference: Endpoint | None, module: str, info: Mapping[str, Any],
                              checks: dict[str, bool], notes: list[str]) -> tuple[dict[str, float], dict[str, float]] | None:  # fmt: skip
    """The experts' hypothesis test (module doc): the target's output on probe rows routed one
    expert each against every reading recomputed in numpy; None (noted) where it cannot run."""
    scheme = str(info.get("scheme"))
    act = str(info.get("activation", "silu"))
    if act not in ACTIVATIONS:
        notes.append(f"hypothesis test n/a: the experts' activation {act!r} is not modelled")
        return None
    st = await _get_quant(target, module)
    _check_metadata_order(st.metadata, info, checks)
    num = int(info.get("num_experts") or st.tensors["gate_up_proj.weight"].shape[0])
    (n_gu, hidden), (n_dn, k_dn) = _logical_shape(info), _logical_shape({**info, **(info.get("down") or {})})
    if not info.get("down"):  # an entry without down_proj's: its K is gate_up's N / 2 (gate and up)
        n_dn, k_dn = hidden, n_gu // 2
    ids, x, index = expert_probe(num, hidden)
    scale = _combine_scale(info)
    y_t = await _experts_out(target, module, x, index, 1.0)
    y_r = None
    if reference is not None:
        try:  # the reference's weights carry the target's factor where their combines differ
            y_r = await _experts_out(
                reference, module, x, index, scale / await _ref_combine_scale(reference, module)
            )
        except DifftestError as exc:
            notes.append(f"reference output unavailable: {exc}")
    dtype, fmt = await _compute_dtype(target), fp8_flavour(st.dtypes.get("gate_up_proj.weight", ""))
    outs: dict[str, list[np.ndarray]] = {}
    for j, e in enumerate(ids):
        gu = hypotheses(scheme, expert_tensors(st, "gate_up", e), n_gu, hidden)
        dn = hypotheses(scheme, expert_tensors(st, "down", e), n_dn, k_dn)
        rows = x[j * EXPERT_ROWS : (j + 1) * EXPERT_ROWS].astype(np.float64)
        for name, (wg, wd, pow2, sc) in expert_readings(gu, dn, scheme, scale).items():
            y = expert_forward(
                rows, wg, wd, scheme=scheme, fmt=fmt, act=act, dtype=dtype, pow2=pow2, scale=sc
            )
            outs.setdefault(name, []).append(y)
    cands = {h: np.concatenate(v) for h, v in outs.items()}
    which = f"all {num} experts" if len(ids) == num else f"experts {', '.join(map(str, ids))} of {num}"
    notes.append(
        f"hypothesis test on {which}, {EXPERT_ROWS} rows each on fixed routing (the router is not audited)"
    )
    vs_kernel = {h: rel_err(y_t, y) for h, y in cands.items()}
    vs_ref = {} if y_r is None else {h: rel_err(y_r, y) for h, y in cands.items()}
    return vs_ref, vs_kernel


def _combine_scale(info: Mapping[str, Any]) -> float:
    """The factor an experts module multiplies its combined output by (debug_info
    `combine_scale`; a module that declares none: 1, the router applies the factor, as HF does)."""
    return declared_factor(info.get("combine_scale")) or 1.0


async def _ref_combine_scale(reference: Endpoint, module: str) -> float:
    try:
        cfg = await reference.client.debug_config()
    except DifftestError:
        return 1.0
    return _combine_scale(cfg.get("modules", {}).get(module) or {})


async def _experts_out(
    ep: Endpoint, module: str, x: np.ndarray, index: np.ndarray, weight: float
) -> np.ndarray:
    """`ep`'s experts module on x [T, H], row t routed to expert index[t] alone with `weight`."""
    tensors = {P.INPUT: x, "top_k_index": index, "top_k_weights": np.full(index.shape, weight, np.float32)}
    raw = await ep.client.post_bytes(P.MODULE, write_safetensors(tensors, {P.META_MODULE: module}))
    y = read_safetensors(raw).value(P.OUTPUT).astype(np.float64)
    if y.shape != x.shape:
        raise UnreadableBody(
            f"{ep.name} answered experts output of shape {list(y.shape)} for input {list(x.shape)}"
        )
    return y


async def _backend_routing(reference: Endpoint | None, module: str,
                           info: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
    """Fixed routing of the backend table's BACKEND_ROWS rows (row i to experts 2i, 2i+1, weight
    1/2 each), for the target and for the reference (its weights carry the target's combine
    factor where the two combine differently)."""
    num = max(int(info.get("num_experts") or 1), 1)
    k = min(2, num)
    index = (np.arange(BACKEND_ROWS)[:, None] * k + np.arange(k)[None, :]) % num
    w = np.full(index.shape, 1.0 / k, np.float32)
    routing = {"top_k_index": index.astype(np.int64), "top_k_weights": w}
    if reference is None:
        return routing, routing
    ratio = _combine_scale(info) / await _ref_combine_scale(reference, module)
    return routing, routing | {"top_k_weights": (w * ratio).astype(np.float32)}


async def backend_table(
    target: Endpoint,
    reference: Endpoint | None,
    module: str,
    k: int,
    *,
    scheme: str | None = None,
    extras: Mapping[str, np.ndarray] | None = None,
    ref_extras: Mapping[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """The module's stored weights run through each backend on one fixed input, against FP32.

    Baseline: the reference server's module on the same input (FP32 / FP16 weights); without a
    reference, the target's own `torch` backend (the golden arithmetic). A backend the device
    cannot run is reported with the server's reason, never silently skipped. `extras`: tensors
    sent beside the input (MoE experts: their fixed routing), `ref_extras` the reference's.
    """
    x = np.random.default_rng(0).standard_normal((BACKEND_ROWS, k)).astype(np.float32)
    extras = dict(extras or {})
    ref_extras = extras if ref_extras is None else dict(ref_extras)

    async def run(ep: Endpoint, backend: str | None, more: Mapping[str, np.ndarray]) -> np.ndarray:
        meta = {P.META_MODULE: module} | ({P.META_BACKEND: backend} if backend else {})
        raw = await ep.client.post_bytes(P.MODULE, write_safetensors({P.INPUT: x, **more}, meta))
        return read_safetensors(raw).value(P.OUTPUT).astype(np.float64)

    if reference is not None:
        base, against = await run(reference, None, ref_extras), "reference (fp32/fp16 weights)"
    else:
        base, against = await run(target, "torch", extras), "target's torch backend"
    bound = backend_cosine_min(scheme, reference is not None)
    table: dict[str, dict[str, Any]] = {}
    for backend in BACKENDS:
        try:
            out = await run(target, backend, extras)
        except DifftestError as exc:
            table[backend] = {"available": False, "reason": str(exc)[:200]}
            continue
        diff = tensor_diff(base, out)
        table[backend] = {
            "available": True, "against": against, "cosine": float(f"{diff.cosine:.6g}"),
            "max_abs": float(f"{diff.max_abs_err:.4g}"), "flagged": not diff.cosine >= bound, "bound": bound,
        }  # fmt: skip
    return table


async def _compute_dtype(ep: Endpoint) -> str | None:
    """The server's compute dtype from /debug/config ("float16", ...), None where it says none or
    cannot be asked (then the probe is the one exact in every dtype)."""
    try:
        dtype = (await ep.client.debug_config()).get("dtype")
    except DifftestError:
        return None
    return dtype if isinstance(dtype, str) else None


async def _get_quant(ep: Endpoint, module: str) -> SafeTensors:
    raw = await ep.client.get_bytes(f"{P.QUANT}{module}")
    return read_safetensors(raw)


def _round(d: Mapping[str, float]) -> dict[str, float]:
    return {k: (float(f"{v:.4g}") if math.isfinite(v) else v) for k, v in d.items()}


async def audit(target: Endpoint, reference: Endpoint | None) -> list[dict[str, Any]]:
    """Every quantized module of `target`, in config order."""
    cfg = await target.client.debug_config()
    rows = []
    for name, info in cfg.get("modules", {}).items():
        if info.get("scheme") in (None, "none") or "scale_shape" not in info:
            continue
        try:
            rows.append(await audit_module(target, reference, name, info))
        except (DifftestError, KeyError, ValueError, TypeError, IndexError) as exc:
            why = (
                str(exc)
                if isinstance(exc, DifftestError)
                else f"unreadable answer ({type(exc).__name__}: {exc})"
            )
            failure = audit_failure(exc, target)
            if failure is not None:  # measured nothing, and not the target's doing: never its fault
                rows.append({"module": name, "scheme": info.get("scheme"), "flagged": False, "audited": False,
                             "hint": None, "failure": failure, "notes": [f"not audited: {why}"]})  # fmt: skip
                continue
            # a /debug/quant answer without a tensor the scheme has, or of the wrong shape, is that
            # server's: its module is flagged with the reason, not a traceback ending the audit
            rows.append({"module": name, "scheme": info.get("scheme"), "flagged": True, "hint": None,
                         "notes": [f"audit failed: {why}"]})  # fmt: skip
    return rows


def audit_failure(exc: Exception, target: Endpoint) -> str | None:
    """Why a module's audit measured nothing without the target being at fault: "infrastructure"
    (a server's 5xx, a timeout, a lost connection, after retries: exit 3) or "refused" (the
    reference or golden refused the request, HTTP 4xx: a module it does not have, another model:
    exit 2); None where the target's own answer was refused or unreadable (its module flagged).
    Every such failure used to flag the target's module: a reference whose /debug/module answered
    500 gave a clean negative control "a module flagged, as expected", exit 0 (tester t23)."""
    if isinstance(exc, ServerError):
        return "infrastructure"
    if isinstance(exc, RequestRejected) and exc.server != target.client.name:
        return "refused"
    return None
