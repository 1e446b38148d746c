"""Activations: point names, fetching POST /debug/activations (in chunks under the response caps),
and comparing two sides per point.

Steps 1-2 of docs/design.md "White-box localisation". Everything below the fetch is pure: per
point cosine, norm ratio, rel / max-abs error and SQNR (difftest.metrics.tensors), judged against
`LayerThresholds` (the white-box bounds; they stay here until verdict code is gathered in one
place). replay.py builds on this module, layers.py runs both for one pair of servers.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from difftest.collect import Endpoint
from difftest.errors import DifftestError, RequestRejected, ResponseTooLarge, UnreadableBody
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
    if base.endswith("embed_tokens"):  # the points debug.py names, also without a config to say so
        return "embedding"
    if base == "model.norm":
        return "norm"
    return "linear" if base.rsplit(".", 1)[-1].endswith("proj") else "other"


def stream_rank(p: LayerPoint) -> float | None:
    """Where a point sits on the path from token ids to logits (embeddings, each block's residual
    stream, the final norm, the logits), or None for a sublayer point. A divergence is first seen
    at the lowest rank flagged: an embedding table or final norm that is off shows there, and
    naming "layer 0" or "logits" for it sent people to the wrong module."""
    if p.kind == "residual" and p.layer is not None:
        return float(p.layer)
    if p.layer is not None:
        return None
    return {"embedding": -1.0, "norm": math.inf, "logits": math.inf}.get(p.kind)


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
    positions: list[int] | None = None  # the prefill rows kept when not every position (budget)
    notes: tuple[str, ...] = ()  # what the fetch had to give up, for the diff's warnings


# What one side's activations may take in memory, all chunks together: the per-answer cap bounds a
# response, this bounds their sum (7B: ~12 MB a token; past it the last positions are kept).
MAX_ACTIVATION_BYTES = 2**30
_CHUNK_FILL = 0.75  # of the response cap a planned chunk may fill: headers, and estimates per row


def _json_list(meta: Mapping[str, str], key: str) -> list[Any]:
    try:
        val = json.loads(meta.get(key, "[]"))
    except ValueError:
        return []
    return val if isinstance(val, list) else []


def _read(ep: Endpoint, raw: bytes) -> Activations:
    st = read_safetensors(raw)
    ids = {key: _json_list(st.metadata, key) for key in (P.META_TOKEN_IDS, P.META_DECODE_TOKEN_IDS)}
    if not all(isinstance(i, int) and not isinstance(i, bool) for v in ids.values() for i in v):
        raise UnreadableBody(f"{ep.name}: {P.ACTIVATIONS} answered token ids that are not integers")
    return Activations(
        st, list(ids[P.META_TOKEN_IDS]), list(ids[P.META_DECODE_TOKEN_IDS]),
        [str(p) for p in _json_list(st.metadata, P.META_POINTS)],
    )  # fmt: skip


def too_large(exc: DifftestError) -> bool:
    """An answer over a cap, ours (the client's) or the server's (413): asking for less can help."""
    if isinstance(exc, ResponseTooLarge):
        return True
    code = exc.body.get("error", {}).get("code") if isinstance(exc, RequestRejected) else None
    return isinstance(exc, RequestRejected) and exc.status_code == 413 and code != "request_too_large"


async def fetch_activations(
    ep: Endpoint, body: dict[str, Any], *, budget: int = MAX_ACTIVATION_BYTES
) -> Activations:
    """POST /debug/activations; an answer over a response cap is asked again in chunks.

    One request when it fits. Otherwise a probe at one position (no decode) measures each point's
    bytes per row and its execution order, and the points are packed into requests that fit the
    client's cap (a chunk still too large -- a server with a smaller cap -- is halved: points, then
    positions). The cap stays, so a hostile server cannot take the differ's memory; over `budget`
    in all, only the last positions are kept (said in `notes`)."""
    try:
        return _read(ep, await ep.client.post_bytes(P.ACTIVATIONS, body))
    except DifftestError as exc:
        if not too_large(exc):
            raise
    probe = await _merged(ep, await _split(ep, {**body, "positions": _last(body), "decode_steps": 0}, None))
    n, steps = len(probe.token_ids), int(body.get("decode_steps", 0))
    rows = _rows(body.get("positions", "all"), n)
    per_row = _bytes_per_row(probe.st)
    total = sum(per_row.values())
    notes: tuple[str, ...] = ()
    if total * (len(rows) + steps) > budget:
        keep = max(1, budget // max(total, 1) - steps)
        notes = (
            f"{ep.name}: activations of all {len(rows)} positions would take "
            f"{total * (len(rows) + steps) / 2**20:.0f} MiB, over difftest's {budget / 2**20:.0f} MiB; "
            f"the last {min(keep, len(rows))} positions are compared",
        )
        rows = rows[-keep:]
    fixed = {k: v for k, v in body.items() if k not in ("prompt", "layers", "logits")}
    fixed |= {"tokens": probe.token_ids, "positions": rows}
    chunks = []
    limit = ep.client.max_response_bytes * _CHUNK_FILL
    for names in _pack(probe.points, per_row, (len(rows) + steps), limit):
        chunks.extend(await _split(ep, {**fixed, **_select(names)}, names))
    got = await _merged(ep, chunks)
    return Activations(got.st, got.token_ids, got.decode_ids, got.points,
                       rows if notes else None, notes + got.notes)  # fmt: skip


def _last(body: Mapping[str, Any]) -> str | list[int]:
    pos = body.get("positions", "all")
    return [pos[-1]] if isinstance(pos, list) and pos else "last"


def _rows(spec: Any, n: int) -> list[int]:
    """A request's `positions` as row indices (the shim's rule: negative counts from the end)."""
    if isinstance(spec, list):
        return [p % n for p in spec]
    return [n - 1] if spec == "last" else list(range(n))


def _bytes_per_row(st: SafeTensors) -> dict[str, int]:
    """Per point (its inputs and extras with it, `logits` as one), the bytes of one position."""
    out: dict[str, int] = {}
    for name, arr in st.tensors.items():
        point = name.split(":", 1)[0]
        out[point] = out.get(point, 0) + int(arr.nbytes)
    return out


def _pack(points: Sequence[str], per_row: Mapping[str, int], rows: int, limit: float) -> list[list[str]]:
    """Points in execution order, in runs whose answer fits `limit` (a point alone may not: _split
    divides its positions)."""
    out: list[list[str]] = []
    size = 0.0
    for p in points:
        cost = per_row.get(p, 0) * rows
        if out and size + cost <= limit:
            out[-1].append(p)
            size += cost
        else:
            out.append([p])
            size = cost
    return out


def _escape(name: str) -> str:
    """A point name as a glob matching only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _select(names: Sequence[str]) -> dict[str, Any]:
    """The request fields that ask for exactly these points (`logits` by its literal name)."""
    return {"layers": [_escape(n) for n in names], "logits": False}


