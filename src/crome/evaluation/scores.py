"""Scoring the cases of a run: every (prompt, target) pair of a case, plain, after its test prefix and
(its edit prompt and paraphrases) after a natural sentence, in shared batches (``CaseScorer``), into
both metric families of ``metrics.py``; and generation exact match, plain, prefixed, after the natural
sentence and through the chat template (``scoring.readings``); with an overlay, each case under its own
edit."""

from __future__ import annotations

from ..models import LoadedModel
from ..scoring.measure import generation_matches, greedy_answers, score_targets, with_prefix
from ..scoring.metrics import accuracy, agreement, prob, score_and_magnitude
from ..scoring.readings import CHAT_TOKENS, OPTIONAL_READINGS, chat_answer_matches, chat_text
from .datasets import Case

# the contexts a case is scored in (``CaseScorer``), and the record group each one's metrics go to
CONTEXTS = {"plain": "metrics", "prefix": "metrics_prefixed", "natural": "metrics_natural"}


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
    """Both metric families from the scored pairs (``before``: the unedited model's scores); without
    neighbourhood pairs (the natural context scores the edit's own prompts), efficacy alone."""
    def probs(name):
        group = scores[where[name]]
        return [prob(s.logprobs) for s in group[0::2]], [prob(s.logprobs) for s in group[1::2]]

    (rw_new, rw_true), (pa_new, pa_true) = probs("rewrite"), probs("paraphrase")
    es, em = score_and_magnitude(rw_new, rw_true)
    ps, pm = score_and_magnitude(pa_new, pa_true)
    out = dict(es=es, em=em, ps=ps, pm=pm, p_new=rw_new[0], p_true=rw_true[0],
               rewrite_acc=accuracy(scores[where["rewrite"]][0].hits),
               rephrase_acc=mean([accuracy(s.hits) for s in scores[where["paraphrase"]][0::2]]))
    if "neighborhood" not in where:
        return out
    nb_new, nb_true = probs("neighborhood")
    out["ns"], out["nm"] = score_and_magnitude(nb_true, nb_new)
    if before is not None:
        post, pre = scores[where["neighborhood"]][1::2], before[where["neighborhood"]][1::2]
        out["locality"] = mean([agreement(b.predicted, a.predicted) for b, a in zip(pre, post)])
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class CaseScorer:
    """Scores the cases' (prompt, target) pairs in each context of ``CONTEXTS`` (plain; after each
    case's test prefix; its edit prompt and paraphrases after its natural sentence), in shared
    batches; with an overlay, each case under its own edit."""

    def __init__(self, lm: LoadedModel, cases: list[Case], prefixes: list[str | None],
                 naturals: list[str | None] | None = None):
        self.lm, self.prefixes = lm, prefixes
        self.naturals = naturals or [None] * len(cases)
        self.groups = [case_pairs(case) for case in cases]
        self.befores = self(range(len(cases)))   # the unedited model's scores

    def where(self, i: int, context: str) -> dict[str, slice]:
        """Where each group sits among case ``i``'s pairs in ``context`` (the natural one: no neighbourhood)."""
        where = self.groups[i][1]
        return {k: v for k, v in where.items() if k != "neighborhood"} if context == "natural" else where

    def _pairs(self, i: int) -> dict[str, list[tuple[str, str]]]:
        plain, where = self.groups[i]
        own = plain[:where["neighborhood"].start]
        out = {"plain": plain}
        for context, prefix, pairs in (("prefix", self.prefixes[i], plain), ("natural", self.naturals[i], own)):
            if prefix:
                out[context] = [(with_prefix(prefix, p), t) for p, t in pairs]
        return out

    def __call__(self, indices, overlay=None) -> list[dict]:
        """Per case in ``indices``: {context: its scores} (a context without its prefix is left out)."""
        pairs, owners, spans = [], [], []
        for slot, i in enumerate(indices):
            span = {}
            for context, group in self._pairs(i).items():
                span[context] = (len(pairs), len(group))
                pairs += group
                owners += [slot] * len(group)
            spans.append(span)
        scores = score_targets(self.lm, pairs, overlay=overlay, owners=owners)
        return [{c: scores[a:a + n] for c, (a, n) in span.items()} for span in spans]

    def metrics(self, i: int, scores: dict, before: dict | None = None) -> dict:
        """{record group: metrics} of case ``i``'s scores per context (``before``: the unedited model's)."""
        return {CONTEXTS[c]: case_metrics(s, self.where(i, c), before[c] if before else None)
                for c, s in scores.items()}


def _gen_pairs(case: Case, context: str, prefix: str | None, tokenizer) -> list[tuple[str, str]] | None:
    """A case's edit prompt and paraphrases as generated in ``context`` (None: it has no such context)."""
    prompts = [case.request.text(), *case.paraphrase_prompts]
    if context == "chat":
        texts = [chat_text(tokenizer, p) for p in prompts]
        return None if None in texts else [(t, case.request.target_new) for t in texts]
    if context != "plain" and not prefix:
        return None
    return [(with_prefix(prefix if context != "plain" else None, p), case.request.target_new) for p in prompts]


def generation_em(lm, cases, recs, scored: CaseScorer, indices, overlay,
                  readings: tuple[str, ...] = OPTIONAL_READINGS) -> None:
    """Generation-based exact match of the new target (``measure.generation_matches``) on the edit
    prompt (``gen_em``) and its paraphrases (``gen_em_paraphrase``), plain, after the test prefix and
    after the natural sentence; and through the chat template (``gen_em_chat``, ``gen_em_chat_paraphrase``
    in the plain metrics: the greedy answer names the new target before the old, ``chat_answer_matches``),
    the last two where ``readings`` (the run's ``OPTIONAL_READINGS``) name them."""
    for context in ("plain", "prefix", *readings):
        pairs, owners, spans = [], [], []
        for slot, (case, i) in enumerate(zip(cases, indices)):
            prefix = {"prefix": scored.prefixes[i], "natural": scored.naturals[i]}.get(context)
            group = _gen_pairs(case, context, prefix, lm.tokenizer)
            spans.append((len(pairs), len(group)) if group else None)
            pairs += group or []
            owners += [slot] * len(group or [])
        hits = _chat_hits(lm, pairs, cases, spans, overlay, owners) if context == "chat" else \
            generation_matches(lm, pairs, overlay=overlay, owners=owners) if pairs else []
        for rec, span in zip(recs, spans):
            metrics = getattr(rec, CONTEXTS.get(context, "metrics"))
            if span is None or not metrics:
                continue
            at, n = span
            name = "gen_em_chat" if context == "chat" else "gen_em"
            metrics[name] = float(hits[at])
            metrics[name + "_paraphrase"] = mean([float(h) for h in hits[at + 1:at + n]])


def _chat_hits(lm, pairs, cases, spans, overlay, owners) -> list[bool]:
    """The chat reading of each pair: its greedy answer through the template names the new target first."""
    if not pairs:
        return []
    answers = greedy_answers(lm, [p for p, _ in pairs], [CHAT_TOKENS] * len(pairs), overlay=overlay, owners=owners)
    olds = []
    for case, span in zip(cases, spans):
        olds += [case.request.target_true] * (span[1] if span else 0)
    return [chat_answer_matches(a, t, old) for a, (_, t), old in zip(answers, pairs, olds)]
