"""The guard's predictive rule: one threshold on a diagnostic known before the weights are touched.

A rule reads the update ratio ‖ΔW‖/‖W‖, the denominator k_cur·u or cos(k^u, k̄). It is calibrated
per model (``crome analyze guard --calibrate`` writes ``guard_rule.json``, ``--guard-rule FILE``
reads it) and carries the model and settings it was calibrated on. crome ships one for its default
model (``DEFAULT_RULES``); other models have none until calibrated.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import CromeError
from .records import Diagnostics


@dataclass(frozen=True)
class GuardRule:
    feature: str          # a Diagnostics field
    threshold: float
    above: bool           # True: collapse predicted when feature > threshold; False: when below
    model: str | None = None      # the model it was calibrated on (None: not recorded)
    calibration: str = ""         # on what: data, method, layer, key statistics, counts

    @classmethod
    def load(cls, path) -> "GuardRule":
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
