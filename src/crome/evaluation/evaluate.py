"""``crome eval``: edit, measure, restore, one case at a time; or edits that accumulate.

Each case gives one JSON line with every metric of ``metrics.py``, the edit's diagnostics,
the guard's decision, the perplexity check, and what reproduces it (seed, context templates,
hyper-parameters, test prefix, key statistics). ``run`` appends the lines to a results file
(``results.py``) and, for a sequential run, checkpoints every update (``sequential.py``), so a
killed run loses nothing finished and ``--resume`` continues it.
"""

from __future__ import annotations

import random
import time
from contextlib import closing, nullcontext
from itertools import islice

from ..editing.edit import EditHandle, Overlay
from ..editing.guard import GuardRefused, guarded_apply, guarded_memit
from ..editing.memit import BATCH_METHODS, memit_layers
from ..errors import CromeError
from ..models import LoadedModel
from .context import RunContext
from .datasets import Case
from .measure import generation_matches, ppl_fields, sample, score_targets, template_prefix, with_prefix
from .metrics import accuracy, agreement, fluency, prob, score_and_magnitude
from .options import check_options
from .record import CaseRecord
from .results import ResultsFile, check_resumable, timing_path
from .sequential import SequentialRun

TEST_PREFIXES = ("none", "fixed", "random")


# ---------------------------------------------------------------- one case's numbers

def _pairs(case: Case) -> tuple[list[tuple[str, str]], dict[str, slice]]:
    """The (prompt, target) pairs a case is scored on, and where each group sits."""
    r = case.request
    pairs, where = [], {}
    groups = {
        "rewrite": [(r.text(), r.target_new), (r.text(), r.target_true)],
        "paraphrase": [(p, t) for p in case.paraphrase_prompts for t in (r.target_new, r.target_true)],
        "neighborhood": [(p, t) for p in case.neighborhood_prompts for t in (r.target_new, case.neighborhood_target)],
    }
    for name, group in groups.items():
        where[name] = slice(len(pairs), len(pairs) + len(group))
        pairs += group
    return pairs, where


def _metrics(scores, where: dict[str, slice], before=None) -> dict:
    """Both metric families from the scored pairs (``before``: the unedited model's scores)."""
    def probs(name):
        group = scores[where[name]]
        return [prob(s.logprobs) for s in group[0::2]], [prob(s.logprobs) for s in group[1::2]]

    (rw_new, rw_true), (pa_new, pa_true) = probs("rewrite"), probs("paraphrase")
    nb_new, nb_true = probs("neighborhood")
    es, em = score_and_magnitude(rw_new, rw_true)
    ps, pm = score_and_magnitude(pa_new, pa_true)
    ns, nm = score_and_magnitude(nb_true, nb_new)
    out = dict(es=es, em=em, ps=ps, pm=pm, ns=ns, nm=nm, p_new=rw_new[0], p_true=rw_true[0],
               rewrite_acc=accuracy(scores[where["rewrite"]][0].hits),
               rephrase_acc=_mean([accuracy(s.hits) for s in scores[where["paraphrase"]][0::2]]))
    if before is not None:
        post, pre = scores[where["neighborhood"]][1::2], before[where["neighborhood"]][1::2]
        out["locality"] = _mean([agreement(b.predicted, a.predicted) for b, a in zip(pre, post)])
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def choose_test_prefix(mode: str, templates: list[str], seed: int, case_id: str) -> str | None:
    """The prefix prepended at test time: none, the first context template's text, or
    one of the edit's context templates drawn with (seed, case_id)."""
    if mode not in TEST_PREFIXES:
        raise CromeError(f"unknown test prefix '{mode}': choose one of {', '.join(TEST_PREFIXES)}")
    sampled = [t for t in templates if template_prefix(t)]
    if mode == "none" or not sampled:
        return None
    if mode == "fixed":
        return template_prefix(sampled[0])
    return template_prefix(random.Random(f"{seed}:{case_id}").choice(sampled))


