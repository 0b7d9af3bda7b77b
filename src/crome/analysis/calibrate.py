"""Calibrating the guard's predictive rule (``GuardRule``) on eval records, and scoring a rule:
``crome analyze guard --calibrate`` (``analyze.guard_analysis``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

from ..editing.rules import GuardRule

FEATURES = ("update_ratio", "denominator", "cos_bare_mean")


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def precision_recall(rule: GuardRule, records: list[dict]) -> dict:
    """Precision, recall and counts of ``rule`` on eval records with a collapse verdict."""
    judged = [r for r in records if r.get("collapsed") is not None]
    pred = [rule.predicts_collapse(SimpleNamespace(**r)) for r in judged]   # a record's diagnostics fields
    truth = [bool(r["collapsed"]) for r in judged]
    tp = sum(p and t for p, t in zip(pred, truth))
    fp = sum(p and not t for p, t in zip(pred, truth))
    fn = sum(t and not p for p, t in zip(pred, truth))
    return dict(n=len(judged), collapsed=sum(truth), predicted=sum(pred), tp=tp, fp=fp, fn=fn,
                precision=tp / (tp + fp) if tp + fp else math.nan,
                recall=tp / (tp + fn) if tp + fn else math.nan, f1=_f1(tp, fp, fn))


def calibrate(records: list[dict]) -> GuardRule:
    """See ``calibrate_split``; the rule records the model and settings of ``records``."""
    rule = calibrate_split(records)
    r0 = records[0]
    judged = [r for r in records if r.get("collapsed") is not None]
    stats = (r0.get("key_stats") or {}).get("source", "off")
    collapsed = sum(bool(r["collapsed"]) for r in judged)
    return GuardRule(rule.feature, rule.threshold, rule.above, model=r0.get("model"),
                     calibration=f"{r0.get('data')}, {r0.get('method')}, layer {r0.get('layer')}, key statistics "
                                 f"{stats}, {len(judged)} edits ({collapsed} collapsed)")


def calibrate_split(records: list[dict]) -> GuardRule:
    """The single-feature threshold with the best F1 on ``records``; thresholds sit midway
    between neighbouring values (in log space for the positive features)."""
    judged = [r for r in records if r.get("collapsed") is not None and r.get("finite", True)]
    if not any(r["collapsed"] for r in judged):
        raise ValueError("calibration needs at least one collapsed edit")
    best, best_key = [], None
    for order, feature in enumerate(FEATURES):
        values = sorted({r[feature] for r in judged if r.get(feature) is not None})
        log = feature != "cos_bare_mean" and values[0] > 0
        cuts = [math.sqrt(a * b) if log else (a + b) / 2 for a, b in zip(values, values[1:])]
        for above in (True, False):
            for cut in cuts:
                rule = GuardRule(feature, cut, above)
                pr = precision_recall(rule, judged)
                key = (pr["f1"], pr["recall"], -order, above)
                if best_key is None or key > best_key:
                    best, best_key = [rule], key
                elif key == best_key:
                    best.append(rule)
    # equally good thresholds span a gap between two values: take the one in its middle
    lo, hi = best[0].threshold, best[-1].threshold
    log = best[0].feature != "cos_bare_mean" and lo > 0
    return GuardRule(best[0].feature, math.sqrt(lo * hi) if log else (lo + hi) / 2, best[0].above)
