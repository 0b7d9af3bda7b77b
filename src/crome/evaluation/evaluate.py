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

from ..editing.edit import EditHandle, Overlay, WeightsHandle
from ..editing.fast import PerplexityMonitor
from ..editing.guard import GuardRefused, GuardRule, Verifier, guarded_apply
from ..editing.hparams import Hparams
from ..editing.memit import BATCH_METHODS, edited_layers, memit_layers
from ..editing.mom2 import KeyStats
from ..errors import CromeError
from ..models import LoadedModel
from .checkpoint import FactorStore, replay, weights_sha
from .datasets import Case
from .measure import ppl_fields, sample, score_targets, template_prefix, with_prefix
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
    retained_every: int = 0         # sequential: retained efficacy every k-th edit (0: with the perplexity)
    guard: str = "off"
    guard_threshold: float | None = None
    key_stats_source: str = "off"   # source of C (mom2 adjustment), or "off"
    dtype: str = "float32"          # the model's weights while editing and measuring
    batch_size: int = 1             # MEMIT: cases edited as one update


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


def evaluate_cases(lm: LoadedModel, cases: list[Case], settings: Settings, hp: Hparams, templates: list[str],
                   monitor: PerplexityMonitor | None, measure_ppl: bool = True, keep: bool = False,
                   stats: KeyStats | None = None, rule: GuardRule | None = None, verifier: Verifier | None = None,
                   layer_choice=None, prepared: dict | None = None) -> list[tuple[dict, EditHandle | None]]:
    """Edit and measure independent cases: [(record, handle or None)] in case order.

    Each case is edited (the guard judges it, with the edit in W) and W restored; then every
    case's edited model is measured in shared forward passes, its edit applied to its own rows
    as an activation hook (``Overlay``), the way writing ΔW into W would compute them.
    ``keep`` (one case: a sequential run) leaves the edit in W, measured there; its handle is returned.
    ``stats``: key statistics (needed when ``hp.mom2_adjustment``); ``rule``/``verifier``: the guard's;
    ``prepared``: keys and v* computed together (``prepare_together``), by case id."""
    if keep and len(cases) != 1 and settings.method not in BATCH_METHODS:
        raise CromeError("a kept edit is measured in the weights: one case at a time")
    prepared = prepared or {}
    recs, groups, prefixes = [], [], []
    for case in cases:
        prefix = choose_test_prefix(settings.test_prefix, templates, settings.seed, case.case_id)
        req = case.request
        recs.append(dict(case_id=case.case_id, **asdict(settings), test_prefix_text=prefix,
                         prompt=req.text(), subject=req.subject, target_new=req.target_new,
                         target_true=req.target_true, error=None, applied=False))
        groups.append(_pairs(case))
        prefixes.append(prefix)

    def scored(indices, overlay=None):
        """Per case in ``indices``: (scores, scores with its test prefix or None), in shared batches."""
        pairs, owners, spans = [], [], []
        for slot, i in enumerate(indices):
            plain = groups[i][0]
            prefixed = [(with_prefix(prefixes[i], p), t) for p, t in plain] if prefixes[i] else []
            spans.append((len(pairs), len(plain), len(prefixed)))
            pairs += plain + prefixed
            owners += [slot] * (len(plain) + len(prefixed))
        scores = score_targets(lm, pairs, overlay=overlay, owners=owners)
        return [(scores[a:a + n], scores[a + n:a + n + m] if m else None) for a, n, m in spans]

    befores = scored(range(len(cases)))
    for rec, (plain, prefixed), (_, where) in zip(recs, befores, groups):
        rec["before"] = _metrics(plain, where)
        rec["before_prefixed"] = _metrics(prefixed, where) if prefixed else None

    edit_all = _edit_batch if settings.method in BATCH_METHODS else _edit_each
    handles, edits, applied = edit_all(lm, cases, recs, settings, hp, templates, monitor, keep, stats, rule,
                                       verifier, layer_choice, prepared)
    if not applied:
        return list(zip(recs, handles))

    overlay = Overlay(edits) if edits else None
    try:
        for i, (plain, prefixed) in zip(applied, scored(applied, overlay)):
            where, before = groups[i][1], befores[i]
            recs[i]["metrics"] = _metrics(plain, where, before[0])
            if prefixed:
                recs[i]["metrics_prefixed"] = _metrics(prefixed, where, before[1])
        if monitor is not None and measure_ppl:
            ppls = monitor.each(overlay) if overlay is not None else [monitor()] * len(applied)
            for i, ppl in zip(applied, ppls):
                recs[i].update(ppl_fields(monitor.baseline, ppl))
        for slot, i in enumerate(applied):
            if cases[i].generation_prompts and settings.gen_tokens:
                texts = sample(lm, cases[i].generation_prompts, settings.gen_tokens, settings.seed,
                               overlay=overlay, owner=slot if overlay is not None else None)
                recs[i]["fluency"] = fluency(texts)
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


