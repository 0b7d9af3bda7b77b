"""One edit, measured: the typed record that ``crome edit`` prints and writes as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

from ..editing.context import RunContext
from ..editing.edit import Edit, apply_edit
from ..editing.guard import guarded
from ..editing.memit import BatchEdit
from ..editing.methods import BATCH_METHODS
from ..editing.records import GuardRefused
from ..errors import CromeError
from ..models import LoadedModel
from ..request import EditRequest
from ..scoring.measure import choose_test_prefix, generate, ppl_fields, target_probability
from ..scoring.readings import natural_lead_in, read_places
from .results import json_safe


@dataclass
class Report:
    """What every measured edit reports: the run, the perplexity check, what the guard did
    (``GuardDecision``'s ten fields) and how to reproduce it."""

    method: str
    model: str
    finite: bool
    applied: bool
    ppl_before: float | None
    ppl_after: float | None
    ppl_ratio: float | None
    collapsed: bool | None
    ppl_data: str | None
    guard: str
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
    context_templates: list[str]
    hparams: dict

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EditReport(Report):
    """A single-fact edit, measured (``crome edit``)."""

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
    p_target_before: float
    p_target_after: float | None
    p_target_before_prefixed: float
    p_target_after_prefixed: float | None
    test_prefix: str
    generation_after: str | None
    layer_choice: dict | None
    readings: dict | None = None   # where users look (scoring.readings): {place: {"before": ..., "after": ...}}


def measure_edit(lm: LoadedModel, request: EditRequest, ctx: RunContext, *, ppl_data: str | None = None,
                 generate_tokens: int = 0, keep: bool = False) -> tuple[EditReport, Edit]:
    """Compute, apply, measure and (unless ``keep``) restore one edit: ``ctx.settings.method``.

    A non-finite update is reported (``applied=False``) and never applied.
    ``ctx.monitor`` (built for the edited layer) gives perplexity before and after.
    ``ctx.settings.guard`` (off, refuse, verify, fallback; guard.py) judges the edit and may roll
    it back (``GuardRefused``, weights restored)."""
    prompt = request.text()
    prefix = choose_test_prefix("fixed", ctx.templates) or ""
    places = partial(read_places, lm, prompt, request.target_new, request.target_true, prefix,
                     natural_lead_in(ctx.settings.seed, prompt))
    readings_before = places()           # the unedited model's; P(target) bare and prefixed come from them
    edit, handle, decision = guarded(lm, [request], ctx)
    after: dict = dict(ppl_after=None, ppl_ratio=None, collapsed=None, p_target_after=None,
                       p_target_after_prefixed=None, generation_after=None,
                       readings=_before_after(readings_before, None))
    if handle is not None:
        handle.restore()  # a new monitor's baseline needs the unedited model
    monitor = ctx.monitor.at(edit.layer) if ctx.monitor is not None else None   # a fallback may move the layer
    ppl_before = monitor.baseline if monitor is not None else None
    if handle is not None:
        handle = apply_edit(lm, edit)
        try:
            readings_after = places()
            after["p_target_after"], after["p_target_after_prefixed"] = _bare_and_prefixed(readings_after)
            if monitor is not None:
                after.update(ppl_fields(ppl_before, monitor()))
            after["readings"] = _before_after(readings_before, readings_after)
            if generate_tokens:
                after["generation_after"] = generate(lm, prompt, generate_tokens)
        finally:
            if not keep:
                handle.restore()
    p_before, p_before_prefixed = _bare_and_prefixed(readings_before)
    d = edit.diagnostics
    report = EditReport(
        method=ctx.settings.method, model=lm.name, layer=edit.layer, prompt=request.prompt, subject=request.subject,
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


def _bare_and_prefixed(readings: dict) -> tuple[float, float]:
    """P(target) on the bare prompt and after the test prefix (the bare one when there is no prefix)."""
    bare = readings["bare"]["p_target"]
    return bare, readings["prefix"]["p_target"] if "prefix" in readings else bare


def _before_after(before: dict, after: dict | None) -> dict:
    """{place: {"before": reading, "after": reading or None}} of ``read_places``' two readings."""
    return {place: dict(before=got, after=(after or {}).get(place)) for place, got in before.items()}


@dataclass
class BatchReport(Report):
    """A batch method's edit of several requests, measured (``crome edit --method cmemit``)."""

    layers: list[int]
    requests: list[dict]        # per request: prompt, subject, target_new, P(target) before/after, diagnostics
    update_norm: float
    update_ratio: float         # the largest over the layers
    layer_stats: dict           # per layer: update norm and ratio, the solve's condition number, residual norm
    null_space: dict | None = None   # AlphaEdit: per layer, the null space's dimension and energy, earlier edits


def measure_batch_edit(lm: LoadedModel, requests: list[EditRequest], ctx: RunContext, *,
                       ppl_data: str | None = None, keep: bool = False) -> tuple[BatchReport, BatchEdit]:
    """Apply, measure and (unless ``keep``) restore one MEMIT edit of ``requests`` (``ctx.settings.method``):
    its report and the edit.
    The guard: off or verify (``guarded_memit``: a rejected edit is rolled back, ``GuardRefused``)."""
    s, monitor = ctx.settings, ctx.monitor
    ctx.check_checks(lm.num_layers)
    before = [target_probability(lm, r.text(), r.target_new) for r in requests]
    edit, handle, decision = guarded(lm, requests, ctx)
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
        method=s.method, model=lm.name, layers=list(edit.layers),
        requests=[dict(prompt=r.prompt, subject=r.subject, target_new=r.target_new, p_target_before=b,
                       p_target_after=a, **extra) for r, b, a, extra in zip(requests, before, after, edit.per_request)],
        update_norm=summary["update_norm"], update_ratio=summary["update_ratio"], layer_stats=summary["layer_stats"],
        finite=edit.finite, applied=True, ppl_data=ppl_data, edit_seconds=edit.seconds, seed=s.seed,
        device=str(lm.device), dtype=lm.dtype, key_stats=summary["key_stats"], context_templates=edit.context_templates,
        hparams=edit.hparams.to_dict(), null_space=edit.null_space, **ppl, **asdict(decision)), edit


def edit_and_report(lm: LoadedModel, requests: list[EditRequest], ctx: RunContext, *, ppl_data: str | None = None,
                    keep: bool = False, generate_tokens: int = 0):
    """The edit ``crome edit`` and ``crome demo`` make: the context's method on ``requests`` (one fact
    for a single-fact method; a batch method edits them all as one update), judged by the context's
    guard, measured by its monitor, and restored unless ``keep``. Returns (report, edit)."""
    if ctx.method.in_place:
        return measure_batch_edit(lm, requests, ctx, ppl_data=ppl_data, keep=keep)
    if len(requests) != 1:
        raise CromeError(f"{ctx.method.name} edits one fact at a time; several facts as one update: "
                         f"--method {' or '.join(BATCH_METHODS)}")
    return measure_edit(lm, requests[0], ctx, ppl_data=ppl_data, generate_tokens=generate_tokens, keep=keep)



def refused_record(refused: GuardRefused, requests: list[EditRequest], ctx: RunContext) -> dict:
    """What ``crome edit --json`` prints for an edit the guard stopped: not applied, why, what the guard
    measured (how far P(target) got: ``guard_efficacy``), the edit's diagnostics and what to try next."""
    s, decision = ctx.settings, refused.decision
    out = dict(method=s.method, model=s.model, layer=s.layer, seed=s.seed, applied=False, error=str(refused),
               requests=[r.to_dict() for r in requests])
    if decision is not None:
        out.update(decision.record(), next_step=decision.next_step())
    diagnostics = getattr(refused.edit, "diagnostics", None)
    if diagnostics is not None:
        out["diagnostics"] = asdict(diagnostics)
    return json_safe(out)
