"""Edit and measure independent cases (``evaluate_cases``): each case's edit is judged by the guard in
W and restored (or kept, in a sequential run); then every case's edited model is measured in shared
forward passes, its edit applied to its own rows as an activation hook (``weights.Overlay``)."""

from __future__ import annotations

from ..editing.context import RunContext
from ..editing.edit import EditHandle, prepare_edits
from ..editing.guard import guarded
from ..editing.records import GuardRefused
from ..editing.weights import Overlay
from ..errors import CromeError
from ..models import LoadedModel
from ..scoring.measure import choose_test_prefix, ppl_fields, sample
from ..scoring.metrics import fluency
from ..scoring.readings import natural_lead_in
from .datasets import Case
from .record import CaseRecord
from .scores import CaseScorer, generation_em


def _record(case: Case, ctx: RunContext, prefix: str | None) -> CaseRecord:
    """A case's record before it is edited: the run's settings and the request."""
    req = case.request
    return CaseRecord(case_id=case.case_id, settings=ctx.settings, test_prefix_text=prefix, prompt=req.text(),
                      subject=req.subject, target_new=req.target_new, target_true=req.target_true)


def evaluate_cases(lm: LoadedModel, cases: list[Case], ctx: RunContext, measure_ppl: bool = True, keep: bool = False,
                   prepared_by_id: dict | None = None, score: bool = True
                   ) -> list[tuple[CaseRecord, EditHandle | None]]:
    """Edit and measure independent cases: [(record, handle or None)] in case order.

    Each case is edited (the guard judges it, with the edit in W) and W restored; then every
    case's edited model is measured in shared forward passes, its edit applied to its own rows
    as an activation hook (``Overlay``), the way writing ΔW into W would compute them.
    ``keep`` (one case, or a MEMIT batch: a sequential run) leaves the edit in W, measured there;
    its handle is returned. ``prepared_by_id``: each case's ``Prepared`` (keys and v*) when computed
    together (``prepare_together``), by case id. ``score=False`` (a sequential run's ``scores_every``)
    leaves out the cases' own efficacy, before and after (ES/PS/NS, generation EM)."""
    s = ctx.settings
    if keep and len(cases) != 1 and not ctx.method.batch:
        raise CromeError("a kept edit is measured in the weights: one case at a time")
    prefixes = [choose_test_prefix(s.test_prefix, ctx.templates, s.seed, c.case_id) for c in cases]
    recs = [_record(c, ctx, p) for c, p in zip(cases, prefixes)]
    naturals = [natural_lead_in(s.seed, c.case_id) if "natural" in s.readings else None for c in cases]
    scored = CaseScorer(lm, cases, prefixes, naturals) if score else None
    for i, rec in enumerate(recs) if score else ():
        groups = scored.metrics(i, scored.befores[i])
        rec.set(natural_prefix_text=naturals[i], before=groups["metrics"],
                before_prefixed=groups.get("metrics_prefixed"), before_natural=groups.get("metrics_natural"))

    edit_all = _edit_in_place if ctx.method.in_place else _edit_each
    handles, edits, applied = edit_all(lm, cases, recs, ctx, keep, prepared_by_id or {})
    if not applied:
        return list(zip(recs, handles))
    overlay = Overlay(edits) if edits else None
    try:
        _measure(lm, cases, recs, ctx, scored, applied, overlay, measure_ppl)
    except BaseException:
        for handle in handles:
            if handle is not None:
                handle.restore()
        raise
    if not keep:
        for handle in set(filter(None, handles)):
            handle.restore()
        handles = [None] * len(cases)
    return list(zip(recs, handles))


def _measure(lm, cases, recs, ctx: RunContext, scored: CaseScorer | None, applied, overlay, measure_ppl: bool) -> None:
    """The edited models' metrics (``scored`` None: none), perplexity and fluency into the applied cases' records."""
    for i, scores in zip(applied, scored(applied, overlay)) if scored is not None else ():
        recs[i].set(**scored.metrics(i, scores, scored.befores[i]))
    monitor = ctx.monitor
    if monitor is not None and measure_ppl:
        ppls = monitor.each(overlay) if overlay is not None else [monitor()] * len(applied)
        for i, ppl in zip(applied, ppls):
            recs[i].set(**ppl_fields(monitor.baseline, ppl))
    s = ctx.settings
    if s.gen_em and scored is not None:
        generation_em(lm, [cases[i] for i in applied], [recs[i] for i in applied], scored, applied, overlay,
                      s.readings)
    for slot, i in enumerate(applied):
        if cases[i].generation_prompts and s.gen_tokens:
            texts = sample(lm, cases[i].generation_prompts, s.gen_tokens, s.seed, overlay=overlay,
                           owner=slot if overlay is not None else None)
            recs[i].fluency = fluency(texts)


