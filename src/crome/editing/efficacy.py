"""Did an edit take? The unedited model's side of the check, then the edited model's (``Efficacy``).

On the edit's own prompt, P(new target) must rise and end above P(old target), read in each place
the guard checks (``Method.test_places``): the bare prompt, where users look, for every method; and
after the test-time prefix too for a consistent method, whose edit was learned for prefixed contexts.
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
        self.prefixes = {"bare": None, "prefix": choose_test_prefix("fixed", templates)}
        self.before = {k: probs(lm, prompt, [self.target_new], p)[0] for k, p in self.prefixes.items()}

    def at(self, place: str) -> Efficacy:
        """The edited model (the edit in W, or in the memory) measured in one place: bare or prefix."""
        targets = [self.target_new] + ([self.target_old] if self.target_old is not None else [])
        p = probs(self.lm, self.prompt, targets, self.prefixes[place])
        return Efficacy(self.target_old, self.prefixes[place], self.before[place], p[0], p[1] if len(p) > 1 else None,
                        place=place)

    def after(self, name: str | Method, places: tuple[str, ...] | None = None) -> Efficacy:
        """The edit measured in ``places`` (default: the method's ``test_places``): the first place
        where it did not take, else the last one checked; ``checked`` names them all."""
        places = places or method(name).test_places
        readings = [self.at(p) for p in places]
        found = next((e for e in readings if not e.took), readings[-1])
        found.checked = list(places)
        return found
