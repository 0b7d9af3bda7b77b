"""The collapse guard: check an edit, and roll it back when it damages the model.

Two checks, usable together:

* ``verify`` (the default of ``crome edit``) applies the edit, measures perplexity on
  a small probe set (the bundled passages, with the fast monitor) and checks that the
  edit took (``Efficacy``: P(new target) on its own prompt rose and ends above P(old
  target)); it restores the exact original weights when perplexity grew by more than
  ``threshold`` (default ``VERIFY_THRESHOLD``, 1.2: "damaged the model") or the edit
  did not take ("did not take"). It needs no per-model calibration.
* a predictive rule (``GuardRule``), a cheap pre-check that reads only the diagnostics
  known before the weights are touched: one threshold on the update ratio ‖ΔW‖/‖W‖,
  the denominator k_cur·u or cos(k^u, k̄). A rule is calibrated per model
  (``crome analyze guard --calibrate`` writes ``guard_rule.json``, ``--guard-rule FILE``
  reads it) and carries the model and settings it was calibrated on. crome ships one
  for its default model (``DEFAULT_RULES``); other models have none until calibrated.

Actions: ``off``; ``refuse`` (the rule predicts a collapse: weights untouched, exit 3);
``verify`` (apply, measure, roll back on damage or when it did not take: exit 3);
``fallback`` (edit with the method; if the rule or the checks reject it, try C-ROME at
the same layer, then one layer up and one down, verifying each; refuse if all fail).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from ..errors import CromeError

GUARD_ACTIONS = ("off", "refuse", "verify", "fallback")
# Calibrated on clean single edits (they took, with an update under 0.5‖W‖) of both real models: probe
# ratio at most ×1.03 on SmolLM2, ×1.09 on Gemma 3 (benchmarks/layer_sweep.py; docs/MODELS.md, "Layer
# choice"), so 1.2 leaves twice the largest clean rise; edits that damage
# the model sit at ×1.3 and above (the held-out report's failed edits: ×1.3–1.5; ROME's large updates).
VERIFY_THRESHOLD = 1.2
# The context an edit's efficacy is checked in: C-ROME's edit is learned for prefixed contexts
# ("The Fall of ROME" queries it after a test-time prefix), ROME's for the bare prompt.
PREFIXED_TEST = {"rome": False, "crome": True}
# ``crome edit`` warns that an edit is unlikely to take beyond these (docs/MODELS.md, "Layer choice")
WARN_VALUE_SHIFT = 8.0
WARN_OUTLIER = 4.0


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

        from .edit import Diagnostics

        try:
            data = json.loads(Path(path).read_text())
            feature, threshold, above = (data[k] for k in ("feature", "threshold", "above"))
        except FileNotFoundError:
            raise CromeError(f"guard rule file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CromeError(f"{path}: not a guard rule file ({type(exc).__name__}: {str(exc)[:80]})") from None
        numeric = isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold)
        known = isinstance(feature, str) and feature in Diagnostics.__dataclass_fields__
        if not known or not numeric or not isinstance(above, bool):
            raise CromeError(f"{path}: not a guard rule file (feature must name a diagnostic, threshold be a "
                             f"finite number, above be true or false)")
        model, calibration = data.get("model"), data.get("calibration", "")
        if not isinstance(model, (str, type(None))) or not isinstance(calibration, str):
            raise CromeError(f"{path}: not a guard rule file (model and calibration must be strings)")
        return cls(feature, float(threshold), above, model=model, calibration=calibration)

    def save(self, path) -> None:
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def check_model(self, model: str) -> None:
        if self.model is not None and self.model != model:
            raise CromeError(f"the guard rule was calibrated on {self.model}, not {model}: "
                             f"calibrate one for this model (crome analyze guard --calibrate)")

    def predicts_collapse(self, diagnostics) -> bool:
        """``diagnostics``: an edit's ``Diagnostics``."""
        value = getattr(diagnostics, self.feature)
        if value is None or not diagnostics.finite or not math.isfinite(value):
            return True
        return value > self.threshold if self.above else value < self.threshold

    def reason(self, diagnostics) -> str:
        value = getattr(diagnostics, self.feature)
        sign = ">" if self.above else "<"
        return f"{self.feature} = {value:.4g} {sign} {self.threshold:.4g}: this edit is predicted to collapse the model"

    def to_dict(self) -> dict:
        return asdict(self)


# Calibrated (analysis.calibrate) on 82 ROME edits of counterfact-train, 8 of them collapsed (default model,
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