def _edit_each(lm, cases, recs, settings, hp, templates, monitor, keep, stats, rule, verifier, layer_choice, prepared):
    """ROME and C-ROME: each case's edit on its own, judged by the guard in W, then restored
    (or kept). Returns (handles, edits to measure as an overlay, indices of applied cases)."""
    handles: list[EditHandle | None] = [None] * len(cases)
    edits, applied = [], []
    for i, (case, rec) in enumerate(zip(cases, recs)):
        try:
            edit, handle, decision = guarded_apply(lm, case.request, settings.method, settings.guard, rule=rule,
                                                   verifier=verifier, prepared=prepared.get(case.case_id),
                                                   neighbours=not keep,
                                                   hparams=hp, templates=templates, seed=settings.seed,
                                                   mom2=stats, layer_choice=layer_choice)
        except GuardRefused as e:
            rec.update(error=str(e), **{k: v for k, v in e.decision.items() if k != "guard"})
            if e.edit is not None:
                rec.update(asdict(e.edit.diagnostics), key_stats=e.edit.key_stats, layer_choice=e.edit.layer_choice)
            continue
        except CromeError as e:
            rec["error"] = str(e)
            continue
        rec.update({k: v for k, v in decision.items() if k != "guard"})
        rec.update(asdict(edit.diagnostics), key_stats=edit.key_stats, layer_choice=edit.layer_choice)
        _measured_fields(rec, monitor)
        if handle is None:
            rec["error"] = "non-finite update (NaN or inf): not applied"
        else:
            rec["applied"] = True
            if keep:
                handles[i] = handle
            else:
                handle.restore()
                edits.append(edit)
            applied.append(i)
        rec.update(context_templates=list(templates), hparams=hp.to_dict())
    return handles, edits, applied


def _measured_fields(rec: dict, monitor) -> None:
    rec.update(ppl_before=monitor.baseline if monitor is not None else None, ppl_after=None, ppl_ratio=None,
               collapsed=None, metrics=None, metrics_prefixed=None, fluency=None)


def _edit_batch(lm, cases, recs, settings, hp, templates, monitor, keep, stats, rule, verifier, layer_choice,
                prepared):
    """MEMIT and C-MEMIT: the cases as one update, left in W to be measured there (every case
    shares it). The guard (off or verify) judges the whole update."""
    from ..editing.memit import apply_memit

    if settings.guard not in ("off", "verify"):
        raise CromeError(f"--guard {settings.guard} is for ROME and C-ROME; MEMIT takes off or verify")
    first = memit_layers(hp, lm.num_layers)[0]
    for name, check in (("perplexity monitor", monitor), ("guard's probe", verifier)):
        if check is not None and check.layer > first:
            raise CromeError(f"the {name} starts at layer {check.layer}; MEMIT edits layer {first}")
    decision = dict(guard_rule=None, guard_predicted_collapse=None, guard_ppl_ratio=None,
                    guard_threshold=verifier.threshold if settings.guard == "verify" else None,
                    guard_action="applied", edited_with=settings.method)
    try:
        edit, handle = apply_memit(lm, [c.request for c in cases], settings.method, hparams=hp, stats=stats,
                                   templates=templates, seed=settings.seed)
    except CromeError as e:
        for rec in recs:
            rec["error"] = str(e)
        return [None] * len(cases), [], []
    if settings.guard == "verify":
        ratio = verifier.ratio()
        decision["guard_ppl_ratio"] = ratio
        if not ratio <= verifier.threshold:
            handle.restore()
            decision["guard_action"] = "rolled back"
            for rec, extra in zip(recs, edit.per_request):
                rec.update(error=f"guard rolled back the {settings.method} batch: probe perplexity grew {ratio:.3g}x "
                                 f"> {verifier.threshold:g}", **decision, **extra, **edit.record())
            return [None] * len(cases), [], []
    for rec, extra in zip(recs, edit.per_request):
        rec.update(decision, **extra, **edit.record(), layer_choice=layer_choice.record() if layer_choice else None)
        _measured_fields(rec, monitor)
        rec["applied"] = True
        rec.update(context_templates=list(templates), hparams=hp.to_dict())
    return [handle] * len(cases), [], list(range(len(cases)))


