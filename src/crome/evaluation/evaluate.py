"""``crome eval``: edit, measure, restore, one case at a time; or edits that accumulate.

Each case gives one JSON line (``Record``) with every metric of ``metrics.py``,
the edit's diagnostics, the perplexity check, and what reproduces it (seed,
context templates, hyper-parameters, test prefix). Lines are appended with one
``write`` each and flushed to disk, so a killed run loses nothing finished and
``--resume`` continues it. Timings go to a separate ``.timing.jsonl`` file, so
the results of a resumed run are byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..editing.fast import PerplexityMonitor
from ..editing.guard import GuardRefused, GuardRule, Verifier, guarded_apply
from ..editing.hparams import Hparams
from ..editing.mom2 import KeyStats
from ..errors import CromeError
from ..models import LoadedModel
from .datasets import Case
from .measure import collapsed, sample, score_targets, template_prefix
from .metrics import accuracy, agreement, fluency, prob, score_and_magnitude

TEST_PREFIXES = ("none", "fixed", "random")


@dataclass(frozen=True)
class Settings:
    """What a run is: every record carries it, and ``--resume`` checks it."""

    method: str
    model: str
    layer: int
    seed: int
    test_prefix: str = "fixed"
    data: str = ""
    ppl_data: str = ""
    gen_tokens: int = 100
    sequential: bool = False
    monitor_every: int = 1
    guard: str = "off"
    guard_threshold: float | None = None
    key_stats_source: str = "off"   # source of C (mom2 adjustment), or "off"
    dtype: str = "float32"          # the model's weights while editing and measuring


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

    (rw_new, rw_true), (pa_new, pa_true), (nb_new, nb_true) = probs("rewrite"), probs("paraphrase"), probs("neighborhood")
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


def evaluate_case(lm: LoadedModel, case: Case, settings: Settings, hp: Hparams, templates: list[str],
                  monitor: PerplexityMonitor | None, measure_ppl: bool = True, keep: bool = False,
                  stats: KeyStats | None = None, rule: GuardRule | None = None, verifier: Verifier | None = None,
                  layer_choice=None, prepared=None):
    """Edit, measure and (unless ``keep``) restore one case. Returns (record, handle or None).

    ``stats``: key statistics (needed when ``hp.mom2_adjustment``); ``rule``/``verifier``: the guard's;
    ``prepared``: the case's keys and v*, when computed together with other cases' (``prepare_edits``)."""
    prefix = choose_test_prefix(settings.test_prefix, templates, settings.seed, case.case_id)
    req = case.request
    rec = dict(case_id=case.case_id, **asdict(settings), test_prefix_text=prefix,
               prompt=req.text(), subject=req.subject, target_new=req.target_new, target_true=req.target_true,
               error=None, applied=False)
    pairs, where = _pairs(case)
    before = score_targets(lm, pairs)
    before_px = score_targets(lm, pairs, prefix=prefix) if prefix else None
    rec["before"] = _metrics(before, where)
    rec["before_prefixed"] = _metrics(before_px, where) if prefix else None
    try:
        edit, handle, decision = guarded_apply(lm, req, settings.method, settings.guard, rule=rule, verifier=verifier,
                                               prepared=prepared, hparams=hp, templates=templates, seed=settings.seed,
                                               mom2=stats, layer_choice=layer_choice)
    except GuardRefused as e:
        rec.update(error=str(e), **{k: v for k, v in e.decision.items() if k != "guard"})
        if e.edit is not None:
            rec.update(asdict(e.edit.diagnostics), key_stats=e.edit.key_stats, layer_choice=e.edit.layer_choice)
        return rec, None
    except CromeError as e:
        rec["error"] = str(e)
        return rec, None
    rec.update({k: v for k, v in decision.items() if k != "guard"})
    rec.update(asdict(edit.diagnostics), key_stats=edit.key_stats, layer_choice=edit.layer_choice)
    ppl_before = monitor.baseline if monitor is not None else None
    rec.update(ppl_before=ppl_before, ppl_after=None, ppl_ratio=None, collapsed=None,
               metrics=None, metrics_prefixed=None, fluency=None)
    if handle is None:
        rec["error"] = "non-finite update (NaN or inf): not applied"
    else:
        try:
            rec["applied"] = True
            rec["metrics"] = _metrics(score_targets(lm, pairs), where, before)
            if prefix:
                rec["metrics_prefixed"] = _metrics(score_targets(lm, pairs, prefix=prefix), where, before_px)
            if monitor is not None and measure_ppl:
                ppl = monitor()
                rec.update(ppl_after=ppl, ppl_ratio=ppl / ppl_before, collapsed=collapsed(ppl_before, ppl))
            if case.generation_prompts and settings.gen_tokens:
                texts = sample(lm, case.generation_prompts, settings.gen_tokens, settings.seed)
                rec["fluency"] = fluency(texts)
        finally:
            if not keep:
                handle.restore()
                handle = None
    rec.update(context_templates=list(templates), hparams=hp.to_dict())
    return rec, handle


def retained_efficacy(lm: LoadedModel, cases: list[Case], prefixes: list[str | None]) -> float:
    """Share of earlier edits whose prompt still prefers the new target (ES), each with its own prefix."""
    wins = []
    for prefix in dict.fromkeys(prefixes):
        group = [c for c, p in zip(cases, prefixes) if p == prefix]
        pairs = [(c.request.text(), t) for c in group for t in (c.request.target_new, c.request.target_true)]
        scores = score_targets(lm, pairs, prefix=prefix)
        wins += [prob(a.logprobs) > prob(b.logprobs) for a, b in zip(scores[0::2], scores[1::2])]
    return sum(wins) / len(wins) if wins else float("nan")


# ---------------------------------------------------------------- results files

class ResultsFile:
    """A JSONL file of records, appended one whole line per ``write`` and fsynced."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """Finished records; a last line cut off by a kill is dropped from the file."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(end)
        records = []
        for i, line in enumerate(raw[:end].splitlines()):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise CromeError(f"{self.path}: line {i + 1} is not JSON: not a crome results file?") from None
        return records

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(json_safe(record), allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def json_safe(x):
    """NaN and inf become null: the file stays strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def timing_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".timing.jsonl")


def check_resumable(done: list[dict], settings: Settings | None, out: Path, resume: bool) -> None:
    """A results file with records is continued only with ``resume`` and the same settings
    (``settings=None``: check the flag only)."""
    if not done:
        return
    if not resume:
        raise CromeError(f"{out} already holds {len(done)} results: pass --resume to continue that run, "
                         f"or choose another --out")
    if settings is None:
        return
    if settings.sequential:
        raise CromeError(f"{out}: a sequential run can't be resumed (its edits live in the model); start it anew")
    want = asdict(settings)
    defaults = asdict(Settings(method="", model="", layer=0, seed=0))
    for key, value in want.items():
        if done[0].get(key, defaults[key]) != value:  # a field added later reads as its default
            raise CromeError(f"{out} holds a run with {key}={done[0].get(key)!r}, not {value!r}: "
                             f"choose another --out")


# ---------------------------------------------------------------- runs

def prepare_together(lm: LoadedModel, cases: list[Case], hp: Hparams, templates: list[str], seed: int,
                     layer_choice=None) -> dict:
    """Keys and v* of independent cases computed together (one batched forward per step), by case id.
    Empty when a case cannot be prepared: each case is then prepared alone and reports its own error."""
    from ..editing.edit import prepare_edits

    try:
        prepared = prepare_edits(lm, [c.request for c in cases], hparams=hp, templates=templates, seed=seed,
                                 layer_choice=layer_choice)
    except CromeError:
        return {}
    return {c.case_id: p for c, p in zip(cases, prepared)}


def run(lm: LoadedModel, cases: list[Case], settings: Settings, hp: Hparams, templates: list[str],
        texts: list[str] | None, out: str | os.PathLike, resume: bool = False, progress=None,
        stats: KeyStats | None = None, rule: GuardRule | None = None, verifier: Verifier | None = None,
        layer_choice=None, edits_per_pass: int = 1) -> list[dict]:
    """Evaluate ``cases`` into ``out``; returns every record of the file (earlier ones included).

    ``progress(iterable, total, description)`` wraps the loop (a progress bar); ``stats``,
    ``rule`` and ``verifier`` as in ``evaluate_case``. ``edits_per_pass`` K > 1 computes the v*
    of K cases together, then measures each case on its own, as K = 1 does."""
    if edits_per_pass < 1:
        raise CromeError("--edits-per-pass must be at least 1")
    if edits_per_pass > 1 and settings.sequential:
        raise CromeError("--edits-per-pass computes edits independently: a sequential run's edits build on each other")
    results, timing = ResultsFile(out), ResultsFile(timing_path(out))
    done = results.read()
    check_resumable(done, settings, results.path, resume)
    finished = {r["case_id"] for r in done}
    todo = [c for c in cases if c.case_id not in finished]
    monitor = PerplexityMonitor(lm, texts, hp.layer) if texts else None
    progress = progress or (lambda it, total, description: it)
    original = lm.mlp_out(hp.layer).weight.detach().clone() if settings.sequential else None
    applied: list[tuple[Case, str | None]] = []
    records = list(done)
    together: dict = {}
    try:
        for step, case in enumerate(progress(todo, len(todo), f"{settings.method} on {len(todo)} cases")):
            start = time.perf_counter()
            if edits_per_pass > 1 and step % edits_per_pass == 0:
                together = prepare_together(lm, todo[step:step + edits_per_pass], hp, templates, settings.seed,
                                            layer_choice)
            monitor_now = not settings.sequential or (step + 1) % settings.monitor_every == 0 or step == len(todo) - 1
            rec, handle = evaluate_case(lm, case, settings, hp, templates, monitor, measure_ppl=monitor_now,
                                        keep=settings.sequential, stats=stats, rule=rule, verifier=verifier,
                                        layer_choice=layer_choice, prepared=together.pop(case.case_id, None))
            if settings.sequential:
                if handle is not None:
                    applied.append((case, rec["test_prefix_text"]))
                rec.update(step=step + 1, n_applied=len(applied), retained_efficacy=None,
                           retained_efficacy_prefixed=None)
                if monitor_now and applied:
                    cs = [c for c, _ in applied]
                    rec["retained_efficacy"] = retained_efficacy(lm, cs, [None] * len(cs))
                    if settings.test_prefix != "none":
                        rec["retained_efficacy_prefixed"] = retained_efficacy(lm, cs, [p for _, p in applied])
            results.append(rec)
            timing.append(dict(case_id=case.case_id, seconds=time.perf_counter() - start,
                               edits_per_pass=edits_per_pass))
            records.append(rec)
    finally:
        if original is not None:
            with torch.no_grad():
                lm.mlp_out(hp.layer).weight.copy_(original)
    return records
