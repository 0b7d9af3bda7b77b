"""``CaseRecord``: one case's line in a results file, as a typed record.

Every field that an eval record can carry is declared here, once, in groups: the case and the
run's settings, what the guard decided, the edit's diagnostics, the measurements, and the
sequential fields. A field left ``UNSET`` is not written (a refused edit has no metrics; only a
sequential run has ``step``), so ``to_dict`` gives the JSON line ``crome eval`` writes. Readers
of results files (``summary``, the analyses) read that JSON back as plain dicts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..editing.context import RunSettings
from ..editing.records import GuardDecision


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()   # a field the record does not carry (not written), as distinct from None (written as null)


@dataclass
class CaseRecord:
    # the case and the run
    case_id: str
    settings: RunSettings              # written flat: method, model, layer, seed, test_prefix, ...
    test_prefix_text: str | None
    prompt: str
    subject: str
    target_new: str
    target_true: str | None
    error: str | None = None
    applied: bool = False
    before: dict | None = None         # the unedited model's metrics (metrics.py), plain and prefixed
    before_prefixed: dict | None = None
    before_natural: dict | None = None   # the edit prompt and paraphrases after a natural sentence
    natural_prefix_text: str | None = None
    # what the guard decided and what the edit looked like
    decision: GuardDecision | _Unset = UNSET          # written flat: guard_action, guard_ppl_ratio, ...
    diagnostics: object = UNSET                       # ROME: the edit's Diagnostics, written flat
    batch: dict | _Unset = UNSET                      # MEMIT: the request's and the update's fields, flat
    key_stats: dict | None | _Unset = UNSET
    layer_choice: dict | None | _Unset = UNSET
    # what the edited model measured
    ppl_before: float | None | _Unset = UNSET
    ppl_after: float | None | _Unset = UNSET
    ppl_ratio: float | None | _Unset = UNSET
    collapsed: bool | None | _Unset = UNSET
    metrics: dict | None | _Unset = UNSET
    metrics_prefixed: dict | None | _Unset = UNSET
    metrics_natural: dict | None | _Unset = UNSET
    fluency: dict | None | _Unset = UNSET
    context_templates: list | _Unset = UNSET
    hparams: dict | _Unset = UNSET
    # a sequential run's bookkeeping
    step: int | _Unset = UNSET
    update: int | _Unset = UNSET
    n_applied: int | _Unset = UNSET
    weights_sha: str | _Unset = UNSET
    retained_efficacy: float | None | _Unset = UNSET
    retained_efficacy_prefixed: float | None | _Unset = UNSET
    retained_gen_em: float | None | _Unset = UNSET           # generation exact match of the edits so far
    retained_gen_em_prefixed: float | None | _Unset = UNSET
    weight_norms: dict | _Unset = UNSET              # measured steps: ‖W_l‖_F and its ratio to the unedited

    def edited(self, monitor) -> None:
        """The fields every edited case carries, before its measurements fill them."""
        self.ppl_before = monitor.baseline if monitor is not None else None
        self.ppl_after = self.ppl_ratio = self.collapsed = None
        self.metrics = self.metrics_prefixed = self.metrics_natural = self.fluency = None

    def set(self, **values) -> None:
        """Set declared fields by name (an unknown name is a programming error, not a new key)."""
        for name, value in values.items():
            if name not in _NAMES:
                raise AttributeError(f"CaseRecord has no field {name!r}")
            setattr(self, name, value)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is UNSET:
                continue
            if f.name == "settings":
                out.update(asdict(value))
            elif f.name == "decision":
                out.update(value.record())
            elif f.name == "diagnostics":
                out.update(asdict(value))
            elif f.name == "batch":
                out.update(value)
            else:
                out[f.name] = value
        return out


_NAMES = {f.name for f in fields(CaseRecord)}
