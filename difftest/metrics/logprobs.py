"""Teacher-forced metrics: KL(ref || target) from top-k logprobs, top-1 agreement, delta-p.

The reference's greedy continuation is echoed into the target, so at every position both sides
score the same prefix. Each side gives its top-k logprobs, plus its logprob of the reference
token (the echoed one). An OpenAI-style server never gives the full distribution, so the KL is
estimated on a coarse partition and bracketed by bounds (`topk_kl`). With full logits
(`/debug/activations`) `full_kl` computes it exactly.

All logprobs are natural logs; probabilities are float64 (Python floats are IEEE doubles).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from difftest.metrics.stats import p99

# Probability that `topk_kl.upper` assumes every token a side did not list has at least
# (logprob ~ -23). Below this, the target would have to be ~1e10x less confident than its own
# k-th token; a real bug (scale-skipped: KL 17) stays far under the bound it produces.
DEFAULT_FLOOR = 1e-10


# Aggregate keys of the depth KL compared at (difftest.scoring.DepthTally): the fewest alternatives
# compared at any teacher-forced position, and the share of positions compared below the depth asked
KL_DEPTH_MIN = "kl_depth_min"
KL_DEPTH_CUT_RATE = "kl_depth_cut_rate"
FULL_KL_DEPTH = 2
"""Listed alternatives a KL needs to see probability move among them: at top-1 only `topk_kl`
compares {top-1, the forced token, rest}, blind to any redistribution under the top-1 (a wrong
model scored KL 0): the verdict marks such a KL not informative."""


@dataclass(frozen=True)
class KLEstimate:
    """KL(ref || target) in nats at one position: `lower <= estimate <= upper`."""

    estimate: float
    lower: float
    upper: float


@dataclass(frozen=True)
class _Side:
    known: dict[Hashable, float]  # token -> probability, listed or otherwise known
    tail: float  # 1 - sum(known), clamped at 0: the mass of every token not known
    cap: float  # max probability of a token not known: min(k-th listed prob, tail)


def _side(top: Mapping[Hashable, float], extra: Mapping[Hashable, float] | None, k: int | None) -> _Side:
    ranked = sorted(top.items(), key=lambda kv: kv[1], reverse=True)
    bounding = ranked if k is None else ranked[:k]
    known = {tok: math.exp(lp) for tok, lp in ranked}
    for tok, lp in (extra or {}).items():
        known.setdefault(tok, math.exp(lp))
    tail = max(0.0, 1.0 - sum(known.values()))
    kth = math.exp(bounding[-1][1]) if bounding else 1.0
    return _Side(known, tail, min(kth, tail))


def _term(p: float, q: float) -> float:
    """p ln(p/q) with 0 ln 0 = 0 and p > 0, q = 0 giving +inf."""
    if p <= 0.0:
        return 0.0
    if q <= 0.0:
        return math.inf
    return p * math.log(p / q)


def _waterfill_min(cells: list[tuple[float, float, float]], total: float) -> float:
    """min over q of sum_i p_i ln(p_i/q_i)  s.t.  sum_i q_i = total, lo_i <= q_i <= hi_i.

    `cells` are (p_i, lo_i, hi_i). KKT for this separable convex problem: q_i = clip(lam * p_i,
    lo_i, hi_i), with lam chosen so that the q sum to `total`. That sum is piecewise linear and
    non-decreasing in lam (slope += p_i at lo_i/p_i, -= p_i at hi_i/p_i), so one sweep over the
    sorted breakpoints finds lam exactly. Cells with p_i = 0 cost nothing and stay at lo_i unless
    every costly cell is at its cap (then they take the rest, still at no cost). Plain Python:
    a handful of cells per position, where numpy's per-call overhead would dominate.
    """
    costly = [(p, lo, hi) for p, lo, hi in cells if p > 0]
    if not costly:
        return 0.0
    f = sum(lo for _, lo, _ in cells)  # the q sum at lam = 0
    events = sorted([(lo / p, p) for p, lo, _ in costly] + [(hi / p, -p) for p, _, hi in costly])
    lam, slope = 0.0, 0.0
    if f < total:
        for at, d_slope in events:
            reach = f + slope * (at - lam)
            if reach >= total and slope > 0:
                lam += (total - f) / slope
                f = total
                break
            f, lam, slope = reach, at, slope + d_slope
        else:
            lam = math.inf  # caps reached below `total`: every costly cell sits at hi
    return sum(_term(p, min(max(lam * p, lo), hi)) for p, lo, hi in costly)


def topk_kl(
    p_top: Mapping[Hashable, float],
    q_top: Mapping[Hashable, float],
    *,
    p_extra: Mapping[Hashable, float] | None = None,
    q_extra: Mapping[Hashable, float] | None = None,
    k: int | None = None,
    floor: float = DEFAULT_FLOOR,
) -> KLEstimate:
    """KL(p || q) from the two sides' top-k logprobs, with a tail bucket; estimate and bounds.

    p = reference, q = target. `p_top`/`q_top` are each side's top-k logprobs; `p_extra`/`q_extra`
    are other logprobs a side gave outside its top-k (the echoed reference token's logprob):
    known values, but not used to bound unlisted tokens. `k`: the top-k size asked for; when a
    server lists more (vLLM adds the sampled token), only the k largest bound the unlisted ones.

    Notation per side s in {p, q}: K_s = tokens with a known probability, T_s = 1 - sum_{K_s} s
    (tail mass, clamped at 0), c_s = min(smallest of the k listed probs, T_s): no token outside
    K_s can have more probability than the k-th listed one (else it would have been listed), nor
    more than the whole tail. A = K_p (tokens whose ref probability is known).

    lower (valid with no assumption). Coarse-grain the vocabulary into pi_A = {{a} : a in A} +
    {rest}. By the data-processing inequality KL(p || q) >= KL(p_piA || q_piA) for every q. p_piA
    is known (p_rest = T_p). q_piA is known except q_u for u in A \\ K_q, where 0 <= q_u <= c_q and
    q_rest = M - sum q_u with M = 1 - sum_{A n K_q} q, q_rest >= S = sum_{K_q \\ A} q (known mass
    that lies in the rest). lower = min over that box of KL(p_piA || q_piA), which is convex and
    solved exactly by water-filling (q_u = clip(lam p_u)). The true q is in the box, so
    lower <= true KL.

    estimate. Partition pi = {{x} : x in K_p u K_q} + {rest per side}. A probability missing on
    one side is imputed as an even share of that side's tail, min(c_s, T_s / (n_missing_s + 1))
    (n shares for the missing tokens, one for the rest of the vocabulary), then
    estimate = sum_x p_x ln(p_x/q_x) + p_rest ln(p_rest/q_rest). Imputed q are clamped to >= floor
    so that rounding (listed mass summing to 1) does not give +inf.

    upper (conditional: an upper bound of KL over pi, assuming every probability the target did
    not list is >= `floor`). A true upper bound on the full-vocabulary KL does not exist from
    top-k data: any unlisted q could be 0, and how the tails differ inside themselves is never
    seen. Given the assumption, each term is maximised on its own box and summed (>= the joint
    max): q missing -> p ln(p/floor); p missing -> max(0, c_p ln(c_p/q)); the rest pair at the
    worst corner of its box (p ln(p/q) is jointly convex, so its max is at a vertex).

    Float rounding aside, lower <= estimate <= upper; the result is clamped to keep that order.
    NaN in any logprob gives NaN everywhere (NaN must fail a verdict, never vanish).
    """
    values = [*p_top.values(), *q_top.values(), *(p_extra or {}).values(), *(q_extra or {}).values()]
    if any(math.isnan(v) for v in values):
        nan = math.nan
        return KLEstimate(nan, nan, nan)
    if not p_top or not q_top:
        raise ValueError("topk_kl needs at least one listed logprob on each side")
    ps, qs = _side(p_top, p_extra, k), _side(q_top, q_extra, k)
    union = list(dict.fromkeys([*ps.known, *qs.known]))
    p_missing = [x for x in union if x not in ps.known]
    q_missing = [x for x in union if x not in qs.known]

    # --- estimate over pi, tail shares imputed
    p_imp = min(ps.cap, ps.tail / (len(p_missing) + 1))
    q_imp = max(floor, min(qs.cap, qs.tail / (len(q_missing) + 1)))
    p_rest = max(0.0, ps.tail - len(p_missing) * p_imp)
    q_rest = max(floor, qs.tail - len(q_missing) * q_imp)
    both = 0.0
    est = 0.0
    for x in union:
        px, qx = ps.known.get(x, p_imp), qs.known.get(x, q_imp)
        t = _term(px, qx)
        est += t
        if x in ps.known and x in qs.known:
            both += t
    est += _term(p_rest, q_rest)

    # --- lower over pi_A (data processing), q unknowns water-filled
    unknown = [x for x in ps.known if x not in qs.known]
    s_mass = sum(v for x, v in qs.known.items() if x not in ps.known)
    m_mass = s_mass + qs.tail
    cells = [(ps.known[x], 0.0, qs.cap) for x in unknown] + [(ps.tail, s_mass, m_mass)]
    lower = both + _waterfill_min(cells, m_mass)

    # --- upper over pi, termwise maxima under q >= floor
    upper = both
    for x in union:
        if x not in qs.known:
            upper += _term(ps.known[x], floor)
        elif x not in ps.known:
            upper += max(0.0, _term(ps.cap, qs.known[x]))
    p_lo_r = max(0.0, ps.tail - len(p_missing) * ps.cap)
    q_lo_r = max(floor, qs.tail - len(q_missing) * max(qs.cap, floor))
    q_hi_r = max(floor, qs.tail)
    upper += max(_term(a, b) for a in (p_lo_r, ps.tail) for b in (q_lo_r, q_hi_r))

    return KLEstimate(estimate=est, lower=min(lower, est), upper=max(upper, est))


def top1_agree(p_top: Mapping[Hashable, float], q_top: Mapping[Hashable, float]) -> bool:
    """True when the target's most likely token is the reference's (exact ties: any shared top)."""
    if not p_top or not q_top:
        raise ValueError("top1_agree needs at least one listed logprob on each side")
    p_max, q_max = max(p_top.values()), max(q_top.values())
    p_best = {t for t, v in p_top.items() if v == p_max}
    return any(q_top.get(t) == q_max for t in p_best)


def delta_p(ref_logprob: float, tgt_logprob: float) -> float:
    """p_ref - p_tgt of the reference token: > 0 when the target is less sure of it."""
    return math.exp(ref_logprob) - math.exp(tgt_logprob)


@dataclass(frozen=True)
class PositionLogprobs:
    """One teacher-forced position: the reference token and what each side said about it."""

    token: Hashable  # the reference's token here (echoed into the target)
    ref_logprob: float  # the reference's logprob of `token`
    tgt_logprob: float  # the target's logprob of `token`
    ref_top: Mapping[Hashable, float]  # reference's top-k logprobs
    tgt_top: Mapping[Hashable, float]  # target's top-k logprobs


@dataclass(frozen=True)
class TeacherForcedStats:
    """Per-prompt teacher-forced summary (means over the prompt's positions)."""

    kl_mean: float
    kl_lower_mean: float
    kl_upper_mean: float
    kl_p99: float
    top1_agreement: float  # fraction of positions where the top-1 tokens agree
    dp_mean: float
    dp_rms: float
    position_kl: list[float]  # KL estimate per position, nats
    n_positions: int


def teacher_forced_stats(
    positions: Sequence[PositionLogprobs], *, k: int | None = None, floor: float = DEFAULT_FLOOR
) -> TeacherForcedStats | None:
    """Summarise one prompt's positions; None when there are none (an empty continuation).

    The reference token's logprob on each side is passed to `topk_kl` as a known extra value,
    so the most important cell (the greedy token) is never imputed.
    """
    if not positions:
        return None
    kls = [
        topk_kl(
            pos.ref_top,
            pos.tgt_top,
            p_extra={pos.token: pos.ref_logprob},
            q_extra={pos.token: pos.tgt_logprob},
            k=k,
            floor=floor,
        )
        for pos in positions
    ]
    est = np.array([e.estimate for e in kls], dtype=np.float64)
    dps = np.array([delta_p(pos.ref_logprob, pos.tgt_logprob) for pos in positions], dtype=np.float64)
    agree = [top1_agree(pos.ref_top, pos.tgt_top) for pos in positions]
    return TeacherForcedStats(
        kl_mean=float(est.mean()),
        kl_lower_mean=float(np.mean([e.lower for e in kls])),
        kl_upper_mean=float(np.mean([e.upper for e in kls])),
        kl_p99=p99(est),  # inf-safe: numpy's interpolation makes inf - inf NaN
        top1_agreement=float(np.mean(agree)),
        dp_mean=float(dps.mean()),
        dp_rms=float(np.sqrt(np.mean(dps * dps))),
        position_kl=[float(v) for v in est],
        n_positions=len(positions),
    )


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """log-softmax in float64; -inf logits (masked tokens) stay -inf."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def full_kl(logits_p: np.ndarray, logits_q: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """Exact KL(softmax(p) || softmax(q)) over the full vocabulary, nats, per row.

    Shapes `[..., vocab]`; returns a float for 1-D input, else an array of the leading shape.
    Tokens with p = 0 contribute 0; p > 0 where q = 0 gives +inf; NaN propagates.
    """
    a = np.asarray(logits_p, dtype=np.float64)
    b = np.asarray(logits_q, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
    lp, lq = log_softmax(a, axis), log_softmax(b, axis)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), np.where(np.isnan(p), np.nan, 0.0))
    out = terms.sum(axis=axis)
    return float(out) if out.ndim == 0 else out
