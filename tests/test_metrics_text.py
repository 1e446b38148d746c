"""BLEU / chrF through sacrebleu: hand value, and corpus scores against sacrebleu's functional API."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from difftest.metrics.text import sentence_bleu, sentence_chrf, signatures, text_scores

REFS = ["the cat sat on a mat", "1 + 2 + 3 = 6", "Bonjour le monde", "def f(x):\n    return x * 2"]
HYPS = ["the cat sat on the mat", "1 + 2 + 3 = 6", "Salut le monde", ""]


def test_sentence_bleu_hand_value():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (13a tokens):
    # 1-gram 5/6, 2-gram 3/5 (the cat, cat sat, sat on), 3-gram 2/4, 4-gram 1/3; BP = 1 (6 vs 6)
    # BLEU = (5/6 * 3/5 * 2/4 * 1/3)^(1/4) = (1/12)^(1/4) = 0.537285 -> 53.73
    assert sentence_bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(
        100 * (1 / 12) ** 0.25, abs=1e-9
    )


def test_corpus_scores_match_sacrebleu_functional_api():
    s = text_scores(HYPS, REFS)
    # independent path: sacrebleu's module-level corpus functions
    assert s.bleu == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-12)
    assert s.chrf == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-12)
    # corpus BLEU is corpus statistics, not the mean of sentence scores
    assert s.bleu != pytest.approx(sum(s.segment_bleu) / len(s.segment_bleu), abs=1e-3)
    assert len(s.segment_bleu) == len(s.segment_chrf) == 4
    assert s.segment_bleu[1] == 100.0  # identical
    assert s.segment_bleu[3] == 0.0  # a failed request passed as "" scores 0
    assert s.segment_chrf[3] == 0.0
    assert s.segment_bleu[2] == pytest.approx(sacrebleu.sentence_bleu(HYPS[2], [REFS[2]]).score, abs=1e-12)
    assert s.segment_chrf[2] == pytest.approx(sacrebleu.sentence_chrf(HYPS[2], [REFS[2]]).score, abs=1e-12)


def test_signatures_name_settings_and_version():
    s = text_scores(["a b"], ["a b"])
    assert "tok:13a" in s.bleu_signature and f"version:{sacrebleu.__version__}" in s.bleu_signature
    assert "nc:6" in s.chrf_signature
    assert signatures() == {"bleu": s.bleu_signature, "chrf": s.chrf_signature}
    assert "tok:char" in text_scores(["a"], ["a"], tokenize="char").bleu_signature


def test_identical_empty_segments_score_100_and_empty_corpus_is_nan():
    assert sentence_bleu("", "") == 100.0
    assert sentence_chrf("", "") == 100.0
    assert sentence_chrf("", "abc") == 0.0
    s = text_scores([], [])
    assert math.isnan(s.bleu) and math.isnan(s.chrf)
    with pytest.raises(ValueError):
        text_scores(["a"], [])


def test_segment_scores_match_sacrebleu_sentence_api_on_many_segments():
    hyps = [f"word{i} and more words {i % 3}" for i in range(30)] + ["x ."]
    refs = [f"word{i} and some words {i % 5}" for i in range(30)] + ["x ."]
    s = text_scores(hyps, refs)
    for h, r, sb, sc in zip(hyps, refs, s.segment_bleu, s.segment_chrf, strict=True):
        assert sb == pytest.approx(100.0 if h == r else sacrebleu.sentence_bleu(h, [r]).score, abs=1e-9)
        assert sc == pytest.approx(100.0 if h == r else sacrebleu.sentence_chrf(h, [r]).score, abs=1e-9)
    assert s.bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-12)


def test_sliced_statistics_equal_sacrebleus_corpus_scores(monkeypatch) -> None:
    """Statistics extracted in slices (bounded memory) sum to exactly sacrebleu's corpus scores."""
    import random

    from sacrebleu import corpus_bleu, corpus_chrf

    from difftest.metrics import text

    monkeypatch.setattr(text, "STATS_SLICE", 7)  # 30 segments: 5 slices, the last one partial
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "fox",
        "dog",
        "runs",
        "over",
        "lazy",
        "quick",
        "brown",
        "1",
        "2",
        "3",
        "def",
        "return",
    ]
    hyps = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(30)]
    refs = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(30)]
    scores = text.text_scores(hyps, refs)
    assert scores.bleu == corpus_bleu(hyps, [refs]).score
    assert scores.chrf == corpus_chrf(hyps, [refs]).score
    assert len(scores.segment_bleu) == len(scores.segment_chrf) == 30
