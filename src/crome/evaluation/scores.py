"""Scoring the cases of a run: every (prompt, target) pair of a case, plain and after its test prefix,
in shared batches (``CaseScorer``), into both metric families of ``metrics.py``, and generation exact
match; with an overlay, each case under its own edit."""

from __future__ import annotations

from ..models import LoadedModel
from ..scoring.measure import generation_matches, score_targets, with_prefix
from ..scoring.metrics import accuracy, agreement, prob, score_and_magnitude
from .datasets import Case


def case_pairs(case: Case) -> tuple[list[tuple[str, str]], dict[str, slice]]:
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


def case_metrics(scores, where: dict[str, slice], before=None) -> dict:
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
               rephrase_acc=mean([accuracy(s.hits) for s in scores[where["paraphrase"]][0::2]]))
    if before is not None:
        post, pre = scores[where["neighborhood"]][1::2], before[where["neighborhood"]][1::2]
        out["locality"] = mean([agreement(b.predicted, a.predicted) for b, a in zip(pre, post)])
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class CaseScorer:
    """Scores the cases' (prompt, target) pairs, plain and after each case's test prefix, in
    shared batches; with an overlay, each case under its own edit."""

    def __init__(self, lm: LoadedModel, cases: list[Case], prefixes: list[str | None]):
        self.lm, self.prefixes = lm, prefixes
        self.groups = [case_pairs(case) for case in cases]
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


def generation_em(lm, cases, recs, scored: CaseScorer, indices, overlay) -> None:
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
            metrics["gen_em_paraphrase"] = mean([float(h) for h in hits[at + 1:at + n]])
