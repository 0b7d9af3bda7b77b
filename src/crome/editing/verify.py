"""The guard's verify step: an applied edit is measured, and rolled back bit for bit when it damaged
the model or did not take.

``Verifier`` measures perplexity on a small probe set (the bundled passages, with the fast monitor)
against the unedited model; ``verify_or_roll_back`` reads it (and, with an ``EfficacyCheck``, whether
the edit took) into the ``GuardDecision`` and restores the weights when either fails. It needs no
per-model calibration.
"""

from __future__ import annotations

from ..errors import CromeError
from ..scoring.monitor import PerplexityMonitor
from ..scoring.texts import load_texts
from .efficacy import EfficacyCheck
from .methods import Method
from .records import GuardDecision

# Calibrated on clean single edits (they took, with an update under 0.5‖W‖) of both real models: probe
# ratio at most ×1.03 on SmolLM2, ×1.09 on Gemma 3 (benchmarks/layer_sweep.py; docs/MODELS.md, "Layer
# choice"), so 1.2 leaves twice the largest clean rise; edits that damage
# the model sit at ×1.3 and above (the held-out report's failed edits: ×1.3–1.5; ROME's large updates).
VERIFY_THRESHOLD = 1.2


class Verifier:
    """What the guard measures after an edit: perplexity on a probe set against the unedited
    model, and (``efficacy``) whether the edit took on its own prompt (``Efficacy``)."""

    def __init__(self, lm, layer: int, texts: list[str] | None = None, threshold: float = VERIFY_THRESHOLD,
                 efficacy: bool = True):
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


def verify_or_roll_back(handle, verifier: Verifier, decision: GuardDecision, layer: int,
                        check: EfficacyCheck | None = None, method: Method | None = None) -> str | None:
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