def evaluate_case(lm: LoadedModel, case: Case, settings: Settings, hp: Hparams, templates: list[str],
                  monitor: PerplexityMonitor | None, measure_ppl: bool = True, keep: bool = False, **kwargs):
    """``evaluate_cases`` for one case: (record, handle or None); ``prepared``: its keys and v*, if computed."""
    prepared = kwargs.pop("prepared", None)
    together = {case.case_id: prepared} if prepared is not None else None
    return evaluate_cases(lm, [case], settings, hp, templates, monitor, measure_ppl, keep, prepared=together,
                          **kwargs)[0]


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

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file with ``records`` (written aside, then moved into place)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(b"".join((json.dumps(json_safe(r), allow_nan=False) + "\n").encode() for r in records))
        os.replace(tmp, self.path)

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


# How often a sequential run measures: a resumed run may change it (each record carries its own), since
# measuring changes no weight. A long run can thin out retained efficacy, whose cost grows with the edits.
CADENCE = ("monitor_every", "retained_every")


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
    want = asdict(settings)
    defaults = asdict(Settings(method="", model="", layer=0, seed=0))
    for key, value in want.items():
        if key in CADENCE:
            continue
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


# --edits-per-pass by device, chosen by measurement (docs/SPEED.md, benchmarks/bench_eval.py): on the
# 2-core CPU K = 2 ran 1.15x the cases per minute of K = 1 at 1.78 GiB peak; K = 4 ran 1.18x but
# needed 2.14 GiB, over the 2 GB budget. No GPU was measured: 1 until one is.
DEFAULT_EDITS_PER_PASS = {"cpu": 2}


def default_edits_per_pass(device_type: str) -> int:
    return DEFAULT_EDITS_PER_PASS.get(device_type, 1)


