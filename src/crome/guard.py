"""The collapse guard: predict, before the weights are touched, whether an edit would collapse the model.

It reads only the diagnostics an edit has before it is applied (``edit.Diagnostics``):
the denominator k_cur·u, the update ratio ‖ΔW‖/‖W‖, cos(k^u, k̄) and the first-token
flag. The rule is one threshold on one of them, chosen by ``calibrate`` on eval
records whose collapse verdict is known (the F1-best split; ties go to the
scale-free update ratio). ``DEFAULT_RULE`` was calibrated on ROME edits of
counterfact-train on the default model (docs/REPRODUCTION.md, benchmarks/reproduce.py).

Actions: ``refuse`` (leave the weights untouched, exit 3), ``fallback`` (make the
C-ROME edit instead), ``off``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import CromeError

GUARD_ACTIONS = ("off", "refuse", "fallback")
FEATURES = ("update_ratio", "denominator", "cos_bare_mean")


@dataclass(frozen=True)
class GuardRule:
    feature: str          # a Diagnostics field
    threshold: float
    above: bool           # True: collapse predicted when feature > threshold; False: when below

    def predicts_collapse(self, diagnostics) -> bool:
        value = diagnostics[self.feature] if isinstance(diagnostics, dict) else getattr(diagnostics, self.feature)
        finite = diagnostics["finite"] if isinstance(diagnostics, dict) else diagnostics.finite
        if value is None or not finite or not math.isfinite(value):
            return True
        return value > self.threshold if self.above else value < self.threshold

    def reason(self, diagnostics) -> str:
        value = diagnostics[self.feature] if isinstance(diagnostics, dict) else getattr(diagnostics, self.feature)
        sign = ">" if self.above else "<"
        return f"{self.feature} = {value:.4g} {sign} {self.threshold:.4g}: this edit is predicted to collapse the model"

    def to_dict(self) -> dict:
        return asdict(self)


# Calibrated (guard.calibrate) on 82 ROME edits of counterfact-train, 8 of them collapsed (default model,
# layer 6, seed 0; benchmarks/reproduce.py): the split fell at 0.891. ‖ΔW‖/‖W‖ is scale-free, so the
# rule carries over to other models better than a raw denominator would.
DEFAULT_RULE = GuardRule(feature="update_ratio", threshold=0.89, above=True)


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def precision_recall(rule: GuardRule, records: list[dict]) -> dict:
    """Precision, recall and counts of ``rule`` on eval records with a collapse verdict."""
    judged = [r for r in records if r.get("collapsed") is not None]
    pred = [rule.predicts_collapse(r) for r in judged]
    truth = [bool(r["collapsed"]) for r in judged]
    tp = sum(p and t for p, t in zip(pred, truth))
    fp = sum(p and not t for p, t in zip(pred, truth))
    fn = sum(t and not p for p, t in zip(pred, truth))
    return dict(n=len(judged), collapsed=sum(truth), predicted=sum(pred), tp=tp, fp=fp, fn=fn,
                precision=tp / (tp + fp) if tp + fp else math.nan,
                recall=tp / (tp + fn) if tp + fn else math.nan, f1=_f1(tp, fp, fn))


def calibrate(records: list[dict]) -> GuardRule:
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


class GuardRefused(CromeError):
    """The guard refused an edit (``crome edit`` exits with code 3)."""

    exit_code = 3


def guarded_edit(lm, request, method: str, action: str = "off", rule: GuardRule = DEFAULT_RULE, **edit_kwargs):
    """Compute the edit and let the guard judge it before anything is applied.

    Returns (edit, decision). ``refuse`` raises ``GuardRefused`` when a collapse is
    predicted; ``fallback`` then computes the C-ROME edit instead."""
    from .edit import compute_edit

    if action not in GUARD_ACTIONS:
        raise CromeError(f"unknown guard action '{action}': choose one of {', '.join(GUARD_ACTIONS)}")
    edit = compute_edit(lm, request, method, **edit_kwargs)
    decision = dict(guard=action, guard_rule=rule.to_dict() if action != "off" else None,
                    guard_predicted_collapse=None, guard_action="applied")
    if action == "off":
        return edit, decision
    predicted = rule.predicts_collapse(edit.diagnostics)
    decision["guard_predicted_collapse"] = predicted
    if predicted:
        reason = rule.reason(edit.diagnostics)
        if action == "refuse":
            refusal = GuardRefused(f"guard refused the {method} edit: {reason}")
            refusal.edit = edit
            raise refusal
        decision["guard_action"] = f"fallback: crome instead of {method}" if method != "crome" else "applied (already crome)"
        if method != "crome":
            edit = compute_edit(lm, request, "crome", **edit_kwargs)
    return edit, decision