def _record(case: Case, ctx: RunContext, prefix: str | None) -> CaseRecord:
    """A case's record before it is edited: the run's settings and the request."""
    req = case.request
    return CaseRecord(case_id=case.case_id, settings=ctx.settings, test_prefix_text=prefix, prompt=req.text(),
                      subject=req.subject, target_new=req.target_new, target_true=req.target_true)


class _Scorer:
    """Scores the cases' (prompt, target) pairs, plain and after each case's test prefix, in
    shared batches; with an overlay, each case under its own edit."""

    def __init__(self, lm: LoadedModel, cases: list[Case], prefixes: list[str | None]):
        self.lm, self.prefixes = lm, prefixes
        self.groups = [_pairs(case) for case in cases]
        self.befores = self(range(len(cases)))   # the unedited model's scores

    def __call__(self, indices, overlay=None):
        """Per case in ``indices``: (scores, scores with its test prefix or None)."""
        pairs, owners, spans = [], [], []
        for slot, i in enumerate(indices):
            plain = self.groups[i][0]
            prefixed = [(with_prefix(self.prefixes[i], p), t) for p, t in plain] if self.prefixes[i] else []
            spans.append((len(pairs), len(plain), len(prefixed)))
            pairs += plain + prefixed
            owners += [slot] * (len(plain) + len(prefixed))
        scores = score_targets(self.lm, pairs, overlay=overlay, owners=owners)
        return [(scores[a:a + n], scores[a + n:a + n + m] if m else None) for a, n, m in spans]


def evaluate_cases(lm: LoadedModel, cases: list[Case], ctx: RunContext, measure_ppl: bool = True, keep: bool = False,
                   prepared_by_id: dict | None = None) -> list[tuple[CaseRecord, EditHandle | None]]:
    """Edit and measure independent cases: [(record, handle or None)] in case order.

    Each case is edited (the guard judges it, with the edit in W) and W restored; then every
    case's edited model is measured in shared forward passes, its edit applied to its own rows
    as an activation hook (``Overlay``), the way writing ΔW into W would compute them.
    ``keep`` (one case, or a MEMIT batch: a sequential run) leaves the edit in W, measured there;
    its handle is returned. ``prepared_by_id``: each case's ``Prepared`` (keys and v*) when computed
    together (``prepare_together``), by case id."""
    s = ctx.settings
    if keep and len(cases) != 1 and s.method not in BATCH_METHODS:
        raise CromeError("a kept edit is measured in the weights: one case at a time")
    prefixes = [choose_test_prefix(s.test_prefix, ctx.templates, s.seed, c.case_id) for c in cases]
    recs = [_record(c, ctx, p) for c, p in zip(cases, prefixes)]
    scored = _Scorer(lm, cases, prefixes)
    for rec, (plain, prefixed), (_, where) in zip(recs, scored.befores, scored.groups):
        rec.before = _metrics(plain, where)
        rec.before_prefixed = _metrics(prefixed, where) if prefixed else None

    edit_all = _edit_batch if s.method in BATCH_METHODS else _edit_each
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


def _measure(lm, cases, recs, ctx: RunContext, scored: _Scorer, applied, overlay, measure_ppl: bool) -> None:
    """The edited models' metrics, perplexity and fluency into the applied cases' records."""
    for i, (plain, prefixed) in zip(applied, scored(applied, overlay)):
        where, before = scored.groups[i][1], scored.befores[i]
        recs[i].metrics = _metrics(plain, where, before[0])
        if prefixed:
            recs[i].metrics_prefixed = _metrics(prefixed, where, before[1])
    monitor = ctx.monitor
    if monitor is not None and measure_ppl:
        ppls = monitor.each(overlay) if overlay is not None else [monitor()] * len(applied)
        for i, ppl in zip(applied, ppls):
            recs[i].set(**ppl_fields(monitor.baseline, ppl))
    s = ctx.settings
    if s.gen_em:
        _generation_em(lm, [cases[i] for i in applied], [recs[i] for i in applied], scored, applied, overlay)
    for slot, i in enumerate(applied):
        if cases[i].generation_prompts and s.gen_tokens:
            texts = sample(lm, cases[i].generation_prompts, s.gen_tokens, s.seed, overlay=overlay,
                           owner=slot if overlay is not None else None)
            recs[i].fluency = fluency(texts)