async def _split(ep: Endpoint, body: dict[str, Any], names: list[str] | None) -> list[Activations]:
    """`body`'s answer, in as many requests as the caps need: halves of the points, then (for one
    point) halves of the positions, the decode steps with the first half."""
    try:
        return [_read(ep, await ep.client.post_bytes(P.ACTIVATIONS, body))]
    except DifftestError as exc:
        if not too_large(exc):
            raise
        cause = exc
    if names is None:
        names = await _points_asked(ep, body)
    if not names:  # a server that lists no points: nothing smaller to ask for
        raise cause
    if len(names) > 1:
        half = len(names) // 2
        out = []
        for part in (names[:half], names[half:]):
            out.extend(await _split(ep, {**body, **_select(part)}, part))
        return out
    rows = body.get("positions")
    if isinstance(rows, list) and len(rows) > 1:
        half = len(rows) // 2
        first = await _split(ep, {**body, "positions": rows[:half]}, names)
        return first + await _split(ep, {**body, "positions": rows[half:], "decode_steps": 0}, names)
    steps = int(body.get("decode_steps", 0) or 0)
    while steps:  # the decode steps ride with the first position: the row may fit with fewer of them
        steps //= 2
        try:
            got = _read(ep, await ep.client.post_bytes(P.ACTIVATIONS, {**body, "decode_steps": steps}))
        except DifftestError as exc:
            if not too_large(exc):
                raise
            continue
        note = (f"{ep.name}: {P.ACTIVATIONS}: point {names[0]} with its decode steps is over the response "
                f"cap: its decode compared over {steps} step(s)")  # fmt: skip
        return [replace(got, notes=got.notes + (note,))]
    raise ResponseTooLarge(
        f"{ep.name}: {P.ACTIVATIONS}: point {names[0]} alone, at one position, is over "
        f"the response cap ({cause})",
        server=ep.name, cap=ep.client.max_response_bytes,
    )  # fmt: skip


async def _points_asked(ep: Endpoint, body: Mapping[str, Any]) -> list[str]:
    """The points a request selects, in /debug/config's order (the shim's rule: globs over the
    module points; `logits` by the flag or its literal name, never by a wildcard)."""
    served = [str(p) for p in (await ep.client.debug_config()).get("points", [])]
    modules = [p for p in served if p != "logits"]
    globs = body.get("layers")
    chosen = (
        modules if globs is None else [p for p in modules if any(fnmatch.fnmatchcase(p, g) for g in globs)]
    )
    if body.get("logits") or (globs is not None and "logits" in globs):
        chosen.append("logits")
    return chosen


