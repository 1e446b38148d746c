"""What the plots show, computed from the result model alone (pure: no I/O, no SVG).

- `layer_profile`: per layer, the module-local error (the worst replayed module of the layer) and
  the accumulated error (the residual stream after the block), in the units of the limits the
  "layers" part judged them by: relative error against the golden (exactness), 1 - cosine
  against the reference (accuracy). Limits, the first divergent layer and the guilty layer come
  along, and whether that part passed.
- `kl_ladder`: the per-position KL distribution of one comparison as llama-perplexity prints it
  (mean, median, p90, p99, max), with the limits the verdict put on the mean and the p99.
- `position_profile`: KL along the generated sequence (mean, p90, max over prompts per position).
- `sibling_errors`: the guilty module's local error against its siblings (the same role in the
  other layers: `model.layers.*.mlp.down_proj`), the ranking the localisation is built on.
- `tag_rows`: per prompt tag, how many prompts, failed, diverged, mean KL, top-1, token match.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from difftest.results import Check, Comparison, LayerDiff, LayerPoint, PartVerdict, PromptDiff, TargetResult

LEAF_KINDS = ("linear", "moe")  # as difftest.layer_points: modules blamed on themselves
_LAYER_IN_NAME = re.compile(r"(?<=layers\.)\d+(?=\.|$)")


def part_for(t: TargetResult, name: str, against: str | None = None) -> PartVerdict | None:
    """The verdict part `name` against `against` (when given).

    The white-box parts are named "layers-exactness" / "layers-accuracy" by the runner (plain
    "layers" by `difftest.layers.layer_verdict`); `name` "layers-exactness" finds either.
    """
    if t.verdict is None:
        return None
    names = (name, name.split("-", 1)[0]) if name.startswith("layers-") else (name,)
    for n in names:
        for p in t.verdict.parts:
            if p.part == n and (against is None or p.against == against or not p.against):
                return p
    return None


def part_status(p: PartVerdict | None) -> str | None:
    if p is None or p.skipped or not p.checks:
        return None
    label = getattr(p, "label", None)  # a model that grows INCONCLUSIVE parts says so itself
    if isinstance(label, str):
        return label
    return "PASS" if p.passed else "FAIL"


def check_of(p: PartVerdict | None, name: str) -> Check | None:
    if p is None:
        return None
    return next((c for c in p.checks if c.name == name), None)


# ----------------------------------------------------------------------------- layers


@dataclass
class LayerProfile:
    title: str  # "exactness vs fp8-block-golden"
    xlabels: list[str]  # "0", "1", ..., "logits"
    local: list[float | None]  # module-local error per layer (None: no module replayed there)
    accumulated: list[float | None]  # residual stream / logits error
    unit: str  # "relative error" | "1 − cosine"
    local_limit: tuple[float, str, str] | None  # (value, op, where the limit came from)
    accumulated_limit: tuple[float, str, str] | None
    first_divergent: int | None  # index into xlabels
    guilty: int | None  # index into xlabels of the guilty module's layer
    guilty_module: str | None
    status: str | None  # the "layers" part: PASS / FAIL / None (not judged)
    null: list[float | None] | None = None  # the null's accumulated error (rounding twin vs golden)

    def spark(self) -> list[float | None]:
        """The series a sparkline shows: local error where measured, else accumulated."""
        return self.local if any(v is not None for v in self.local) else self.accumulated

    def spark_limit(self) -> float | None:
        lim = self.local_limit if any(v is not None for v in self.local) else self.accumulated_limit
        return lim[0] if lim else None


def _nanmax(vals: Sequence[float]) -> float | None:
    if not vals:
        return None
    if any(math.isnan(v) for v in vals):
        return math.nan
    return max(vals)


def _deficit(cos: float | None) -> float | None:
    return None if cos is None else (math.nan if math.isnan(cos) else max(0.0, 1.0 - cos))


def _accumulated(d: LayerDiff, layers: list[int], has_logits: bool, exact: bool) -> list[float | None]:
    """Per layer, the residual stream after the block (worst of prefill and decode; else any
    point of the layer); then the logits."""

    def value(p: LayerPoint) -> float | None:
        return p.rel_err if exact else _deficit(p.cosine)

    out: list[float | None] = []
    for i in layers:
        pts = [p for p in d.points if p.layer == i]
        resid = [v for p in pts if p.kind == "residual" and (v := value(p)) is not None]
        out.append(_nanmax(resid or [v for p in pts if (v := value(p)) is not None]))
    if has_logits:
        out.append(_nanmax([v for p in d.points if p.kind == "logits" and (v := value(p)) is not None]))
    return out


def layer_profile(t: TargetResult, d: LayerDiff, null: LayerDiff | None = None) -> LayerProfile | None:
    """`null`: the null model's layer diff against the same golden (drawn for scale)."""
    if not d.points:
        return None
    part = part_for(t, f"layers-{d.kind}", d.against)
    exact = d.kind == "exactness"
    layers = sorted({p.layer for p in d.points if p.layer is not None})
    has_logits = any(p.kind == "logits" for p in d.points)
    xlabels = [str(i) for i in layers] + (["logits"] if has_logits else [])

    def local_value(p: LayerPoint) -> float | None:
        return p.local_rel_err if exact else _deficit(p.local_cosine)

    local: list[float | None] = []
    for i in layers:
        pts = [p for p in d.points if p.layer == i]
        leaves = [v for p in pts if p.kind in LEAF_KINDS and (v := local_value(p)) is not None]
        local.append(_nanmax(leaves))
    if has_logits:
        local.append(None)
    acc = _accumulated(d, layers, has_logits, exact)
    null_acc = None
    if null is not None and null.points and exact:
        null_acc = _accumulated(null, layers, has_logits, exact)

    def limit(name: str, deficit: bool) -> tuple[float, str, str] | None:
        c = check_of(part, name)
        if c is None:
            return None
        note = c.note.split(";", 1)[-1].strip() if ";" in c.note else c.note
        return (1.0 - c.limit if deficit else c.limit, "<=", note)

    first = None
    if d.first_divergent_layer is not None and str(d.first_divergent_layer) in xlabels:
        first = xlabels.index(str(d.first_divergent_layer))
    guilty = None
    if d.guilty_module:
        gp = next((p for p in d.points if p.name == d.guilty_module), None)
        if gp is not None and gp.layer is not None and str(gp.layer) in xlabels:
            guilty = xlabels.index(str(gp.layer))
    return LayerProfile(
        title=f"{d.kind} vs {d.against}",
        xlabels=xlabels,
        local=local,
        accumulated=acc,
        unit="relative error" if exact else "1 − cosine",
        local_limit=limit("local_rel_err_max", False) if exact else limit("local_cosine_min", True),
        accumulated_limit=limit("point_rel_err_max", False) if exact else None,
        first_divergent=first,
        guilty=guilty,
        guilty_module=d.guilty_module,
        status=part_status(part),
        null=null_acc,
    )