def run(lm: LoadedModel, cases: list[Case], settings: Settings, hp: Hparams, templates: list[str],
        texts: list[str] | None, out: str | os.PathLike, resume: bool = False, progress=None,
        stats=None, rule: GuardRule | None = None, verifier: Verifier | None = None,
        layer_choice=None, edits_per_pass: int = 1) -> list[dict]:
    """Evaluate ``cases`` into ``out``; returns every record of the file (earlier ones included).

    ``progress(iterable, total, description)`` wraps the loop (a progress bar); ``stats`` (for
    MEMIT: by layer), ``rule`` and ``verifier`` as in ``evaluate_cases``. ``edits_per_pass`` K > 1
    computes the keys and v* of K cases together and measures their K edited models in shared
    forward passes: the records are K = 1's, up to float summation order. MEMIT edits
    ``settings.batch_size`` cases as one update. A sequential run checkpoints each update's factors
    (``checkpoint.py``) and ``resume`` continues it from them, bit for bit."""
    batch = settings.method in BATCH_METHODS
    if edits_per_pass < 1:
        raise CromeError("--edits-per-pass must be at least 1")
    if edits_per_pass > 1 and (settings.sequential or batch):
        raise CromeError("--edits-per-pass computes ROME edits independently: not for sequential runs or MEMIT "
                         "(whose --batch-size edits cases as one update)")
    if settings.batch_size < 1:
        raise CromeError("--batch-size must be at least 1")
    if settings.batch_size > 1 and not batch:
        raise CromeError("--batch-size is MEMIT's (cases as one update); ROME edits one fact at a time "
                         "(--edits-per-pass computes several at once)")
    per_chunk = settings.batch_size if batch else edits_per_pass
    results, timing = ResultsFile(out), ResultsFile(timing_path(out))
    done = results.read()
    check_resumable(done, settings, results.path, resume)
    store = FactorStore(results.path)
    layers = edited_layers(settings.method, hp, lm.num_layers)
    original = WeightsHandle(lm, layers) if settings.sequential else None
    monitor = PerplexityMonitor(lm, texts, layers[0]) if texts else None   # its baseline: the unedited model
    applied: list[tuple[Case, str | None]] = []
    updates = 0
    if settings.sequential:
        try:
            done, updates = _restore_sequential(lm, done, results, store, layers)
        except BaseException:
            original.restore()
            raise
        by_id = {c.case_id: c for c in cases}
        applied = [(by_id[r["case_id"]], r["test_prefix_text"]) for r in done if r["applied"] and r["case_id"] in by_id]
    finished = {r["case_id"] for r in done}
    todo = [c for c in cases if c.case_id not in finished]
    progress = progress or (lambda it, total, description: it)
    records = list(done)
    chunk: list[Case] = []
    try:
        for step, case in enumerate(progress(todo, len(todo), f"{settings.method} on {len(todo)} cases")):
            chunk.append(case)
            if len(chunk) < per_chunk and step < len(todo) - 1:
                continue
            start = time.perf_counter()
            together = prepare_together(lm, chunk, hp, templates, settings.seed, layer_choice) \
                if len(chunk) > 1 and not batch else {}
            n_done = len(done) + step + 1
            def due(every: int) -> bool:   # this chunk reaches a multiple of ``every``, or ends the run
                return n_done % every < len(chunk) or step == len(todo) - 1

            monitor_now = not settings.sequential or due(settings.monitor_every)
            retain_now = due(settings.retained_every) if settings.retained_every else monitor_now
            evaluated = evaluate_cases(lm, chunk, settings, hp, templates, monitor, measure_ppl=monitor_now,
                                       keep=settings.sequential, stats=stats, rule=rule, verifier=verifier,
                                       layer_choice=layer_choice, prepared=together)
            if settings.sequential:
                updates += 1
                kept = next((h for _, h in evaluated if h is not None), None)
                store.write(updates, [c.case_id for c in chunk], kept.factors if kept is not None else {})
                if kept is None and monitor_now and monitor is not None:
                    # nothing applied (rolled back, refused, failed): the curve still gets its point,
                    # the perplexity of the model as the earlier updates left it
                    fields = dict(ppl_before=monitor.baseline, **ppl_fields(monitor.baseline, monitor()))
                    for rec, _ in evaluated:
                        rec.update(fields)
                sha = weights_sha(lm, layers)
            seconds = (time.perf_counter() - start) / len(chunk)
            for n, ((rec, handle), done_case) in enumerate(zip(evaluated, chunk)):
                if settings.sequential:
                    if handle is not None:
                        applied.append((done_case, rec["test_prefix_text"]))
                    rec.update(step=n_done - len(chunk) + n + 1, update=updates, n_applied=len(applied),
                               weights_sha=sha, retained_efficacy=None, retained_efficacy_prefixed=None)
                    if retain_now and applied and n == len(chunk) - 1:
                        cs = [c for c, _ in applied]
                        rec["retained_efficacy"] = retained_efficacy(lm, cs, [None] * len(cs))
                        if settings.test_prefix != "none":
                            rec["retained_efficacy_prefixed"] = retained_efficacy(lm, cs, [p for _, p in applied])
                results.append(rec)
                timing.append(dict(case_id=done_case.case_id, seconds=seconds, edits_per_pass=edits_per_pass))
                records.append(rec)
            chunk = []
    finally:
        if original is not None:
            original.restore()
    return records


def _restore_sequential(lm: LoadedModel, done: list[dict], results: "ResultsFile", store: FactorStore,
                        layers) -> tuple[list[dict], int]:
    """Bring a sequential run's weights back to its last finished update: (records kept, updates).

    An update whose records were not all written (a kill between its checkpoint and its last
    record) is dropped, file and records, and runs again."""
    if not done:
        store.clear()
        return done, 0
    finished = {r["case_id"] for r in done}
    saved = []   # each file read once: checked here, then replayed
    for n in store.updates():
        update = store.read(n) if n == len(saved) + 1 else None
        if update is None or not set(update["case_ids"]) <= finished:
            break
        saved.append(update)
    updates = len(saved)
    keep = [r for r in done if r.get("update", 0) <= updates]
    if len(keep) != len(done):
        results.rewrite(keep)
    store.drop_after(updates)
    replay(lm, saved)
    if keep and weights_sha(lm, layers) != keep[-1].get("weights_sha"):
        raise CromeError(f"{results.path}: its checkpoint does not give the weights its last record saw; "
                         f"start the run anew")
    return keep, updates