def _generation_em(lm, cases, recs, scored: _Scorer, indices, overlay) -> None:
    """Generation-based exact match of the new target (``measure.generation_matches``) on the edit
    prompt (``gen_em``) and its paraphrases (``gen_em_paraphrase``), plain and after the test prefix."""
    for prefixed in (False, True):
        pairs, owners, spans = [], [], []
        for slot, (case, i) in enumerate(zip(cases, indices)):
            prefix = scored.prefixes[i]
            if prefixed and not prefix:
                spans.append(None)
                continue
            prompts = [case.request.text(), *case.paraphrase_prompts]
            spans.append((len(pairs), len(prompts)))
            pairs += [(with_prefix(prefix if prefixed else None, p), case.request.target_new) for p in prompts]
            owners += [slot] * len(prompts)
        hits = generation_matches(lm, pairs, overlay=overlay, owners=owners) if pairs else []
        for rec, span in zip(recs, spans):
            metrics = rec.metrics_prefixed if prefixed else rec.metrics
            if span is None or metrics is None:
                continue
            at, n = span
            metrics["gen_em"] = float(hits[at])
            metrics["gen_em_paraphrase"] = _mean([float(h) for h in hits[at + 1:at + n]])


def _edit_each(lm, cases, recs, ctx: RunContext, keep: bool, prepared_by_id: dict):
    """ROME and C-ROME: each case's edit on its own, judged by the guard in W, then restored
    (or kept). Returns (handles, edits to measure as an overlay, indices of applied cases)."""
    s = ctx.settings
    handles: list[EditHandle | None] = [None] * len(cases)
    edits, applied = [], []
    for i, (case, rec) in enumerate(zip(cases, recs)):
        try:
            edit, handle, decision = guarded_apply(lm, case.request, s.method, s.guard, rule=ctx.rule,
                                                   verifier=ctx.verifier, prepared=prepared_by_id.get(case.case_id),
                                                   neighbours=not keep, hparams=ctx.hparams, templates=ctx.templates,
                                                   seed=s.seed, mom2=ctx.stats, layer_choice=ctx.layer_choice)
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


def _edit_batch(lm, cases, recs, ctx: RunContext, keep: bool, prepared_by_id: dict):
    """MEMIT and C-MEMIT: the cases as one update, left in W to be measured there (every case
    shares it). The guard (off or verify) judges the whole update."""
    s = ctx.settings
    first = memit_layers(ctx.hparams, lm.num_layers)[0]
    for name, check in (("perplexity monitor", ctx.monitor), ("guard's probe", ctx.verifier)):
        if check is not None and check.layer > first:
            raise CromeError(f"the {name} starts at layer {check.layer}; MEMIT edits layer {first}")
    try:
        edit, handle, decision = guarded_memit(lm, [c.request for c in cases], s.method, s.guard, rule=ctx.rule,
                                               verifier=ctx.verifier, hparams=ctx.hparams, stats=ctx.stats,
                                               templates=ctx.templates, seed=s.seed, null_space=ctx.null_space)
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


# ---------------------------------------------------------------- runs

