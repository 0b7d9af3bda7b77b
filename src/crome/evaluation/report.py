"""One edit, measured: the typed record that ``crome edit`` prints and writes as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..editing.edit import Edit, apply_edit
from ..editing.fast import PerplexityMonitor
from ..editing.guard import GuardRule, Verifier, guarded_apply
from ..editing.request import EditRequest
from ..errors import CromeError
from ..models import LoadedModel
from .measure import collapsed, generate, target_probability, template_prefix


@dataclass
class EditReport:
    method: str
    model: str
    layer: int
    prompt: str
    subject: str
    target_new: str
    denominator: float
    numerator_norm: float
    update_norm: float
    update_ratio: float
    cos_bare_mean: float
    first_token_subject: bool
    p_target_opt: float
    finite: bool
    applied: bool
    ppl_before: float | None
    ppl_after: float | None
    ppl_ratio: float | None
    collapsed: bool | None
    ppl_data: str | None
    p_target_before: float
    p_target_after: float | None
    p_target_before_prefixed: float
    p_target_after_prefixed: float | None
    test_prefix: str
    generation_after: str | None
    guard: str
    guard_predicted_collapse: bool | None
    guard_ppl_ratio: float | None
    guard_threshold: float | None
    guard_action: str
    edited_with: str
    edit_seconds: float
    seed: int
    device: str
    dtype: str
    key_stats: dict | None
    layer_choice: dict | None
    context_templates: list[str]
    hparams: dict

    def to_dict(self) -> dict:
        return asdict(self)


def measure_edit(lm: LoadedModel, request: EditRequest, method: str, *, monitor: PerplexityMonitor | None,
                 ppl_data: str | None = None, generate_tokens: int = 0, keep: bool = False, guard: str = "off",
                 rule: GuardRule | None = None, verifier: Verifier | None = None,
                 **edit_kwargs) -> tuple[EditReport, Edit]:
    """Compute, apply, measure and (unless ``keep``) restore one edit.

    A non-finite update is reported (``applied=False``) and never applied.
    ``monitor`` (built for the edited layer) gives perplexity before and after.
    ``guard`` (off, refuse, verify, fallback; guard.py) judges the edit and may roll it back
    (``GuardRefused``, weights restored)."""
    prompt = request.text()
    p_before = target_probability(lm, prompt, request.target_new)
    edit, handle, decision = guarded_apply(lm, request, method, guard, rule=rule, verifier=verifier, **edit_kwargs)
    if monitor is not None and monitor.layer != edit.layer:
        if handle is not None:
            handle.restore()
        raise CromeError(f"perplexity monitor is for layer {monitor.layer}, the edit is at layer {edit.layer}")
    ppl_before = monitor.baseline if monitor is not None else None
    prefix = template_prefix(edit.context_templates[1] if len(edit.context_templates) > 1 else "")
    after: dict = dict(ppl_after=None, ppl_ratio=None, collapsed=None, p_target_after=None,
                       p_target_after_prefixed=None, generation_after=None)
    if handle is not None:
        handle.restore()  # the prefixed "before" needs the unedited model
    p_before_prefixed = target_probability(lm, prompt, request.target_new, prefix=prefix)
    if handle is not None:
        handle = apply_edit(lm, edit)
        try:
            after["p_target_after"] = target_probability(lm, prompt, request.target_new)
            after["p_target_after_prefixed"] = target_probability(lm, prompt, request.target_new, prefix=prefix)
            if monitor is not None:
                ppl = monitor()
                after.update(ppl_after=ppl, ppl_ratio=ppl / ppl_before, collapsed=collapsed(ppl_before, ppl))
            if generate_tokens:
                after["generation_after"] = generate(lm, prompt, generate_tokens)
        finally:
            if not keep:
                handle.restore()
    d = edit.diagnostics
    report = EditReport(
        method=method, model=lm.name, layer=edit.layer, prompt=request.prompt, subject=request.subject,
        target_new=request.target_new, denominator=d.denominator, numerator_norm=d.numerator_norm,
        update_norm=d.update_norm, update_ratio=d.update_ratio, cos_bare_mean=d.cos_bare_mean,
        first_token_subject=d.first_token_subject, p_target_opt=d.p_target_opt, finite=d.finite,
        applied=handle is not None, ppl_before=ppl_before, ppl_data=ppl_data, p_target_before=p_before,
        p_target_before_prefixed=p_before_prefixed, test_prefix=prefix, edit_seconds=edit.seconds,
        seed=edit.seed, device=str(lm.device), dtype=lm.dtype, key_stats=edit.key_stats, layer_choice=edit.layer_choice,
        context_templates=edit.context_templates, hparams=edit.hparams.to_dict(),
        guard=guard, guard_predicted_collapse=decision["guard_predicted_collapse"],
        guard_ppl_ratio=decision["guard_ppl_ratio"], guard_threshold=decision["guard_threshold"],
        guard_action=decision["guard_action"], edited_with=decision["edited_with"], **after,
    )
    return report, edit
