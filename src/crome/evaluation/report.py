"""One edit, measured: the typed record that ``crome edit`` prints and writes as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..editing.edit import Edit, apply_edit
from ..editing.guard import guarded_apply, guarded_memit
from ..editing.memit import BATCH_METHODS, BatchEdit
from ..editing.request import EditRequest
from ..errors import CromeError
from ..models import LoadedModel
from .context import RunContext
from .measure import generate, ppl_fields, target_probability, template_prefix


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
    key_outlier_ratio: float
    value_shift: float
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
    guard: str                  # these ten: what the guard did (``GuardDecision``)
    edited_with: str
    guard_rule: dict | None
    guard_predicted_collapse: bool | None
    guard_ppl_ratio: float | None
    guard_threshold: float | None
    guard_took: bool | None
    guard_efficacy: dict | None
    guard_reason: str | None
    guard_action: str
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


def measure_edit(lm: LoadedModel, request: EditRequest, ctx: RunContext, *, ppl_data: str | None = None,
                 generate_tokens: int = 0, keep: bool = False) -> tuple[EditReport, Edit]:
    """Compute, apply, measure and (unless ``keep``) restore one edit: ``ctx.settings.method``.

    A non-finite update is reported (``applied=False``) and never applied.
    ``ctx.monitor`` (built for the edited layer) gives perplexity before and after.
    ``ctx.settings.guard`` (off, refuse, verify, fallback; guard.py) judges the edit and may roll
    it back (``GuardRefused``, weights restored)."""
    s, prompt = ctx.settings, request.text()
    method, guard = s.method, s.guard
    p_before = target_probability(lm, prompt, request.target_new)
    edit, handle, decision = guarded_apply(lm, request, method, guard, rule=ctx.rule, verifier=ctx.verifier,
                                           hparams=ctx.hparams, mom2=ctx.stats, seed=s.seed, templates=ctx.templates,
                                           layer_choice=ctx.layer_choice)
    prefix = template_prefix(edit.context_templates[1] if len(edit.context_templates) > 1 else "")
    after: dict = dict(ppl_after=None, ppl_ratio=None, collapsed=None, p_target_after=None,
                       p_target_after_prefixed=None, generation_after=None)
    if handle is not None:
        handle.restore()  # the prefixed "before" (and a new monitor's baseline) need the unedited model
    monitor = ctx.monitor.at(edit.layer) if ctx.monitor is not None else None   # a fallback may move the layer
    ppl_before = monitor.baseline if monitor is not None else None
    p_before_prefixed = target_probability(lm, prompt, request.target_new, prefix=prefix)
    if handle is not None:
        handle = apply_edit(lm, edit)
        try:
            after["p_target_after"] = target_probability(lm, prompt, request.target_new)
            after["p_target_after_prefixed"] = target_probability(lm, prompt, request.target_new, prefix=prefix)
            if monitor is not None:
                after.update(ppl_fields(ppl_before, monitor()))
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
        key_outlier_ratio=d.key_outlier_ratio, value_shift=d.value_shift, first_token_subject=d.first_token_subject,
        p_target_opt=d.p_target_opt, finite=d.finite,
        applied=handle is not None, ppl_before=ppl_before, ppl_data=ppl_data, p_target_before=p_before,
        p_target_before_prefixed=p_before_prefixed, test_prefix=prefix, edit_seconds=edit.seconds,
        seed=edit.seed, device=str(lm.device), dtype=lm.dtype, key_stats=edit.key_stats, layer_choice=edit.layer_choice,
        context_templates=edit.context_templates, hparams=edit.hparams.to_dict(),
        **asdict(decision), **after,
    )
    return report, edit


@dataclass
class BatchReport:
    """A MEMIT, C-MEMIT, AlphaEdit or C-AlphaEdit edit of several requests, measured (``crome edit --method memit``)."""

    method: str
    model: str
    layers: list[int]
    requests: list[dict]        # per request: prompt, subject, target_new, P(target) before/after, diagnostics
    update_norm: float
    update_ratio: float         # the largest over the layers
    layer_stats: dict           # per layer: update norm and ratio, the solve's condition number, residual norm
    finite: bool
    applied: bool
    ppl_before: float | None
    ppl_after: float | None
    ppl_ratio: float | None
    collapsed: bool | None
    ppl_data: str | None
    guard: str                  # these ten: what the guard did (``GuardDecision``)
    edited_with: str
    guard_rule: dict | None
    guard_predicted_collapse: bool | None
    guard_ppl_ratio: float | None
    guard_threshold: float | None
    guard_took: bool | None
    guard_efficacy: dict | None
    guard_reason: str | None
    guard_action: str
    edit_seconds: float
    seed: int
    device: str
    dtype: str
    key_stats: dict
    context_templates: list[str]
    hparams: dict
    null_space: dict | None = None   # AlphaEdit: per layer, the null space's dimension and energy, earlier edits

    def to_dict(self) -> dict:
        return asdict(self)


def measure_batch_edit(lm: LoadedModel, requests: list[EditRequest], ctx: RunContext, *,
                       ppl_data: str | None = None, keep: bool = False) -> tuple[BatchReport, BatchEdit]:
    """Apply, measure and (unless ``keep``) restore one MEMIT edit of ``requests`` (``ctx.settings.method``):
    its report and the edit.
    The guard: off or verify (``guarded_memit``: a rejected edit is rolled back, ``GuardRefused``)."""
    s, stats, monitor = ctx.settings, ctx.stats, ctx.monitor
    method, seed = s.method, s.seed
    first = min(stats) if stats else None
    if monitor is not None and first is not None and monitor.layer > first:
        raise CromeError(f"perplexity monitor is for layer {monitor.layer}, MEMIT edits layer {first}")
    before = [target_probability(lm, r.text(), r.target_new) for r in requests]
    edit, handle, decision = guarded_memit(lm, requests, method, s.guard, rule=ctx.rule, verifier=ctx.verifier,
                                           hparams=ctx.hparams, stats=stats, templates=ctx.templates, seed=seed,
                                           null_space=ctx.null_space)
    try:
        after = [target_probability(lm, r.text(), r.target_new) for r in requests]
        ppl = dict(ppl_before=None, ppl_after=None, ppl_ratio=None, collapsed=None)
        if monitor is not None:
            ppl = dict(ppl_before=monitor.baseline, **ppl_fields(monitor.baseline, monitor()))
    finally:
        if not keep:
            handle.restore()
    summary = edit.record()
    return BatchReport(
        method=method, model=lm.name, layers=list(edit.layers),
        requests=[dict(prompt=r.prompt, subject=r.subject, target_new=r.target_new, p_target_before=b,
                       p_target_after=a, **extra) for r, b, a, extra in zip(requests, before, after, edit.per_request)],
        update_norm=summary["update_norm"], update_ratio=summary["update_ratio"], layer_stats=summary["layer_stats"],
        finite=edit.finite, applied=True, ppl_data=ppl_data, edit_seconds=edit.seconds, seed=seed,
        device=str(lm.device), dtype=lm.dtype, key_stats=summary["key_stats"], context_templates=edit.context_templates,
        hparams=edit.hparams.to_dict(), null_space=edit.null_space, **ppl, **asdict(decision)), edit


def edit_and_report(lm: LoadedModel, requests: list[EditRequest], ctx, *, ppl_data: str | None = None,
                    keep: bool = False, generate_tokens: int = 0):
    """The edit ``crome edit`` and ``crome demo`` make: ``ctx.settings.method`` on ``requests`` (one
    for ROME and C-ROME; MEMIT and C-MEMIT edit them all as one update), judged by the context's
    guard, measured by its monitor, and restored unless ``keep``. Returns (report, edit)."""
    method = ctx.settings.method
    if method in BATCH_METHODS:
        return measure_batch_edit(lm, requests, ctx, ppl_data=ppl_data, keep=keep)
    if len(requests) != 1:
        raise CromeError(f"{method} edits one fact at a time; several facts as one update: --method memit or cmemit")
    return measure_edit(lm, requests[0], ctx, ppl_data=ppl_data, generate_tokens=generate_tokens, keep=keep)