def prepare_together(lm: LoadedModel, cases: list[Case], ctx: RunContext) -> dict:
    """Keys and v* of independent cases computed together (one batched forward per step), by case id.
    Empty when a case cannot be prepared: each case is then prepared alone and reports its own error."""
    from ..editing.edit import prepare_edits

    if len(cases) < 2 or ctx.settings.method in BATCH_METHODS:
        return {}
    try:
        prepared = prepare_edits(lm, [c.request for c in cases], hparams=ctx.hparams, templates=ctx.templates,
                                 seed=ctx.settings.seed, layer_choice=ctx.layer_choice)
    except CromeError:
        return {}
    return {c.case_id: p for c, p in zip(cases, prepared)}


# --edits-per-pass by device, chosen by measurement (docs/SPEED.md, benchmarks/bench_eval.py): on the
# 2-core CPU K = 2 ran 1.15x the cases per minute of K = 1 at 1.78 GiB peak; K = 4 ran 1.18x but
# needed 2.14 GiB, over the 2 GB budget. No GPU was measured: 1 until one is.
DEFAULT_EDITS_PER_PASS = {"cpu": 2}


def default_edits_per_pass(device_type: str) -> int:
    return DEFAULT_EDITS_PER_PASS.get(device_type, 1)


def _chunks(items, size: int):
    """(cases before it, chunk) of ``size`` consecutive items (the last may be shorter)."""
    items, start = iter(items), 0
    while chunk := list(islice(items, size)):
        yield start, chunk
        start += len(chunk)


def run(lm: LoadedModel, cases: list[Case], ctx: RunContext, out, resume: bool = False, progress=None,
        edits_per_pass: int = 1) -> list[dict]:
    """Evaluate ``cases`` into the results file ``out``; returns every record of the file (earlier ones included).

    ``progress(iterable, total, description)`` wraps the loop (a progress bar). ``edits_per_pass``
    K > 1 computes the keys and v* of K cases together and measures their K edited models in shared
    forward passes: the records are K = 1's, up to float summation order. MEMIT edits
    ``batch_size`` cases as one update. A sequential run checkpoints each update's factors and
    ``resume`` continues it from them, bit for bit (``SequentialRun``)."""
    s = ctx.settings
    check_options(s.method, guard=s.guard, batch_size=s.batch_size, edits_per_pass=edits_per_pass,
                  sequential=s.sequential)
    results, timing = ResultsFile(out), ResultsFile(timing_path(out))
    done = results.read()
    check_resumable(done, s, results.path, resume)
    ctx = ctx.with_monitor(lm)   # its baseline: the unedited model
    seq = SequentialRun(lm, ctx, results) if s.sequential else None
    per_chunk = s.batch_size if s.method in BATCH_METHODS else edits_per_pass
    records = []
    with closing(seq) if seq else nullcontext():   # a sequential run gives the original weights back
        done = seq.resume(done, cases) if seq else done
        ctx = seq.ctx if seq else ctx   # an AlphaEdit run's running key sum is the run's
        records += done
        finished = {r["case_id"] for r in done}
        todo = [c for c in cases if c.case_id not in finished]
        progress = progress or (lambda it, total, description: it)
        steps = progress(todo, len(todo), f"{s.method} on {len(todo)} cases")
        for before, chunk in _chunks(steps, per_chunk):
            start = time.perf_counter()
            n_done, last = len(done) + before + len(chunk), before + len(chunk) == len(todo)
            monitor_now = seq is None or seq.due(s.monitor_every, n_done, len(chunk), last)
            retain_now = seq.due(s.retained_every, n_done, len(chunk), last) if seq and s.retained_every \
                else monitor_now
            evaluated = evaluate_cases(lm, chunk, ctx, measure_ppl=monitor_now, keep=seq is not None,
                                       prepared_by_id=prepare_together(lm, chunk, ctx))
            if seq:
                seq.record(evaluated, chunk, n_done, monitor_now, retain_now)
            seconds = (time.perf_counter() - start) / len(chunk)
            for (rec, _), case in zip(evaluated, chunk):
                line = rec.to_dict()
                results.append(line)
                timing.append(dict(case_id=case.case_id, seconds=seconds, edits_per_pass=edits_per_pass))
                records.append(line)
    return records
