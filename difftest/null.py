"""The null model of exactness: how far "a different but correct implementation" may move.

A target is judged against its golden (same model and scheme on the reference backend). A correct
kernel still differs from the golden: it sums in another order and rounds differently, and on a
quantized model each difference can flip an activation's rounding and grow downstream. Limits
must therefore come from a measurement of that effect *on this model, scheme, dtype and device*:

- **twin** (preferred; built-in goldens): the golden's rounding twin — the same server with every
  linear / MoE output perturbed by `module_tolerance(dtype, K)` (server_shim.twin, .tolerance) —
  compared with the golden like any target. Its black-box statistics and its per-layer errors are the null.
- **floor file** (`[run] noise_floor`, from `difftest noise`): the reference against itself at
  other concurrencies / after a restart. Shows batch noise; blind to a kernel that rounds
  differently but deterministically, so limits from it can be too tight on a GPU.
- **in-run A/A** (`[run] null = "aa"`): the golden re-asked serially. Measures ~0 for a
  deterministic golden; the absolute minimums then decide.
- **none**: absolute minimums only.

Limits are the null's upper 95% bound (its bootstrap interval; p99 for kl_p99; the worst
residual-stream point for layers) times `margin`, never under an absolute minimum. A limit wider
than what a broken target would pass (`UNINFORMATIVE`) is reported as not informative: the check
is shown but decides nothing, and the verdict rests on what still informs (module replay above
all, whose bound is 2 x the module tolerance that sizes the twin, floored for quantization flips).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from difftest.noise import TIE_QUANTILE, NoiseFloor, complement_high, interval_high, tie_margin_of
from difftest.results import Comparison, LayerDiff
from server_shim import tolerance

MARGIN = 3.0

# Absolute minimums: a null measured as ~0 (a quiet fp32 CPU null) must not demand bit-exactness.
ABS_MIN = {
    "kl_mean": 0.005,
    "kl_p99": 0.05,
    "top1_disagreement": 0.03,
    # one flipped near-tie re-writes the rest of a greedy continuation, so free-running token
    # match moves far more than top-1 does under pure accumulation-order noise
    "token_mismatch": 0.25,
    "point_rel_err": 0.03,
    "tie_margin": 0.05,  # nats
}

# A limit on the wrong side of these would pass a broken target (fault matrix, smollm2: one module
# with scale-transposed / fnuz / garbage-gemm costs exactness KL 0.04-0.16 and top-1 5-15 points;
# scale-skipped KL 17): the check is then not informative.
UNINFORMATIVE = {
    "token_match": (">=", 0.25),  # a token-match limit under 0.25 accepts a garbled target
    "top1_agreement": (">=", 0.25),
    "kl_mean": ("<=", 1.0),  # nats
    "kl_p99": ("<=", 10.0),
    "point_rel_err_max": ("<=", 0.5),
    "slot_logprob_max_diff": ("<=", 1.0),
    "placement_logprob_max_diff": ("<=", 1.0),
    # [thresholds] overrides of these (exactness.<check>) that can never fail: garbage-gemm and
    # scale-skipped measured garbled rate 1.0 and BLEU 0.0, and a rate is never over 1
    **{rate: ("<", 1.0) for rate in ("garbled_rate", "failed_rate", "broken_rate")},
    "bleu": (">", 0.0),
}

UNINFORMATIVE_NOTE = "; a broken target would pass this limit"  # appended to such a limit's note


@dataclass(frozen=True)
class Limit:
    value: float | None
    note: str
    informative: bool = True


def informative(check: str, limit: float, table: Mapping[str, tuple[str, float]] = UNINFORMATIVE) -> bool:
    """Whether `limit` could fail a broken target (`table`: UNINFORMATIVE, or the accuracy one).
    A rule `(op, bound)` says which limits do: `limit op bound` ("<" and ">" for a bound that is
    the value no measurement can pass, as a rate's 1 or BLEU's 0)."""
    rule = table.get(check)
    if rule is None:
        return True
    op, bound = rule
    return {">=": limit >= bound, "<=": limit <= bound, ">": limit > bound, "<": limit < bound}[op]


@dataclass(frozen=True)
class NullModel:
    """What a correct implementation may differ by, per metric (None: not measured).

    Every value is "bigger is noisier"; `source` and `trust` say where it came from and how far
    it can be believed, for the report.
    """

    source: str  # "twin" | "floor file" | "in-run A/A" | "none"
    description: str
    trust: str
    kl_mean: float | None = None
    kl_p99: float | None = None
    top1_disagreement: float | None = None
    token_mismatch: float | None = None
    tie_margin: float | None = None
    point_rel_err: float | None = None
    n_prompts: int = 0

    def limit(self, metric: str, margin: float = MARGIN) -> Limit:
        """max(null x margin, absolute minimum), with the note saying which won."""
        minimum = ABS_MIN[metric]
        observed = getattr(self, metric)
        if observed is None:
            return Limit(minimum, f"absolute minimum {minimum:g} ({self.source}: not measured)")
        if math.isnan(observed):  # a broken null (a NaN twin) says nothing: the minimum, and why
            return Limit(minimum, f"absolute minimum {minimum:g} ({self.source}: NaN, unusable)")
        scaled = observed * margin
        if scaled >= minimum:
            return Limit(scaled, f"{self.source} {observed:.4g} x{margin:g}")
        return Limit(
            minimum, f"absolute minimum {minimum:g} ({self.source} {observed:.3g} x{margin:g} is below it)"
        )


NO_NULL = NullModel("none", "no null model", "none: absolute minimums only (calibrated on fp32 CPU)")


def divergence_margins(comp: Comparison) -> list[float]:
    return [
        p.divergence_margin
        for p in comp.prompts
        if p.error is None and p.divergence_margin is not None and math.isfinite(p.divergence_margin)
    ]


def null_from_twin(
    comp: Comparison, layers: LayerDiff | None = None, *, amplitude: float | None = None
) -> NullModel:
    """The null from a golden-vs-twin comparison (and its per-layer diff, where served)."""
    margins = divergence_margins(comp)
    points = [p.rel_err for p in (layers.points if layers else []) if p.kind in ("residual", "logits")]
    noise = f", module noise {amplitude:.3g}" if amplitude else ""
    n = int(comp.aggregate.get("n_prompts", len(comp.prompts)))
    return NullModel(
        source="twin",
        description=f"rounding twin of {comp.baseline} ({comp.target}{noise}), {n} prompts",
        trust="measured: a correct kernel's worth of error in every module, on this hardware",
        kl_mean=interval_high(comp, "kl_mean"),
        kl_p99=float(comp.aggregate["kl_p99"]) if "kl_p99" in comp.aggregate else None,
        top1_disagreement=complement_high(comp, "top1_agreement"),
        token_mismatch=complement_high(comp, "token_match"),
        tie_margin=tie_margin_of(margins),
        point_rel_err=max(points) if points else None,
        n_prompts=n,
    )


def null_from_floor(floor: NoiseFloor, *, in_run: bool = False) -> NullModel:
    """The null from an A/A noise floor (a file from `difftest noise`, or the in-run A/A): its
    upper 95% bounds, as the twin's. A floor from an older difftest stored the point values alone:
    those are used, and the trust says so (`_point_values_note`)."""
    quiet = (floor.kl_mean or 0.0) == 0.0 and (floor.token_mismatch or 0.0) == 0.0
    trust = (
        "weak: the server agrees with itself exactly, which says nothing about a different kernel"
        if quiet
        else "partial: batch / restart noise of one build; blind to a kernel that rounds differently"
    )
    return NullModel(
        source="in-run A/A" if in_run else "floor file",
        description=floor.describe(),
        trust=trust + _point_values_note(floor, in_run),
        kl_mean=_bound(floor.kl_mean_ci_high, floor.kl_mean),
        kl_p99=floor.kl_p99,
        top1_disagreement=_bound(floor.top1_disagreement_ci_high, floor.top1_disagreement),
        token_mismatch=_bound(floor.token_mismatch_ci_high, floor.token_mismatch),
        tie_margin=floor.tie_margin,
        point_rel_err=floor.layer_rel_err,
        n_prompts=floor.n_prompts,
    )


def _bound(ci_high: float | None, point: float | None) -> float | None:
    """The upper 95% bound where the floor stores one, else (an older floor) its point value."""
    return ci_high if ci_high is not None else point


def _point_values_note(floor: NoiseFloor, in_run: bool) -> str:
    """Why an older floor's limits are narrower than documented ("" for a current one).

    Used, not refused: a point value never exceeds its upper bound, so such limits only err toward
    failing a correct target, never toward passing a broken one; refusing would turn every run
    with an existing floor file into exit 2 until the reference is measured again, and leave an
    older report.json (whose in-run floors store no bound either) impossible to re-judge."""
    names = floor.point_values_only()
    if not names:
        return ""
    again = "re-run it" if in_run else "measure it again with `difftest noise CONFIG`"
    return (
        f"; point values ({', '.join(names)}), not upper 95% bounds, and the largest A/A margin as "
        f"the TIE margin: stored by an older difftest, so limits are narrower than documented ({again})"
    )


def replay_bound(dtype: str | None) -> tuple[float, str]:
    """Module replay bound of the compute dtype (server_shim.tolerance.replay_bound), with its note."""
    name = dtype or "float32"
    try:
        bound = tolerance.replay_bound(name)
    except ValueError:
        name, bound = "float32", tolerance.replay_bound("float32")
    return bound, (
        f"module replay bound {bound:.3g} ({name}: max(2 x module tolerance {tolerance.module_tolerance(name):.3g}, "
        f"{tolerance.REPLAY_FLOOR:g}))"
    )


def tie_margin(null: NullModel, overrides: Mapping[str, float] = {}) -> tuple[float, str]:
    """The TIE margin (nats): override, else the null's own divergence margins' p90."""
    if "tie_margin" in overrides:
        return float(overrides["tie_margin"]), "override [thresholds] tie_margin"
    if null.tie_margin is None:
        return ABS_MIN["tie_margin"], f"absolute minimum ({null.source} measured no divergence)"
    value = max(null.tie_margin, ABS_MIN["tie_margin"])
    return value, f"p{TIE_QUANTILE:g} of {null.source} divergence margins"


def exactness_limits(null: NullModel, margin: float = MARGIN) -> dict[str, Limit]:
    """Exactness limits (target vs golden), keyed by check name, each marked informative or not."""
    out: dict[str, Limit] = {}
    for check, metric, complement in (
        ("kl_mean", "kl_mean", False),
        ("kl_p99", "kl_p99", False),
        ("top1_agreement", "top1_disagreement", True),
        ("token_match", "token_mismatch", True),
        ("point_rel_err_max", "point_rel_err", False),
    ):
        lim = null.limit(metric, margin)
        value = 1.0 - lim.value if complement else lim.value  # type: ignore[operator]
        note = f"1 - {lim.note}" if complement else lim.note
        ok = informative(check, value)  # type: ignore[arg-type]
        if not ok:
            note += UNINFORMATIVE_NOTE
        out[check] = Limit(value, note, ok)
    return out


def pick_null(
    twin: tuple[Comparison, LayerDiff | None, float | None] | None,
    floor: NoiseFloor | None,
    in_run: NoiseFloor | None = None,
) -> NullModel:
    """The null a target is judged with: its golden's twin, else the floor file, else the
    in-run A/A, else none."""
    if twin is not None:
        return null_from_twin(twin[0], twin[1], amplitude=twin[2])
    if floor is not None:
        return null_from_floor(floor)
    if in_run is not None:
        return null_from_floor(in_run, in_run=True)
    return NO_NULL


def twins_by_golden(nulls: Sequence[Comparison]) -> dict[str, Comparison]:
    return {c.baseline: c for c in nulls}