async def _merged(ep: Endpoint, parts: Sequence[Activations]) -> Activations:
    """One answer from chunked ones: tensors together (a point's position halves joined in order),
    points in execution order, decode steps only as far as every chunk that decoded agrees."""
    ids = parts[0].token_ids
    if any(p.token_ids != ids for p in parts):
        raise UnreadableBody(f"{ep.name}: {P.ACTIVATIONS} answered other token ids for the same tokens")
    decoding = [p.decode_ids for p in parts if p.decode_ids]
    agreed = _common_prefix(decoding) if decoding else []
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    points: list[str] = []
    for part in parts:
        for name, arr in part.st.tensors.items():
            if name.startswith(P.DECODE_PREFIX):
                if name not in tensors and int(name.split(".", 2)[1]) < len(agreed):
                    tensors[name], dtypes[name] = arr, part.st.dtypes[name]
            elif name in tensors:  # the next positions of a point split by rows
                tensors[name] = np.concatenate([tensors[name], arr])
            else:
                tensors[name], dtypes[name] = arr, part.st.dtypes[name]
        points.extend(p for p in part.points if p not in points)
    meta = {P.META_TOKEN_IDS: json.dumps(ids), P.META_DECODE_TOKEN_IDS: json.dumps(agreed),
            P.META_POINTS: json.dumps(execution_order(points))}  # fmt: skip
    notes = tuple(dict.fromkeys(n for part in parts for n in part.notes))  # a chunk's cut decode, said once
    return Activations(SafeTensors(tensors, dtypes, meta), ids, agreed, execution_order(points), notes=notes)


def _common_prefix(seqs: Sequence[list[int]]) -> list[int]:
    out = []
    for column in zip(*seqs, strict=False):
        if len(set(column)) > 1:
            break
        out.append(column[0])
    return out


def execution_order(names: Sequence[str]) -> list[str]:
    """Points with each composite (block, attention, mlp) after the last point inside it, as its
    hook fires: chunks answered in /debug/config's order put `model.layers.3` before its linears."""
    out = list(names)
    for name in names:
        inside = [i for i, n in enumerate(out) if n.startswith(name + ".")]
        if inside and out.index(name) < inside[-1]:
            out.remove(name)
            out.insert(inside[-1], name)
    return out


# ---------------------------------------------------------------- point comparison (pure)


def finite_or_inf(x: float) -> float:
    """NaN as +inf, so that a NaN error ranks (and compares) as the worst."""
    return math.inf if math.isnan(x) else x


# Points on the model's main path, judged with the residual stream's bounds: the embeddings feed
# the stream, the final norm is the stream rescaled, the logits come out of it.
STREAM_KINDS = ("embedding", "residual", "norm", "logits")


def point_flagged(d: TensorDiff, kind: str, scheme: str | None, th: LayerThresholds, pkind: str = "") -> bool:
    """Out of bounds? Judged on the stream points only (STREAM_KINDS; a "norm" point is the final
    norm, the only norm debug.py serves as a point): sublayer outputs inherit their input's error
    (and a smaller norm makes their rel_err larger), replay judges them. Exactness: rel_err over
    the bound. Accuracy: cosine under the scheme's residual budget or a magnitude off by more than
    10%. Non-finite always."""
    if not d.finite:
        return True
    if pkind not in STREAM_KINDS:
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


def judged_as(name: str, pkind: str) -> str:
    """The kind a point is judged as: a stream kind, or "" for a point replay judges. An embedding
    or norm inside a block (another engine may serve one) is no stream point."""
    on_path = pkind in ("residual", "logits") or (pkind in STREAM_KINDS and layer_of(name) is None)
    return pkind if on_path else ""


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
        out.append(_point(name, pk, d, point_flagged(d, kind, scheme, th, judged_as(name, pk))))
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
        if not judged_as(name, pk) or not all(k in base.st.tensors and k in tgt.st.tensors for k in keys):
            continue
        a = np.concatenate([base.st.value(k).reshape(-1) for k in keys])
        b = np.concatenate([tgt.st.value(k).reshape(-1) for k in keys])
        d = tensor_diff(a, b)
        out.append(_point(f"decode.{name}", pk, d, point_flagged(d, kind, scheme, th, judged_as(name, pk))))
    return out, warnings


def first_divergence(points: Sequence[LayerPoint]) -> tuple[int | None, str | None]:
    """The first flagged stream point (embeddings, residual stream by layer, final norm, logits;
    prefill before decode): (its layer, its name) for a residual point, (None, its name) for the
    others; else (None, the first flagged point)."""
    stream = [(r, p) for p in points if p.flagged and (r := stream_rank(p)) is not None]
    if stream:
        _, first = min(
            stream, key=lambda rp: (rp[0], rp[1].kind == "logits", rp[1].name.startswith("decode."))
        )
        return (first.layer if first.kind == "residual" else None), first.name
    flagged = [p for p in points if p.flagged]
    return None, (flagged[0].name if flagged else None)
