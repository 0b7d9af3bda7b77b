"""The records editing shares across its steps and policies, below all of them.

* ``LayerChoice``: which layer an edit is at and why (user, table, auto, depth, fallback, trial);
* ``Diagnostics``: what a rank-one edit will do, known before it touches the weights, and the
  thresholds beyond which it is unlikely to take (``WARN_*``);
* ``BatchDiagnostics``: the same fields a guard rule reads, for a MEMIT batch;
* ``Efficacy``: whether an applied edit took on its own prompt;
* ``GuardDecision`` and ``GuardRefused``: what the guard did with an edit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import CromeError
from .methods import BARE_KEY_METHOD, FALLBACK_METHOD

# ``crome edit`` warns that an edit is unlikely to take beyond these (docs/MODELS.md, "Layer choice")
WARN_VALUE_SHIFT = 8.0
WARN_OUTLIER = 4.0


class OneFact:
    """What a one-fact edit (with ``request`` and ``layer``) shares with a batch: its requests and layers."""

    @property
    def layers(self) -> tuple[int, ...]:
        return (self.layer,)

    @property
    def requests(self) -> list:
        return [self.request]


@dataclass
class LayerChoice:
    layer: int
    rule: str                          # "user", "table", "auto" (causal trace) or "depth" (20% rule)
    detail: dict = field(default_factory=dict)

    def record(self) -> dict:
        return asdict(self)


@dataclass
class Diagnostics:
    """What an edit will do, known before it touches the weights."""

    denominator: float          # k_cur · u
    numerator_norm: float       # ‖u (v* − v_cur)ᵀ‖
    update_norm: float          # ‖ΔW‖
    weight_norm: float          # ‖W‖
    update_ratio: float         # ‖ΔW‖ / ‖W‖
    cos_bare_mean: float        # cos(k^u, k̄)
    first_token_subject: bool   # the subject starts at the prompt's first token
    p_target_opt: float         # P(target) reached by the v* optimisation
    opt_steps: int
    finite: bool
    key_outlier_ratio: float = 1.0  # ‖k^u‖ / median ‖k‖ of the prefixed templates' keys
    value_shift: float = 0.0        # ‖v* − v_cur‖ / ‖v_cur‖: how far v* moves W's output

    def unlikely_to_take(self) -> str | None:
        """Why these numbers say the edit is unlikely to take (None: they don't)."""
        reasons = []
        if self.value_shift > WARN_VALUE_SHIFT:
            reasons.append(f"‖v*−v_cur‖/‖v_cur‖ = {self.value_shift:.3g} > {WARN_VALUE_SHIFT:g}")
        if self.first_token_subject and self.key_outlier_ratio > WARN_OUTLIER:
            reasons.append(f"the bare key is {self.key_outlier_ratio:.3g}x the prefixed keys' norm "
                           f"(a first-position outlier, an attention sink)")
        return "; ".join(reasons) or None

    def record(self) -> dict:
        return asdict(self)


@dataclass
class BatchDiagnostics:
    """A MEMIT batch's diagnostics in the fields a ``GuardRule`` reads: the largest update ratio
    over its layers and the smallest cos(k^u, k̄) over its requests (MEMIT has no single denominator)."""

    update_ratio: float
    cos_bare_mean: float | None
    finite: bool

    def unlikely_to_take(self) -> str | None:
        return None


@dataclass
class Efficacy:
    """Did the edit take? On the edit's own prompt, in one place (``place``: bare, or after the test
    prefix), P(new target) must rise and end above P(old target): CounterFact's efficacy test
    (per-token probabilities, ``metrics.prob``) on one prompt. ``checked``: every place the check
    read (it took only if it took in each; this one is where it did not, or the last)."""

    target_old: str | None        # None: the model already answered with the new target
    prefix: str | None
    p_new_before: float
    p_new_after: float | None = None
    p_old_after: float | None = None
    place: str = "bare"
    checked: list[str] | None = None

    @property
    def took(self) -> bool:
        return (self.p_new_after is not None and self.p_new_after > self.p_new_before
                and (self.p_old_after is None or self.p_new_after > self.p_old_after))

    def reason(self, target_new: str) -> str:
        where = f" after the prefix {self.prefix!r}" if self.prefix else " on the bare prompt"
        old = f", P({self.target_old}) {self.p_old_after:.3g}" if self.target_old is not None else ""
        return f"did not take: P({target_new}){where} {self.p_new_before:.3g} -> {self.p_new_after:.3g}{old}"

    def record(self) -> dict:
        return asdict(self)


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
    def start(cls, action: str, method: str, rule, verifier) -> "GuardDecision":
        """``rule``: a ``GuardRule`` or None; ``verifier``: a ``Verifier`` (read when verifying)."""
        verifying = action in ("verify", "fallback")
        return cls(guard=action, edited_with=method, guard_rule=rule.to_dict() if rule else None,
                   guard_threshold=verifier.threshold if verifying else None)

    def record(self) -> dict:
        """The fields an eval record carries (the action asked for is the run's setting)."""
        out = asdict(self)
        del out["guard"]
        return out

    def next_step(self) -> str | None:
        """What to try after the guard stopped an edit (None: it did not): the other methods first."""
        if self.guard_action not in ("rolled back", "refused"):
            return None
        if self.guard_took is False:
            other = self._try(BARE_KEY_METHOD, note=" (it also writes the bare prompt's key)")
            return f"the edit did not take: try {other}--layer auto, or another phrasing of the prompt"
        other = self._try(FALLBACK_METHOD, BARE_KEY_METHOD, note=" (consistent keys)")
        return f"the edit would damage the model: try {other}another layer (--layer auto)"

    def _try(self, *methods: str, note: str) -> str:
        """``--method A or B<note>, `` for the methods other than the one that was stopped ('' if none)."""
        others = [m for m in methods if m != self.edited_with]
        return f"--method {' or '.join(others)}{note}, " if others else ""


class GuardRefused(CromeError):
    """The guard refused or rolled back an edit (``crome edit`` exits with code 3).
    ``edit`` is the last edit tried, ``decision`` what the guard did."""

    exit_code = 3

    def __init__(self, message: str, edit=None, decision: GuardDecision | None = None):
        super().__init__(message)
        self.edit, self.decision = edit, decision
