"""Did an edit take? The unedited model's side of the check, then the edited model's (``Efficacy``).

On the edit's own prompt, P(new target) must rise and end above P(old target), read in the
context the method's edit was learned for: after the test-time prefix for a consistent method
(``Method.prefixed_test``), on the bare prompt for the reference.
"""

from __future__ import annotations

from ..request import EditRequest
from ..scoring.measure import choose_test_prefix, current_answer, score_targets
from ..scoring.metrics import prob
from .methods import Method, method
from .records import Efficacy


def probs(lm, prompt: str, targets: list[str], prefix: str | None) -> list[float]:
    """ROME's per-token probability of each target after ``prefix`` + ``prompt``."""
    return [prob(s.logprobs) for s in score_targets(lm, [(prompt, t) for t in targets], prefix=prefix)]


class EfficacyCheck:
    """The unedited model's side of ``Efficacy`` for one request, in both test contexts."""

    def __init__(self, lm, request: EditRequest, templates: list[str]):
        prompt = request.text()
        self.lm, self.prompt, self.target_new = lm, prompt, request.target_new
        old = request.target_true or current_answer(lm, prompt)
        self.target_old = None if old.strip().lower() == request.target_new.strip().lower() else old
        self.prefixes = {False: None, True: choose_test_prefix("fixed", templates)}
        self.before = {k: probs(lm, prompt, [self.target_new], p)[0] for k, p in self.prefixes.items()}

    def after(self, name: str | Method, prefixed: bool | None = None) -> Efficacy:
        """Measure the edited model (the edit in W) in the method's test context (or the one asked for)."""
        key = method(name).prefixed_test if prefixed is None else prefixed
        targets = [self.target_new] + ([self.target_old] if self.target_old is not None else [])
        p = probs(self.lm, self.prompt, targets, self.prefixes[key])
        return Efficacy(self.target_old, self.prefixes[key], self.before[key], p[0], p[1] if len(p) > 1 else None)