class GuardRefused(CromeError):
    """The guard refused or rolled back an edit (``crome edit`` exits with code 3).
    ``edit`` is the last edit tried, ``decision`` what the guard did."""

    exit_code = 3

    def __init__(self, message: str, edit=None, decision: "GuardDecision | None" = None):
        super().__init__(message)
        self.edit, self.decision = edit, decision


class Verifier:
    """What the guard measures after an edit: perplexity on a probe set against the unedited
    model, and (``efficacy``) whether the edit took on its own prompt (``Efficacy``)."""

    def __init__(self, lm, layer: int, texts: list[str] | None = None, threshold: float = VERIFY_THRESHOLD,
                 efficacy: bool = True):
        from ..evaluation.texts import load_texts
        from .fast import PerplexityMonitor

        if not threshold > 0:
            raise CromeError(f"the guard threshold must be a positive perplexity ratio, not {threshold}")
        self.threshold, self.efficacy = threshold, efficacy
        self.monitor = PerplexityMonitor(lm, texts or load_texts(), layer)

    @property
    def layer(self) -> int:
        return self.monitor.layer

    def ratio(self, layer: int | None = None) -> float:
        """Probe perplexity now against the unedited model's, seen from an edit at ``layer``."""
        monitor = self.monitor.at(self.layer if layer is None else layer)
        return monitor() / monitor.baseline


@dataclass
class Efficacy:
    """Did the edit take? On the edit's own prompt (after the test prefix where the method needs
    one, ``PREFIXED_TEST``), P(new target) must rise and end above P(old target): CounterFact's
    efficacy test (per-token probabilities, ``metrics.prob``) on one prompt."""

    target_old: str | None        # None: the model already answered with the new target
    prefix: str | None
    p_new_before: float
    p_new_after: float | None = None
    p_old_after: float | None = None

    @property
    def took(self) -> bool:
        return (self.p_new_after is not None and self.p_new_after > self.p_new_before
                and (self.p_old_after is None or self.p_new_after > self.p_old_after))

    def reason(self, target_new: str) -> str:
        where = f" after the prefix {self.prefix!r}" if self.prefix else ""
        old = f", P({self.target_old}) {self.p_old_after:.3g}" if self.target_old is not None else ""
        return f"did not take: P({target_new}){where} {self.p_new_before:.3g} -> {self.p_new_after:.3g}{old}"

    def record(self) -> dict:
        return asdict(self)


def _probs(lm, prompt: str, targets: list[str], prefix: str | None) -> list[float]:
    from ..evaluation.measure import score_targets
    from ..evaluation.metrics import prob

    return [prob(s.logprobs) for s in score_targets(lm, [(prompt, t) for t in targets], prefix=prefix)]


class EfficacyCheck:
    """The unedited model's side of ``Efficacy`` for one request, in both test contexts."""

    def __init__(self, lm, request, templates: list[str]):
        from ..evaluation.measure import current_answer, template_prefix

        prompt = request.text()
        self.lm, self.prompt, self.target_new = lm, prompt, request.target_new
        old = request.target_true or current_answer(lm, prompt)
        self.target_old = None if old.strip().lower() == request.target_new.strip().lower() else old
        prefixed = [template_prefix(t) for t in templates if template_prefix(t)]
        self.prefixes = {False: None, True: prefixed[0] if prefixed else None}
        self.before = {k: _probs(lm, prompt, [self.target_new], p)[0] for k, p in self.prefixes.items()}

    def after(self, method: str, prefixed: bool | None = None) -> Efficacy:
        """Measure the edited model (the edit in W) in ``method``'s test context (or the one asked for)."""
        key = PREFIXED_TEST[method] if prefixed is None else prefixed
        targets = [self.target_new] + ([self.target_old] if self.target_old is not None else [])
        p = _probs(self.lm, self.prompt, targets, self.prefixes[key])
        return Efficacy(self.target_old, self.prefixes[key], self.before[key], p[0], p[1] if len(p) > 1 else None)


# Fallback: after the method itself, C-ROME at the same layer, then C-ROME one layer up and one down.
FALLBACK_LAYERS = (1, -1)


def _attempts(method: str, action: str, neighbours: bool) -> list[tuple[str, int]]:
    """(method, layer offset) in the order the guard tries them."""
    if action != "fallback":
        return [(method, 0)]
    tries = [(method, 0)] + ([("crome", 0)] if method != "crome" else [])
    return tries + ([("crome", d) for d in FALLBACK_LAYERS] if neighbours else [])