def layer_profiles(t: TargetResult, nulls: Sequence[LayerDiff] = ()) -> list[LayerProfile]:
    out = []
    for d in t.layers:
        null = next((n for n in nulls if n.against == d.against), None) if d.kind == "exactness" else None
        if (p := layer_profile(t, d, null)) is not None:
            out.append(p)
    return out


def spark_profile(t: TargetResult) -> LayerProfile | None:
    """The profile the first screen shows: the failing one, else exactness, else any."""
    profs = layer_profiles(t)
    if not profs:
        return None
    failing = [p for p in profs if p.status == "FAIL"]
    if failing:
        return failing[0]
    return next((p for p in profs if p.title.startswith("exactness")), profs[0])


# ----------------------------------------------------------------------------- KL


@dataclass
class Ladder:
    rungs: list[tuple[str, float | None]]  # (label, value) mean, median, p90, p99, max
    limits: dict[str, tuple[float, str]] = field(default_factory=dict)  # rung -> (limit, source)
    n_positions: int = 0
    null: dict[str, float | None] = field(default_factory=dict)  # the null model's rungs


def pooled_kl(c: Comparison) -> np.ndarray:
    vals = [v for p in c.prompts if p.error is None and p.position_kl for v in p.position_kl]
    return np.asarray(vals, dtype=np.float64)


def kl_ladder(c: Comparison, part: PartVerdict | None, null: Comparison | None = None) -> Ladder | None:
    """`null`: the null model's comparison against the same golden; its rungs come along."""
    pooled = pooled_kl(c)
    mean = c.aggregate.get("kl_mean")
    if pooled.size == 0 and mean is None:
        return None
    q: dict[str, float | None] = {"median": None, "p90": None, "p99": None, "max": None}
    if pooled.size:
        if np.isnan(pooled).any():
            q = dict.fromkeys(q, math.nan)
        else:
            med, p90, p99 = np.percentile(pooled, [50, 90, 99])
            q = {"median": float(med), "p90": float(p90), "p99": float(p99), "max": float(pooled.max())}
    if c.aggregate.get("kl_p99") is not None:
        q["p99"] = float(c.aggregate["kl_p99"])  # exactly the number the check read
    rungs = [("mean", None if mean is None else float(mean))] + list(q.items())
    limits: dict[str, tuple[float, str]] = {}
    for rung, name in (("mean", "kl_mean"), ("p99", "kl_p99")):
        ch = check_of(part, name)
        if ch is not None:
            limits[rung] = (ch.limit, ch.note)
    null_rungs: dict[str, float | None] = {}
    if null is not None and (nl := kl_ladder(null, None)) is not None:
        null_rungs = dict(nl.rungs)
    return Ladder(rungs=rungs, limits=limits, n_positions=int(pooled.size), null=null_rungs)


