"""Activations: point names, fetching POST /debug/activations, and comparing two sides per point.

Steps 1-2 of docs/design.md "White-box localisation". Everything below the fetch is pure: per
point cosine, norm ratio, rel / max-abs error and SQNR (difftest.metrics.tensors), judged against
`LayerThresholds` (the white-box bounds; they stay here until verdict code is gathered in one
place). replay.py builds on this module, layers.py runs both for one pair of servers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from difftest.collect import Endpoint
from difftest.errors import UnreadableBody
from difftest.metrics.tensors import TensorDiff, tensor_diff
from difftest.results import LayerPoint
from difftest.whitebox.safetensors import SafeTensors, read_safetensors
from server_shim import debug_protocol as P

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_RESIDUAL = re.compile(r"^(?:.*\.)?layers\.\d+$")
LEAF_KINDS = ("linear", "moe")  # modules whose local error can be blamed on themselves
FOUR_BIT = ("int4-g128", "mxfp4")


@dataclass(frozen=True)
class LayerThresholds:
    """Bounds of the layer diff. Calibration (tiny-llama, fp32, CPU; tests/test_whitebox_acceptance.py):
    correct triton / torch targets against their torch golden reach point rel_err <= ~1e-4 and
    local rel_err <= ~1e-4 (worst: fp8-block, whose act-quant rounding flips on ties); every fault
    class in docs/design.md "Fault injection" gives a local rel_err >= 5e-2 except ue8m0-rounding (~1e-2).
    """

    # residual / logits vs golden. Not 1e-2: dynamic activation quantization is discontinuous, a
    # 1e-7 accumulation-order difference flips a rounding and the flip grows downstream; correct
    # triton-vs-torch targets measured up to 1.6e-2 (fp8-tensor, layer 3) and 7.5e-3 (int8 logits).
    exact_point_rel_err: float = 5e-2
    exact_local_rel_err: float = 1e-3  # one module on identical input vs the golden module
    slot_rel_err: float = 1e-3  # slot 1 (rolled tokens) vs slot 0 of the same target
    # accuracy vs FP16. The usual 0.999 / 0.995 module cosines (docs/design.md "Calibration") flag correct smollm2 modules, so
    # each bound sits under the minimum a correct build measured on smollm2 (bench/calibrate.py,
    # module-local cosine min: fp8-* 0.99888, int8 0.99322, int4-g128 0.9736, mxfp4 0.9849) and
    # the relative ranking does the finding.
    module_cosine_8bit: float = 0.995
    module_cosine_int8: float = 0.985
    module_cosine_4bit: float = 0.95
    point_cosine_8bit: float = 0.99  # residual stream: error accumulates over layers
    point_cosine_4bit: float = 0.9
    # Magnitude: 8-bit modules measured 0.975..1.013; mxfp4's power-of-two scales move it further
    # (0.894..1.143 on an H100, fp16). fnuz x0.5 and skipped scales (x35..x1766) stay far outside.
    norm_ratio_low: float = 0.9
    norm_ratio_high: float = 1.1
    norm_ratio_low_4bit: float = 0.8
    norm_ratio_high_4bit: float = 1.25
    # local rel_err / median of the module's siblings: correct modules measured <= ~2.4 (smollm2
    # int4: 0.228 vs median 0.094); a module above `relative_outlier` is named, above
    # `relative_fail` it fails the layers verdict.
    relative_outlier: float = 4.0
    relative_fail: float = 10.0

    def module_cosine(self, scheme: str | None) -> float:
        if scheme in FOUR_BIT:
            return self.module_cosine_4bit
        return self.module_cosine_int8 if scheme == "int8" else self.module_cosine_8bit

    def norm_bounds(self, scheme: str | None) -> tuple[float, float]:
        if scheme in FOUR_BIT:
            return self.norm_ratio_low_4bit, self.norm_ratio_high_4bit
        return self.norm_ratio_low, self.norm_ratio_high

    def point_cosine(self, scheme: str | None) -> float:
        return self.point_cosine_4bit if scheme in FOUR_BIT else self.point_cosine_8bit


# ---------------------------------------------------------------- point naming


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def point_kind(name: str, config_kind: str | None = None) -> str:
    base = name.removeprefix("decode.")
    if base == "logits":
        return "logits"
    if _RESIDUAL.match(base):
        return "residual"
    if config_kind == "attention" or base.endswith(("self_attn", ".attn", ".attention")):
        return "attn"
    if config_kind in ("mlp", "linear", "moe", "embedding", "norm"):
        return config_kind
    return "linear" if base.rsplit(".", 1)[-1].endswith("proj") else "other"


def sibling_key(name: str) -> str:
    """Modules with the same role in other layers: `model.layers.*.mlp.down_proj`."""
    return _LAYER.sub(lambda m: m.group(0).replace(m.group(1), "*"), name, count=1)


# ---------------------------------------------------------------- fetching


@dataclass(frozen=True)
class Activations:
    st: SafeTensors
    token_ids: list[int]
    decode_ids: list[int]
    points: list[str]


def _json_list(meta: Mapping[str, str], key: str) -> list[Any]:
    try:
        val = json.loads(meta.get(key, "[]"))
    except ValueError:
        return []
    return val if isinstance(val, list) else []


async def fetch_activations(ep: Endpoint, body: dict[str, Any]) -> Activations:
    raw = await ep.client.post_bytes(P.ACTIVATIONS, body)
    st = read_safetensors(raw)
    ids = {key: _json_list(st.metadata, key) for key in (P.META_TOKEN_IDS, P.META_DECODE_TOKEN_IDS)}
    if not all(isinstance(i, int) and not isinstance(i, bool) for v in ids.values() for i in v):
        raise UnreadableBody(f"{ep.name}: {P.ACTIVATIONS} answered token ids that are not integers")
    return Activations(
        st, list(ids[P.META_TOKEN_IDS]), list(ids[P.META_DECODE_TOKEN_IDS]),
        [str(p) for p in _json_list(st.metadata, P.META_POINTS)],
    )  # fmt: skip


# ---------------------------------------------------------------- point comparison (pure)


def finite_or_inf(x: float) -> float:
    """NaN as +inf, so that a NaN error ranks (and compares) as the worst."""
    return math.inf if math.isnan(x) else x


def point_flagged(d: TensorDiff, kind: str, scheme: str | None, th: LayerThresholds, pkind: str = "") -> bool:
    """Out of bounds? Judged on the residual stream and logits only: sublayer outputs inherit
    their input's error (and a smaller norm makes their rel_err larger), replay judges them.
    Exactness: rel_err over the bound. Accuracy: cosine under the scheme's residual budget or a
    magnitude off by more than 10%. Non-finite always."""
    if not d.finite:
        return True
    if pkind not in ("residual", "logits"):
        return False
    if kind == "exactness":
        return d.rel_err > th.exact_point_rel_err
    lo, hi = th.norm_bounds(scheme)
    return d.cosine < th.point_cosine(scheme) or not lo <= d.norm_ratio <= hi


def local_out_of_bounds(d: TensorDiff, kind: str, scheme: str | None, th: LayerThresholds) -> bool:
    if not d.finite:
        return True
    if kind == "exactness":
        return d.rel_err > th.exact_local_rel_err
    lo, hi = th.norm_bounds(scheme)
    return d.cosine < th.module_cosine(scheme) or not lo <= d.norm_ratio <= hi


def _point(name: str, kind: str, d: TensorDiff, flagged: bool) -> LayerPoint:
    return LayerPoint(name=name, layer=layer_of(name), kind=kind, cosine=d.cosine, norm_ratio=d.norm_ratio,
                      rel_err=d.rel_err, max_abs=d.max_abs_err, sqnr_db=d.sqnr_db, flagged=flagged)  # fmt: skip


def compare_points(
    base: Activations, tgt: Activations, *, kind: str, scheme: str | None, th: LayerThresholds,
    config_kinds: Mapping[str, str] = {},
) -> tuple[list[LayerPoint], list[str]]:  # fmt: skip
    """Prefill points, then decode points (residual stream and logits, over the steps whose
    decoded tokens agree so far: a step after a different token is another sequence)."""
    warnings: list[str] = []
    names = [p for p in base.points if p in tgt.st.tensors and p in base.st.tensors]
    if "logits" in base.st.tensors and "logits" in tgt.st.tensors and "logits" not in names:
        names.append("logits")
    if missing := [p for p in base.points if p not in tgt.st.tensors]:
        warnings.append(f"{len(missing)} point(s) not served by the target, e.g. {missing[0]}")
    out: list[LayerPoint] = []
    for name in names:
        a, b = base.st.value(name), tgt.st.value(name)
        if a.shape != b.shape:
            warnings.append(f"{name}: shapes differ ({a.shape} vs {b.shape})")
            continue
        pk = point_kind(name, config_kinds.get(name))
        d = tensor_diff(a, b)
        out.append(_point(name, pk, d, point_flagged(d, kind, scheme, th, pk)))
    steps = 0
    for s in range(min(len(base.decode_ids), len(tgt.decode_ids))):
        if base.decode_ids[: s + 1] != tgt.decode_ids[: s + 1]:
            break
        steps = s + 1
    if len(base.decode_ids) > steps:
        warnings.append(
            f"decode: tokens diverge at step {steps}; decode points compared over {steps} step(s)"
        )
    for name in names if steps else []:
        pk = point_kind(name, config_kinds.get(name))
        keys = [f"decode.{s}.{name}" for s in range(steps)]
        if pk not in ("residual", "logits") or not all(
            k in base.st.tensors and k in tgt.st.tensors for k in keys
        ):
            continue
        a = np.concatenate([base.st.value(k).reshape(-1) for k in keys])
        b = np.concatenate([tgt.st.value(k).reshape(-1) for k in keys])
        d = tensor_diff(a, b)
        out.append(_point(f"decode.{name}", pk, d, point_flagged(d, kind, scheme, th, pk)))
    return out, warnings


def first_divergence(points: Sequence[LayerPoint]) -> tuple[int | None, str | None]:
    """(first layer whose residual stream is flagged, that point); else the first flagged point."""
    res = [p for p in points if p.flagged and p.kind == "residual" and p.layer is not None]
    if res:
        first = min(res, key=lambda p: (p.layer, p.name.startswith("decode.")))
        return first.layer, first.name
    flagged = [p for p in points if p.flagged]
    return None, (flagged[0].name if flagged else None)
