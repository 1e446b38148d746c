"""Token-level metrics of free-running greedy generation: match rate, prefix, first divergence.

At the first divergence we ask *why* the two sides parted, from the reference's own top-k
logprobs at that position (docs/design.md "Metrics"):

- TIE   the reference itself could not tell its top choices apart (margin under the noise
        floor), and the target picked one of those near-tied tokens: accumulation-order noise.
- DRIFT the target picked a token the reference also rated plausible (in its top-k).
- WRONG the target picked a token the reference did not list at all.

Pure functions; token ids or token strings, as long as both sides use the same kind.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

DivergenceKind = Literal["TIE", "DRIFT", "WRONG"]

# docs/design.md "Metrics": a prompt is garbled when fewer than half of its positions match.
GARBLED_BELOW = 0.5


@dataclass(frozen=True)
class TokenMatch:
    """Positional comparison of two generated sequences.

    `match_rate` = (positions i < min(len) where ref[i] == tgt[i]) / max(len(ref), len(tgt)).
    The denominator is the *longer* length so that a target that stops early (or runs on past
    the reference's EOS) is charged for the positions it did not match: with min(len) a target
    that emitted one correct token and stopped would score 100%. Two empty sequences match (1.0).
    """

    match_rate: float
    exact: bool
    common_prefix: int  # number of leading positions that agree
    first_divergence: int | None  # index of the first differing position; None when identical
    ref_len: int
    tgt_len: int

    def __bool__(self) -> bool:
        return self.exact


def token_match(ref_ids: Sequence[Hashable], tgt_ids: Sequence[Hashable]) -> TokenMatch:
    """Compare two token sequences position by position (no alignment, no shifting).

    Positional rather than edit-distance alignment on purpose: greedy decoding after a divergence
    is a different continuation, and re-aligning it would hide how early the sides parted.
    When one sequence is a strict prefix of the other, the first divergence is the shorter
    length (the position where one side has a token and the other has none).
    """
    n_ref, n_tgt = len(ref_ids), len(tgt_ids)
    longest = max(n_ref, n_tgt)
    if longest == 0:
        return TokenMatch(1.0, True, 0, None, 0, 0)
    shortest = min(n_ref, n_tgt)
    matches = 0
    prefix: int | None = None
    for i in range(shortest):
        if ref_ids[i] == tgt_ids[i]:
            matches += 1
        elif prefix is None:
            prefix = i
    if prefix is None:
        prefix = shortest
    exact = n_ref == n_tgt and prefix == shortest
    return TokenMatch(
        match_rate=matches / longest,
        exact=exact,
        common_prefix=prefix,
        first_divergence=None if exact else prefix,
        ref_len=n_ref,
        tgt_len=n_tgt,
    )


def top_margin(top_logprobs: Mapping[Hashable, float]) -> float:
    """Top-1 minus top-2 logprob (nats); +inf when fewer than two tokens are listed."""
    vals = sorted(top_logprobs.values(), reverse=True)
    if len(vals) < 2:
        return float("inf")
    return float(vals[0] - vals[1])


def classify_divergence(
    ref_top_logprobs: Mapping[Hashable, float],
    ref_token: Hashable,
    tgt_token: Hashable,
    tie_margin: float,
) -> DivergenceKind:
    """Classify one divergence as "TIE", "DRIFT" or "WRONG".

    Inputs: the reference's top-k logprobs at the divergent position (keys of the same kind as
    the tokens: ids or strings), the token the reference emitted, the token the target emitted,
    and `tie_margin` in nats (from the A/A noise floor: how far apart two logprobs can be and
    still swap places between two runs of the same model).

    Let lp1 >= lp2 be the two largest logprobs in `ref_top_logprobs`, and lp(t) the reference's
    logprob of the target's token t (defined only when t is listed). Rules, in order:

    1. TIE   if lp1 - lp2 <= tie_margin  AND  t is listed AND lp1 - lp(t) <= tie_margin.
             (The reference's top choice was within noise of its runner-up, and the target chose
             a token within noise of the top. If t is the ref's top-2 this is just the first
             condition; t may be deeper only if it too is within the margin.)
    2. DRIFT if t is listed in the reference's top-k (plausible to the reference, but not a tie).
    3. WRONG otherwise: the reference did not rate t among its top-k at all.

    `ref_token` is not used in the rules (the reference's top-1 is read from the logprobs, since a
    greedy reference emits it anyway); it is kept in the signature so that a caller cannot mix up
    the two sides, and a missing `ref_top_logprobs` is refused rather than silently called WRONG.
    """
    if not ref_top_logprobs:
        raise ValueError(
            f"cannot classify divergence {ref_token!r} -> {tgt_token!r}: no reference top logprobs"
        )
    margin, gap = divergence_stats(ref_top_logprobs, tgt_token)
    return classify_from_stats(margin, gap, tie_margin)


def divergence_stats(
    ref_top_logprobs: Mapping[Hashable, float], tgt_token: Hashable
) -> tuple[float, float | None]:
    """The raw numbers a divergence is classified by, measured once and stored:
    (lp1 - lp2, lp1 - lp(t)) — the reference's top-1/top-2 margin and how far below its top-1 it
    rated the target's token t (None when t is not in its top-k)."""
    if not ref_top_logprobs:
        raise ValueError(f"no reference top logprobs at the divergence to {tgt_token!r}")
    lp1 = max(ref_top_logprobs.values())
    gap = float(lp1 - ref_top_logprobs[tgt_token]) if tgt_token in ref_top_logprobs else None
    return top_margin(ref_top_logprobs), gap


def classify_from_stats(margin: float, gap: float | None, tie_margin: float) -> DivergenceKind:
    """TIE / DRIFT / WRONG from `divergence_stats` (rules in `classify_divergence`)."""
    if not tie_margin >= 0:  # also refuses NaN
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin!r}")
    if gap is None:
        return "WRONG"
    return "TIE" if margin <= tie_margin and gap <= tie_margin else "DRIFT"


def is_garbled(match_rate: float) -> bool:
    """A prompt is garbled when its match rate is under 0.5 (NaN counts as garbled)."""
    return not match_rate >= GARBLED_BELOW
