"""Metrics: pure functions over numbers and arrays, float64, per prompt first, aggregated after.

    tokens.py     free-running token match, first divergence, TIE / DRIFT / WRONG, garbled
    logprobs.py   teacher-forced KL (top-k with tail bucket, bounds), top-1 agreement, delta-p
    text.py       sacreBLEU BLEU and chrF with signatures
    tensors.py    cosine, norm ratio, max abs / relative error, SQNR
    stats.py      seeded percentile bootstrap CIs, p99
    aggregate.py  PromptDiff list -> Comparison.aggregate / .ci (every key documented there)

No I/O, no HTTP, no torch.
"""

from __future__ import annotations

from difftest.metrics.aggregate import CI_KEYS, aggregate_prompts, fill_generation, fill_teacher_forced
from difftest.metrics.logprobs import (
    DEFAULT_FLOOR,
    KLEstimate,
    PositionLogprobs,
    TeacherForcedStats,
    delta_p,
    full_kl,
    log_softmax,
    teacher_forced_stats,
    top1_agree,
    topk_kl,
)
from difftest.metrics.stats import bootstrap_mean_ci, bootstrap_ratio_ci, p99, percentile
from difftest.metrics.tensors import (
    TensorDiff,
    cosine,
    max_abs_err,
    norm_ratio,
    rel_err,
    sqnr_db,
    tensor_diff,
)
from difftest.metrics.text import TextScores, sentence_bleu, sentence_chrf, signatures, text_scores
from difftest.metrics.tokens import TokenMatch, classify_divergence, is_garbled, token_match, top_margin

__all__ = [
    "CI_KEYS",
    "DEFAULT_FLOOR",
    "KLEstimate",
    "PositionLogprobs",
    "TeacherForcedStats",
    "TensorDiff",
    "TextScores",
    "TokenMatch",
    "aggregate_prompts",
    "bootstrap_mean_ci",
    "bootstrap_ratio_ci",
    "classify_divergence",
    "cosine",
    "delta_p",
    "fill_generation",
    "fill_teacher_forced",
    "full_kl",
    "is_garbled",
    "log_softmax",
    "max_abs_err",
    "norm_ratio",
    "p99",
    "percentile",
    "rel_err",
    "sentence_bleu",
    "sentence_chrf",
    "signatures",
    "sqnr_db",
    "teacher_forced_stats",
    "tensor_diff",
    "text_scores",
    "token_match",
    "top1_agree",
    "top_margin",
    "topk_kl",
]