def _at_layer(lm, prepared, stats, offset: int):
    """The prepared keys and v*, and C, ``offset`` layers away (None when outside the model)."""
    from .edit import prepare_edit, resolve_stats
    from .layer_choice import LayerChoice

    if offset == 0:
        return prepared, stats
    layer = prepared.hparams.layer + offset
    if not 0 <= layer < lm.num_layers:
        return None, None
    hp = prepared.hparams.with_(layer=layer)
    choice = LayerChoice(layer, "fallback", dict(from_layer=prepared.hparams.layer))
    moved = prepare_edit(lm, prepared.request, hparams=hp, templates=prepared.templates, seed=prepared.seed,
                         layer_choice=choice)
    return moved, resolve_stats(lm, hp, corpus=stats.corpus if stats is not None else None)


@dataclass
class GuardDecision:
    """What the guard did with an edit (every edit path records these fields, ``record``)."""

    guard: str                                   # the action asked for: off, refuse, verify, fallback
    edited_with: str                             # the method of the edit kept (fallback may change it)
    guard_rule: dict | None = None
    guard_predicted_collapse: bool | None = None
    guard_ppl_ratio: float | None = None
    guard_threshold: float | None = None
    guard_took: bool | None = None
    guard_efficacy: dict | None = None
    guard_reason: str | None = None              # why the last edit tried was stopped
    guard_action: str = "applied"                # applied, rolled back, refused, "fallback: ..."

    @classmethod
    def start(cls, action: str, method: str, rule: GuardRule | None, verifier: Verifier | None) -> "GuardDecision":
        verifying = action in ("verify", "fallback")
        return cls(guard=action, edited_with=method, guard_rule=rule.to_dict() if rule else None,
                   guard_threshold=verifier.threshold if verifying else None)

    def record(self) -> dict:
        """The fields an eval record carries (the action asked for is the run's setting)."""
        out = asdict(self)
        del out["guard"]
        return out


def check_guard(model: str, method: str, action: str, rule=..., verifier=...) -> None:
    """The guard's option rules, in one place: the action exists, MEMIT takes off or verify, refuse
    needs a rule, verify and fallback need a verifier (``...``: not built yet, not checked)."""
    from .memit import BATCH_METHODS

    if action not in GUARD_ACTIONS:
        raise CromeError(f"unknown guard action '{action}': choose one of {', '.join(GUARD_ACTIONS)}")
    if method in BATCH_METHODS and action not in ("off", "verify"):
        raise CromeError(f"--guard {action} is for ROME and C-ROME; MEMIT takes off or verify")
    if action == "refuse" and rule is None:   # a GuardRule, or ... (not built yet)
        raise CromeError(f"--guard refuse needs a rule calibrated for {model} (crome analyze guard --calibrate, "
                         f"then --guard-rule FILE); --guard verify needs none")
    if action in ("verify", "fallback") and verifier is None:
        raise CromeError(f"--guard {action} needs a verifier (probe perplexity)")


def verify_or_roll_back(handle, verifier: Verifier, decision: GuardDecision, layer: int,
                        check: EfficacyCheck | None = None, method: str | None = None) -> str | None:
    """The verify step of every edit path: measure the applied edit (probe perplexity seen from
    ``layer``; with ``check``, whether ``method``'s edit took) into ``decision``. When it damaged
    the model or did not take, roll it back bit for bit and say why; else None."""
    ratio = decision.guard_ppl_ratio = verifier.ratio(layer)
    efficacy = check.after(method) if check is not None else None
    decision.guard_efficacy = efficacy.record() if efficacy else None
    decision.guard_took = efficacy.took if efficacy else None
    if not ratio <= verifier.threshold:  # NaN fails too
        problem = f"damaged the model: probe perplexity grew {ratio:.3g}x > {verifier.threshold:g}"
    elif efficacy is not None and not efficacy.took:
        problem = efficacy.reason(check.target_new)
    else:
        return None
    handle.restore()
    decision.guard_reason = problem.split(":")[0]
    return problem