def _edit_each(lm, cases, recs, ctx: RunContext, keep: bool, prepared_by_id: dict):
    """A single-fact method: each case's edit on its own, judged by the guard in W, then restored
    (or kept). Returns (handles, edits to measure as an overlay, indices of applied cases)."""
    handles: list[EditHandle | None] = [None] * len(cases)
    edits, applied = [], []
    for i, (case, rec) in enumerate(zip(cases, recs)):
        try:
            edit, handle, decision = guarded(lm, [case.request], ctx, prepared=prepared_by_id.get(case.case_id),
                                             neighbours=not keep)
        except GuardRefused as e:
            rec.error, rec.decision = str(e), e.decision
            if e.edit is not None:
                rec.set(diagnostics=e.edit.diagnostics, key_stats=e.edit.key_stats, layer_choice=e.edit.layer_choice)
            continue
        except CromeError as e:
            rec.error = str(e)
            continue
        rec.set(decision=decision, diagnostics=edit.diagnostics, key_stats=edit.key_stats,
                layer_choice=edit.layer_choice)
        rec.edited(ctx.monitor)
        if handle is None:
            rec.error = "non-finite update (NaN or inf): not applied"
        else:
            rec.applied = True
            if keep:
                handles[i] = handle
            else:
                handle.restore()
                edits.append(edit)
            applied.append(i)
        rec.set(context_templates=list(ctx.templates), hparams=ctx.hparams.to_dict())
    return handles, edits, applied


def _edit_in_place(lm, cases, recs, ctx: RunContext, keep: bool, prepared_by_id: dict):
    """A batch method (the cases as one update) or the memory (one case): the edit is left where it is
    made, in W or the memory, and measured there (every case of a batch shares it). The guard (off or
    verify) judges it whole."""
    ctx.check_checks(lm.num_layers)
    try:
        edit, handle, decision = guarded(lm, [c.request for c in cases], ctx)
    except GuardRefused as e:
        for rec, extra in zip(recs, e.edit.per_request):
            rec.set(error=str(e), decision=e.decision, batch={**extra, **e.edit.record()})
        return [None] * len(cases), [], []
    except CromeError as e:
        for rec in recs:
            rec.error = str(e)
        return [None] * len(cases), [], []
    choice = ctx.layer_choice.record() if ctx.layer_choice else None
    for rec, extra in zip(recs, edit.per_request):
        rec.set(decision=decision, batch={**extra, **edit.record()}, layer_choice=choice)
        rec.edited(ctx.monitor)
        rec.applied = True
        rec.set(context_templates=list(ctx.templates), hparams=ctx.hparams.to_dict())
    return [handle] * len(cases), [], list(range(len(cases)))


def evaluate_case(lm: LoadedModel, case: Case, ctx: RunContext, measure_ppl: bool = True, keep: bool = False,
                  prepared=None):
    """``evaluate_cases`` for one case: (record, handle or None); ``prepared``: its keys and v*, if computed."""
    by_id = {case.case_id: prepared} if prepared is not None else None
    return evaluate_cases(lm, [case], ctx, measure_ppl, keep, prepared_by_id=by_id)[0]


def prepare_together(lm: LoadedModel, cases: list[Case], ctx: RunContext) -> dict:
    """Keys and v* of independent cases computed together (one batched forward per step), by case id.
    Empty when a case cannot be prepared: each case is then prepared alone and reports its own error."""
    if len(cases) < 2 or ctx.method.in_place:
        return {}
    try:
        prepared = prepare_edits(lm, [c.request for c in cases], ctx.hparams, ctx.templates, ctx.settings.seed,
                                 layer_choice=ctx.layer_choice)
    except CromeError:
        return {}
    return {c.case_id: p for c, p in zip(cases, prepared)}
