"""The collapse guard: check an edit, and roll it back when it damages the model.

Two checks, usable together:

* ``verify`` (the default of ``crome edit``) applies the edit, measures perplexity on
  a small probe set (the bundled passages, with the fast monitor) and restores the
  exact original weights when perplexity grew by more than ``threshold`` (default 2).
  It needs no calibration and works on any model.
* a predictive rule (``GuardRule``), a cheap pre-check that reads only the diagnostics
  known before the weights are touched: one threshold on the update ratio ‖ΔW‖/‖W‖,
  the denominator k_cur·u or cos(k^u, k̄). A rule is calibrated per model
  (``crome analyze guard --calibrate`` writes ``guard_rule.json``, ``--guard-rule FILE``
  reads it) and carries the model and settings it was calibrated on. crome ships one
  for its default model (``DEFAULT_RULES``); other models have none until calibrated.

Actions: ``off``; ``refuse`` (the rule predicts a collapse: weights untouched, exit 3);
``verify`` (apply, measure, roll back on damage: exit 3); ``fallback`` (edit with the
method; if the rule or the probe rejects it, try C-ROME and verify that; refuse if it
fails too).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from ..errors import CromeError

GUARD_ACTIONS = ("off", "refuse", "verify", "fallback")
VERIFY_THRESHOLD = 2.0
FEATURES = ("update_ratio", "denominator", "cos_bare_mean")


@dataclass(frozen=True)
class GuardRule:
    feature: str          # a Diagnostics field
    threshold: float
    above: bool           # True: collapse predicted when feature > threshold; False: when below
    model: str | None = None      # the model it was calibrated on (None: not recorded)
    calibration: str = ""         # on what: data, method, layer, key statistics, counts

    @classmethod
    def load(cls, path) -> "GuardRule":
        from pathlib import Path

        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: data[k] for k in ("feature", "threshold", "above")},
                       model=data.get("model"), calibration=data.get("calibration", ""))
        except FileNotFoundError:
            raise CromeError(f"guard rule file not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CromeError(f"{path}: not a guard rule file ({type(exc).__name__}: {exc})") from None

    def save(self, path) -> None:
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def check_model(self, model: str) -> None:
        if self.model is not None and self.model != model:
            raise CromeError(f"the guard rule was calibrated on {self.model}, not {model}: "
                             f"calibrate one for this model (crome analyze guard --calibrate)")

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
# layer 6, seed 0, mom2 off; benchmarks/reproduce.py): the split fell at 0.891. It is a rule for that
# model only; any other model needs its own (crome analyze guard --calibrate).
DEFAULT_RULE = GuardRule(feature="update_ratio", threshold=0.89, above=True, model="smollm2-135m-instruct",
                         calibration="counterfact-train, rome, layer 6, mom2 off, 82 edits (8 collapsed)")
DEFAULT_RULES = {DEFAULT_RULE.model: DEFAULT_RULE}


def rule_for(model: str, path=None) -> GuardRule | None:
    """The rule in ``path`` (checked against ``model``), else the shipped rule for ``model``, else None."""
    if path is not None:
        rule = GuardRule.load(path)
        rule.check_model(model)
        return rule
    return DEFAULT_RULES.get(model)


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
    """See ``calibrate_split``; the rule records the model and settings of ``records``."""
    rule = calibrate_split(records)
    r0 = records[0]
    judged = [r for r in records if r.get("collapsed") is not None]
    stats = (r0.get("key_stats") or {}).get("source", "off")
    return GuardRule(rule.feature, rule.threshold, rule.above, model=r0.get("model"),
                     calibration=f"{r0.get('data')}, {r0.get('method')}, layer {r0.get('layer')}, key statistics "
                                 f"{stats}, {len(judged)} edits ({sum(bool(r['collapsed']) for r in judged)} collapsed)")


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


class GuardRefused(CromeError):
    """The guard refused or rolled back an edit (``crome edit`` exits with code 3).
    ``edit`` is the last edit tried, ``decision`` what the guard did."""

    exit_code = 3

    def __init__(self, message: str, edit=None, decision: dict | None = None):
        super().__init__(message)
        self.edit, self.decision = edit, decision or {}


class Verifier:
    """Perplexity on a probe set after an edit at ``layer``, against the unedited model."""

    def __init__(self, lm, layer: int, texts: list[str] | None = None, threshold: float = VERIFY_THRESHOLD):
        from ..evaluation.texts import load_texts
        from .fast import PerplexityMonitor

        if not threshold > 0:
            raise CromeError(f"the guard threshold must be a positive perplexity ratio, not {threshold}")
        self.threshold = threshold
        self.monitor = PerplexityMonitor(lm, texts or load_texts(), layer)

    @property
    def layer(self) -> int:
        return self.monitor.layer

    def ratio(self) -> float:
        return self.monitor() / self.monitor.baseline


def guarded_apply(lm, request, method: str, action: str = "off", *, rule: GuardRule | None = None,
                  verifier: Verifier | None = None, prepared=None, **edit_kwargs):
    """Compute an edit, let the guard judge it, apply it if it passes. ``prepared``: the request's
    keys and v* when already computed (``prepare_edits``), else they are computed here.

    Returns (edit, handle, decision): ``handle`` is the applied edit (None when the update
    is not finite, which is never applied). Raises ``GuardRefused`` (weights untouched or
    restored bit for bit) when the guard stops every edit it tried."""
    from .edit import apply_edit, check_method, finish_edit, prepare_edit, resolve_stats

    check_method(method)
    if action not in GUARD_ACTIONS:
        raise CromeError(f"unknown guard action '{action}': choose one of {', '.join(GUARD_ACTIONS)}")
    if action == "refuse" and rule is None:
        raise CromeError(f"--guard refuse needs a rule calibrated for {lm.name} (crome analyze guard --calibrate, "
                         f"then --guard-rule FILE); --guard verify needs none")
    verifying = action in ("verify", "fallback")
    if verifying and verifier is None:
        raise CromeError(f"--guard {action} needs a verifier (probe perplexity)")
    rule = rule if action != "off" else None
    decision = dict(guard=action, guard_rule=rule.to_dict() if rule else None, guard_predicted_collapse=None,
                    guard_ppl_ratio=None, guard_threshold=verifier.threshold if verifying else None,
                    guard_action="applied", edited_with=method)
    methods = [method, "crome"] if action == "fallback" and method != "crome" else [method]
    mom2 = edit_kwargs.pop("mom2", None)
    if prepared is None:
        prepared = prepare_edit(lm, request, **edit_kwargs)  # keys and v* are the same for every method
    elif prepared.request != request:
        raise CromeError("the prepared keys and v* are for another request")
    stats = resolve_stats(lm, prepared.hparams, mom2)
    problems, edit = [], None
    for m in methods:
        edit = finish_edit(lm, prepared, m, stats)
        if verifying and verifier.layer != edit.layer:
            raise CromeError(f"the guard's probe is for layer {verifier.layer}, the edit is at layer {edit.layer}")
        decision["edited_with"] = m
        if rule is not None:
            predicted = rule.predicts_collapse(edit.diagnostics)
            decision["guard_predicted_collapse"] = predicted
            if predicted:
                problems.append(f"{m}: {rule.reason(edit.diagnostics)}")
                if action == "refuse":
                    break
                continue
        if not edit.diagnostics.finite:
            if action == "fallback":
                problems.append(f"{m}: non-finite update")
                continue
            return edit, None, decision
        handle = apply_edit(lm, edit)
        if verifying:
            ratio = verifier.ratio()
            decision["guard_ppl_ratio"] = ratio
            if not ratio <= verifier.threshold:  # NaN fails too
                handle.restore()
                problems.append(f"{m}: probe perplexity grew {ratio:.3g}x > {verifier.threshold:g}, rolled back")
                continue
        if m != method:
            decision["guard_action"] = f"fallback: crome instead of {method}"
        return edit, handle, decision
    decision["guard_action"] = "rolled back" if decision["guard_ppl_ratio"] is not None and action == "verify" else "refused"
    raise GuardRefused(f"guard {decision['guard_action']} the {method} edit: " + "; ".join(problems), edit, decision)