def guarded_apply(lm, request, method: str, action: str = "off", *, rule: GuardRule | None = None,
                  verifier: Verifier | None = None, prepared=None, neighbours: bool = True, **edit_kwargs):
    """Compute an edit, let the guard judge it, apply it if it passes. ``prepared``: the request's
    keys and v* when already computed (``prepare_edits``), else they are computed here.
    ``neighbours``: ``fallback`` may move to a neighbouring layer (off in sequential runs).

    Returns (edit, handle, ``GuardDecision``): ``handle`` is the applied edit (None when the
    update is not finite, which is never applied). Raises ``GuardRefused`` (weights untouched or
    restored bit for bit) when the guard stops every edit it tried."""
    from .edit import apply_edit, check_method, finish_edit, prepare_edit, resolve_stats

    check_method(method)
    check_guard(lm.name, method, action, rule, verifier)
    verifying = action in ("verify", "fallback")
    rule = rule if action != "off" else None
    decision = GuardDecision.start(action, method, rule, verifier)
    mom2 = edit_kwargs.pop("mom2", None)
    if prepared is None:
        prepared = prepare_edit(lm, request, **edit_kwargs)  # keys and v* are the same for every method
    elif prepared.request != request:
        raise CromeError("the prepared keys and v* are for another request")
    stats = resolve_stats(lm, prepared.hparams, mom2)
    check = EfficacyCheck(lm, request, prepared.templates) if verifying and verifier.efficacy else None
    problems, edit = [], None
    for m, offset in _attempts(method, action, neighbours):
        here, here_stats = _at_layer(lm, prepared, stats, offset)
        if here is None:
            continue
        edit = finish_edit(lm, here, m, here_stats)
        decision.edited_with = m
        if rule is not None:
            predicted = decision.guard_predicted_collapse = rule.predicts_collapse(edit.diagnostics)
            if predicted:
                problems.append(f"{m} at layer {edit.layer}: {rule.reason(edit.diagnostics)}")
                decision.guard_reason = "predicted collapse"
                if action == "refuse":
                    break
                continue
        if not edit.diagnostics.finite:
            if action == "fallback":
                problems.append(f"{m} at layer {edit.layer}: non-finite update")
                continue
            return edit, None, decision
        if verifying:
            verifier.monitor.at(edit.layer)  # a monitor below the run's layer takes its baseline now, unedited
        handle = apply_edit(lm, edit)
        if verifying:
            problem = verify_or_roll_back(handle, verifier, decision, edit.layer, check, edit.method)
            if problem:
                problems.append(f"{edit.method} at layer {edit.layer}: {problem}, rolled back")
                continue
        if (m, offset) != (method, 0):
            where = f" at layer {edit.layer}" if offset else ""
            decision.guard_action = f"fallback: crome{where} instead of {method}"
        decision.guard_reason = None
        return edit, handle, decision
    decision.guard_action = "rolled back" if decision.guard_ppl_ratio is not None and action == "verify" else "refused"
    raise GuardRefused(f"guard {decision.guard_action} the {method} edit: " + "; ".join(problems), edit, decision)


def guarded_memit(lm, requests, method: str, action: str = "off", *, rule: GuardRule | None = None,
                  verifier: Verifier | None = None, **memit_kwargs):
    """``guarded_apply`` for MEMIT and C-MEMIT: compute and apply the batch's update (computing is
    applying), then let the guard judge it: a ``rule`` (``--guard-rule``) on the batch's diagnostics
    (``batch_diagnostics``), then, with ``verify``, probe perplexity. Returns (edit, handle,
    decision); raises ``GuardRefused`` with the weights restored."""
    from .memit import apply_memit

    check_guard(lm.name, method, action, rule, verifier)
    rule = rule if action != "off" else None
    if rule is not None and rule.feature == "denominator":
        raise CromeError("the guard rule reads the denominator, which is ROME's: a MEMIT batch has none")
    decision = GuardDecision.start(action, method, rule, verifier)
    edit, handle = apply_memit(lm, requests, method, **memit_kwargs)
    if rule is not None:
        diagnostics = batch_diagnostics(edit)
        predicted = decision.guard_predicted_collapse = rule.predicts_collapse(diagnostics)
        if predicted:
            handle.restore()
            decision.guard_reason, decision.guard_action = "predicted collapse", "refused"
            raise GuardRefused(f"guard refused the {method} batch: {rule.reason(diagnostics)}", edit, decision)
    if action == "verify":
        problem = verify_or_roll_back(handle, verifier, decision, verifier.layer)
        if problem:
            decision.guard_action = "rolled back"
            raise GuardRefused(f"guard rolled back the {method} batch: {problem}", edit, decision)
    return edit, handle, decision


def batch_diagnostics(edit):
    """A MEMIT batch's diagnostics in the fields a ``GuardRule`` reads: the largest update ratio
    over its layers and the smallest cos(k^u, k̄) over its requests (MEMIT has no single denominator)."""
    from types import SimpleNamespace

    cos = [r["cos_bare_mean"] for r in edit.per_request if r.get("cos_bare_mean") is not None]
    return SimpleNamespace(update_ratio=edit.record()["update_ratio"], cos_bare_mean=min(cos) if cos else None,
                           finite=edit.finite)