@dataclass
class PositionProfile:
    positions: list[int]
    mean: list[float | None]
    p90: list[float | None]
    max: list[float | None]
    counts: list[int]


def position_profile(c: Comparison, max_positions: int = 512) -> PositionProfile | None:
    """KL per generated position over the prompts that reached it (first `max_positions`)."""
    rows = [p.position_kl for p in c.prompts if p.error is None and p.position_kl]
    if not rows:
        return None
    n = min(max_positions, max(len(r) for r in rows))
    width = np.full((len(rows), n), np.nan)
    present = np.zeros((len(rows), n), dtype=bool)
    for k, r in enumerate(rows):
        m = min(n, len(r))
        width[k, :m] = r[:m]
        present[k, :m] = True
    mean, p90, mx, counts = [], [], [], []
    for i in range(n):
        col = width[present[:, i], i]
        counts.append(int(col.size))
        if col.size == 0:
            mean.append(None), p90.append(None), mx.append(None)
        elif np.isnan(col).any():
            mean.append(math.nan), p90.append(math.nan), mx.append(math.nan)
        else:
            mean.append(float(col.mean()))
            p90.append(float(np.percentile(col, 90)))
            mx.append(float(col.max()))
    return PositionProfile(list(range(n)), mean, p90, mx, counts)


# ----------------------------------------------------------------------------- modules


def sibling_role(name: str) -> str:
    """`model.layers.3.mlp.down_proj` -> `model.layers.*.mlp.down_proj`."""
    return _LAYER_IN_NAME.sub("*", name)


@dataclass
class Siblings:
    role: str
    guilty: str
    rows: list[tuple[str, float | None, bool]]  # (module, local error, is the guilty one)
    unit: str
    limit: tuple[float, str] | None  # (value, where it came from)
    status: str | None


def sibling_errors(t: TargetResult, d: LayerDiff, max_rows: int = 16) -> Siblings | None:
    if not d.guilty_module:
        return None
    role = sibling_role(d.guilty_module)
    pts = [p for p in d.points if p.kind in LEAF_KINDS and p.local_rel_err is not None]
    peers = [p for p in pts if sibling_role(p.name) == role] or pts
    if not peers:
        return None
    peers.sort(key=lambda p: (p.layer if p.layer is not None else 1 << 30, p.name))
    if len(peers) > max_rows:  # keep the guilty one and the worst others
        worst = sorted(peers, key=lambda p: -(p.local_rel_err or 0.0))[:max_rows]
        keep = {p.name for p in worst} | {d.guilty_module}
        peers = [p for p in peers if p.name in keep]
    part = part_for(t, f"layers-{d.kind}", d.against)
    limit = None
    if d.kind == "exactness":
        c = check_of(part, "local_rel_err_max")
        if c is not None:
            limit = (c.limit, c.note.split(";", 1)[-1].strip())
    else:
        c = check_of(part, "local_err_vs_siblings_max")
        finite = [
            p.local_rel_err for p in peers if p.local_rel_err is not None and math.isfinite(p.local_rel_err)
        ]
        if c is not None and finite:
            med = float(np.median(finite))
            limit = (c.limit * med, f"{c.limit:g}x the siblings' median {med:.3g}")
    return Siblings(
        role=role,
        guilty=d.guilty_module,
        rows=[(p.name, p.local_rel_err, p.name == d.guilty_module) for p in peers],
        unit="module-local relative error",
        limit=limit,
        status=part_status(part),
    )


# ----------------------------------------------------------------------------- tags


@dataclass
class TagRow:
    tag: str
    n: int
    failed: int
    diverged: int
    kl_mean: float | None
    top1: float | None
    token_match: float | None


def _mean(vals: list[float]) -> float | None:
    return float(np.mean(vals)) if vals else None


def tag_rows(prompts: Sequence[PromptDiff]) -> list[TagRow]:
    """One row per tag (a prompt with several tags counts in each), "(untagged)" last."""
    groups: dict[str, list[PromptDiff]] = {}
    for p in prompts:
        for tag in getattr(p, "tags", None) or ["(untagged)"]:
            groups.setdefault(tag, []).append(p)
    rows = []
    for tag, ps in groups.items():
        ok = [p for p in ps if p.error is None]
        rows.append(
            TagRow(
                tag=tag,
                n=len(ps),
                failed=len(ps) - len(ok),
                diverged=sum(1 for p in ok if p.first_divergence is not None),
                kl_mean=_mean([p.kl_mean for p in ok if p.kl_mean is not None]),
                top1=_mean([p.top1_agreement for p in ok if p.top1_agreement is not None]),
                token_match=_mean([p.match_rate for p in ok if p.match_rate is not None]),
            )
        )
    rows.sort(key=lambda r: (r.tag == "(untagged)", -(r.kl_mean if r.kl_mean is not None else -1), r.tag))
    return rows
