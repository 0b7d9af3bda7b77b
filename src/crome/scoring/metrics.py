"""Metric formulas, free of any model: the numbers ``crome eval`` reports.

CounterFact family (Meng et al. 2022, ROME; docs/EVAL.md):

* P(target | prompt) = exp(mean log-prob of the target's tokens), as in ROME's
  evaluation code;
* score over a set of prompts = share of prompts where P(new) > P(true)
  (efficacy ES, paraphrase PS) or P(true) > P(new) (neighborhood NS);
  magnitude = mean of P(new) − P(true) (EM, PM) or P(true) − P(new) (NM);
* S = harmonic mean of ES, PS and NS;
* fluency = mean over generated texts of (2/3·H2 + 4/3·H3)/2, with Hn the
  entropy in bits of the text's n-gram frequencies.

Token-accuracy family ("Fall of ROME" code, EasyEdit):

* rewrite / rephrase accuracy = share of the target's tokens that are the
  argmax prediction when teacher-forced after the prompt;
* locality = share of the locality answer's token positions where the edited
  model's argmax equals the unedited model's.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np


def prob(logprobs: list[float]) -> float:
    """ROME's per-token probability of a target: exp(mean token log-prob)."""
    return math.exp(sum(logprobs) / len(logprobs))


def score_and_magnitude(p_wanted: list[float], p_other: list[float]) -> tuple[float, float]:
    """(share of prompts where the wanted answer is more likely, mean probability margin)."""
    if not p_wanted:
        return math.nan, math.nan
    wins = [a > b for a, b in zip(p_wanted, p_other)]
    return sum(wins) / len(wins), sum(a - b for a, b in zip(p_wanted, p_other)) / len(wins)


def harmonic_mean(values: list[float]) -> float:
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def accuracy(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else math.nan


def agreement(before: list[int], after: list[int]) -> float:
    """Locality: share of positions where the edited model predicts what the unedited one did."""
    if len(before) != len(after):
        raise ValueError("locality needs predictions at the same positions")
    return accuracy([a == b for a, b in zip(before, after)])


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, n: int) -> float:
    """Entropy (bits) of the frequency distribution of word n-grams in ``text``."""
    words = _WORD.findall(text.lower())
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    if not total:
        return 0.0
    freqs = np.array(list(grams.values()), dtype=float) / total
    return float(-(freqs * np.log2(freqs)).sum())


def fluency(texts: list[str]) -> float:
    """ROME's generation entropy: mean over texts of mean(2/3·H2, 4/3·H3)."""
    if not texts:
        return math.nan
    return float(np.mean([np.mean([2 / 3 * ngram_entropy(t, 2), 4 / 3 * ngram_entropy(t, 3)]) for t in texts]))


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, int]:
    """Mean, half-width of its Student-t confidence interval, and the count (NaNs dropped)."""
    from scipy import stats

    x = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) == 1:
        return float(x[0]), math.nan, 1
    half = stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)
