"""Metric formulas on hand-made cases whose values are known in advance."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_model

from crome.evaluation.datasets import Case
from crome.evaluation.scores import case_metrics, case_pairs
from crome.request import EditRequest
from crome.scoring.measure import TargetScore, score_targets, target_logprob
from crome.scoring.metrics import (
    accuracy,
    agreement,
    fluency,
    harmonic_mean,
    mean_ci,
    ngram_entropy,
    prob,
    score_and_magnitude,
)


def test_prob_is_exp_of_mean_token_logprob():
    assert prob([math.log(0.5), math.log(0.125)]) == pytest.approx(0.25)


def test_score_and_magnitude():
    assert score_and_magnitude([0.6, 0.1, 0.3], [0.2, 0.4, 0.3]) == pytest.approx((1 / 3, (0.4 - 0.3 + 0) / 3))
    s, m = score_and_magnitude([], [])
    assert math.isnan(s) and math.isnan(m)


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean([1.0, 0.0]) == 0.0
    assert math.isnan(harmonic_mean([1.0, math.nan]))


def test_accuracy_and_locality_agreement():
    assert accuracy([True, False, True, True]) == 0.75
    assert agreement([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        agreement([1, 2], [1])


def test_ngram_entropy_known_values():
    # bigrams of "a b a b": (a,b) twice, (b,a) once -> H = -(2/3 log2 2/3 + 1/3 log2 1/3)
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b", 2) == pytest.approx(h)
    assert ngram_entropy("x y z w", 3) == pytest.approx(1.0)  # two distinct trigrams
    assert ngram_entropy("one", 2) == 0.0
    # fluency = mean over texts of mean(2/3 H2, 4/3 H3); "a a a a": every n-gram the same -> 0
    assert fluency(["a a a a"]) == 0.0
    assert fluency(["x y z w"]) == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)


def test_mean_ci_matches_student_t():
    m, half, n = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert (m, n) == (2.5, 4)
    # t(0.975, 3) = 3.182446; sd = 1.290994
    assert half == pytest.approx(3.182446 * 1.290994 / 2, rel=1e-5)
    assert mean_ci([math.nan, 2.0])[:1] == (2.0,)


def _score(p_tokens, predicted=None, target=None):
    target = target or list(range(len(p_tokens)))
    return TargetScore([math.log(p) for p in p_tokens], predicted or target, target)


def test_case_metrics_from_known_scores():
    case = Case("7", EditRequest.create("{} plays", "Ann", "chess", "golf"),
                paraphrase_prompts=["p1", "p2"], neighborhood_prompts=["n1"], neighborhood_target="golf")
    pairs, where = case_pairs(case)
    assert [t for _, t in pairs] == ["chess", "golf"] * 3 + ["chess", "golf"]
    after = [
        _score([0.8], predicted=[0]), _score([0.1]),             # rewrite: new wins, argmax right
        _score([0.3]), _score([0.5]),                            # paraphrase 1: true wins
        _score([0.6, 0.6], predicted=[0, 9]), _score([0.2]),     # paraphrase 2: new wins, 1 of 2 tokens right
        _score([0.4]), _score([0.1, 0.1], predicted=[5, 6]),     # neighborhood: new wins (bad)
    ]
    before = list(after)
    before[7] = _score([0.1, 0.1], predicted=[5, 7])             # the unedited model predicted 5, 7
    m = case_metrics(after, where, before)
    assert m["es"] == 1 and m["em"] == pytest.approx(0.7)
    assert m["ps"] == 0.5 and m["pm"] == pytest.approx(((0.3 - 0.5) + (0.6 - 0.2)) / 2)
    assert m["ns"] == 0 and m["nm"] == pytest.approx(0.1 - 0.4)
    assert m["rewrite_acc"] == 1.0
    assert m["rephrase_acc"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["locality"] == 0.5


def test_score_targets_agrees_with_full_forward(tokenizer):
    lm = tiny_model("llama", tokenizer)
    pairs = [("The capital of France is", "Paris"), ("Water is", "wet and cold"), ("I", "see")]
    for prefix in (None, "It rained."):
        scores = score_targets(lm, pairs, prefix=prefix, batch_size=2)
        for (prompt, target), s in zip(pairs, scores):
            assert sum(s.logprobs) == pytest.approx(target_logprob(lm, prompt, target, prefix=prefix), abs=1e-4)
            assert len(s.predicted) == len(s.target) == len(s.hits)
