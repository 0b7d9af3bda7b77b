"""An eval run as data: ``EvalJob`` says what to run, ``prepare`` does the once-per-run work.

``crome eval`` runs a job in this process (``run_job``) or on Ray workers
(``crome.distribution.workers``); ``crome sweep`` runs one job per grid cell. All three
share these steps, so a case's record is the same whichever ran it:

1. ``load``: the model, in the job's dtype and placement (``LoadOptions``);
2. ``prepare``: the layer, the key statistics, the context templates and the run's
   ``RunSettings`` (what every record carries and ``--resume`` checks), as a ``RunContext``;
3. ``with_checks``: the perplexity monitor and the guard, built on the model that runs the cases;
   then ``evaluate_cases`` on each batch of cases (``CaseRunner``) or ``evaluate.run``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from ..editing.context import RunContext, RunSettings
from ..editing.hparams import Hparams
from ..editing.layer_choice import resolve
from ..editing.memory import EditMemory, attach_saved
from ..editing.methods import DEFAULT_METHOD, method
from ..editing.mom2 import layer_stats, stats_for
from ..editing.norm_anchor import norm_anchor
from ..editing.null_space import NullSpace
from ..editing.rules import rule_for
from ..editing.templates import context_templates
from ..editing.verify import VERIFY_THRESHOLD, Verifier
from ..errors import CromeError
from ..models import LoadedModel, LoadOptions, load_model
from ..scoring.readings import OPTIONAL_READINGS, optional_readings
from ..scoring.texts import load_texts, perplexity_source
from .cases import evaluate_cases, prepare_together
from .datasets import Case, load_cases, select
from .datasets import resolve as resolve_data
from .evaluate import run
from .options import cases_per_chunk, check_options, default_edits_per_pass

Status = Callable[[str], contextlib.AbstractContextManager]


def quiet(_message: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class EvalJob:
    """Everything ``crome eval`` takes, as one record (a sweep cell is one of these)."""

    data: str
    out: str
    method: str = DEFAULT_METHOD
    model: str | None = None
    layer: int | str | None = None
    seed: int = 0
    mom2: bool = True                  # False: C = I (--no-mom2)
    mom2_corpus: str | None = None
    mom2_samples: int | None = None
    ppl_data: str | None = None
    n_cases: int | None = None
    case_ids: tuple[str, ...] | None = None
    test_prefix: str = "fixed"
    resume: bool = False
    skip_invalid: bool = False
    sequential: bool = False
    monitor_every: int = 1
    retained_every: int = 0            # sequential: retained efficacy every k-th edit (0: with the perplexity)
    retained_sample: int = 0           # sequential: retained efficacy on at most this many earlier edits (0: all)
    scores_every: int = 1              # sequential: every k-th edit's own ES/PS/NS and generation EM scored
    gen_tokens: int = 100
    gen_em: bool = False               # generation-based exact match too
    readings: tuple[str, ...] = OPTIONAL_READINGS   # after a natural sentence, through the chat template
    guard: str = "off"
    guard_threshold: float = VERIFY_THRESHOLD
    guard_rule: str | None = None
    guard_probe: str | None = None
    guard_efficacy: bool = True        # verify/fallback: also roll back an edit that did not take
    dtype: str = "auto"                # these four: how the model is loaded (``load_options``)
    device_map: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    edits_per_pass: int | None = None  # K cases per pass (a speed setting: records don't change); None: the device's
    batch_size: int = 1                # MEMIT: B cases as one update (a run setting)
    hparams: dict = field(default_factory=dict)   # overrides of the model's defaults (e.g. v_steps)

    def __post_init__(self):
        if self.monitor_every < 1:
            raise CromeError("--monitor-every must be at least 1")
        if self.retained_sample < 0:
            raise CromeError("--retained-sample must be at least 1 (or 0: every earlier edit)")
        if self.scores_every < 1:
            raise CromeError("--scores-every must be at least 1")
        if self.retained_every < 0:
            raise CromeError("--retained-every must be at least 1 (or 0: with the perplexity)")
        if self.n_cases is not None and self.n_cases < 1:
            raise CromeError("--n must be at least 1")
        given = self.readings if isinstance(self.readings, str) else ",".join(self.readings) or "none"
        object.__setattr__(self, "readings", optional_readings(given))
        check_options(self.method, mom2=self.mom2, mom2_corpus=self.mom2_corpus, guard=self.guard,
                      batch_size=self.batch_size, edits_per_pass=self.edits_per_pass,
                      sequential=self.sequential, hparams=self.hparams)
        unknown = set(self.hparams) - {f.name for f in fields(Hparams)}
        if unknown:
            raise CromeError(f"unknown hyper-parameter {sorted(unknown)[0]!r}")

    @property
    def load_options(self) -> LoadOptions:
        return LoadOptions(self.dtype, self.device_map, self.trust_remote_code, self.allow_pickle)

    def per_pass(self, device_type: str) -> int:
        """K, the cases whose edits are computed and measured together: ``edits_per_pass``, else
        the measured default for the device; 1 for sequential runs and MEMIT (whose batches are
        ``batch_size``; ``check_options`` refuses K > 1 there)."""
        if self.sequential or method(self.method).in_place:
            return 1
        return self.edits_per_pass or default_edits_per_pass(device_type)

    def cases_per_chunk(self, device_type: str) -> int:
        """Cases handled together: a MEMIT batch, or K edits per pass."""
        return cases_per_chunk(method(self.method), self.batch_size, self.per_pass(device_type))

    def absolute(self) -> "EvalJob":
        """The same job with every file it names made absolute (workers may run elsewhere)."""
        def path(p, data=False):
            if p is None:
                return None
            return str((resolve_data(p) if data else Path(p).expanduser()).resolve())

        model = self.model
        if model and (model.lower().endswith(".gguf") or Path(model).expanduser().exists()):
            model = path(model)
        return replace(self, data=path(self.data, True), out=path(self.out), model=model,
                       ppl_data=path(perplexity_source(self.ppl_data), True),
                       mom2_corpus=path(self.mom2_corpus, True), guard_rule=path(self.guard_rule),
                       guard_probe=path(self.guard_probe, True))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["case_ids"] = list(self.case_ids) if self.case_ids else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EvalJob":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CromeError(f"unknown eval option {sorted(unknown)[0]!r}")
        d = dict(d)
        for name, value in d.items():
            _check_type(name, value, _FIELD_TYPES[name])
        if d.get("case_ids") is not None:
            d["case_ids"] = tuple(str(c) for c in d["case_ids"])
        return cls(**d)


def _field_types() -> dict[str, tuple[type, ...]]:
    """Each EvalJob field's accepted JSON/TOML types, read off its annotation."""
    names = {"int": int, "str": str, "bool": bool, "float": float, "dict": dict, "None": type(None)}
    out = {}
    for f in fields(EvalJob):
        text = str(f.type).replace("tuple[str, ...]", "list")
        out[f.name] = tuple(list if part.strip() == "list" else names[part.strip()] for part in text.split("|"))
    return out


def _check_type(name: str, value, types: tuple[type, ...]) -> None:
    """One line when an option's value has the wrong type (a bool is not a number; an int is a float)."""
    ok = any(isinstance(value, t) and not (t in (int, float) and isinstance(value, bool)) for t in types)
    ok = ok or (float in types and isinstance(value, int) and not isinstance(value, bool))
    ok = ok or (list in types and isinstance(value, tuple))
    if not ok:
        want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise CromeError(f"option {name} must be {want}, not {type(value).__name__} {value!r:.40}")


def cases_of(job: EvalJob, load_dataset=load_cases) -> tuple[list[Case], list[str], str]:
    """The cases a job evaluates, the skipped records' messages, and the dataset's path
    (``load_dataset(path, skip_invalid)``: where several jobs share a file, a cached loader)."""
    dataset = load_dataset(job.data, job.skip_invalid)
    cases = select(dataset, job.n_cases, list(job.case_ids) if job.case_ids else None)
    return cases, dataset.skipped, str(dataset.path)


def load(job: EvalJob, device=None, progress: bool = True) -> LoadedModel:
    """``job``'s model (with the gated memory a saved edited model carries, ``memory.attach_saved``)."""
    lm = load_model(job.model, device=device, progress=progress, **job.load_options.kwargs())
    attach_saved(lm, job.model)
    return lm


def model_setup(lm: LoadedModel, job: EvalJob, status: Status = quiet, say: Callable[[str], None] | None = None):
    """The layer, hyper-parameters and key statistics for ``job``'s edits on ``lm``: (hparams, choice, stats).
    ``status(message)`` wraps the slow steps (a spinner); with ``say``, the key statistics say
    where they come from and show a progress bar when they are computed."""
    corpus = _corpus(job)
    traced = " (causal trace on crome's fact list, once per model)" if job.layer in (None, "auto") else ""
    with status("choosing the layer" + traced):
        hp, choice = resolve(lm, None, job.layer, job.seed)
    hp = hp.with_(mom2_adjustment=job.mom2, mom2_samples=job.mom2_samples, **job.hparams)
    if say and hp.mom2_adjustment:
        say(f"key statistics for layer {hp.layer} from {corpus or 'text sampled from the model'} "
            f"(computed once, then cached)")
    return hp, choice, stats_for(lm, hp, corpus=corpus, progress=say is not None)


def _corpus(job: EvalJob) -> str | None:
    """The key statistics' corpus file, a relative name also looked up under $CROME_DATA."""
    corpus = job.mom2_corpus
    if corpus and not Path(corpus).is_file():
        corpus = str(resolve_data(corpus))
    return corpus


def prepare(lm: LoadedModel, job: EvalJob, status: Status = quiet, say=None, texts=...) -> RunContext:
    """Layer, key statistics, context templates, perplexity texts and the run's settings (no
    model-bound checks yet: ``with_checks`` adds them where the cases run). ``texts``: the
    perplexity texts when the caller has read them (None: no perplexity); by default read from
    the job's ``ppl_data``."""
    m = method(job.method)
    hp, choice, stats = model_setup(lm, job, status, say)
    if m.batch:
        stats = layer_stats(lm, m, hp, _corpus(job), say is not None, known=stats)
    with status("context templates"):
        templates = context_templates(lm, job.seed, hp.template_lengths, hp.template_starts)
    ppl = perplexity_source(job.ppl_data)
    settings = RunSettings(method=job.method, model=lm.name, layer=hp.layer, seed=job.seed,
                           test_prefix=job.test_prefix, data=Path(job.data).name, ppl_data=ppl.name,
                           gen_tokens=job.gen_tokens, sequential=job.sequential,
                           monitor_every=job.monitor_every if job.sequential else 1,
                           retained_every=job.retained_every if job.sequential else 0,
                           retained_sample=job.retained_sample if job.sequential else 0,
                           scores_every=job.scores_every if job.sequential else 1, guard=job.guard,
                           guard_threshold=job.guard_threshold if job.guard in ("verify", "fallback") else None,
                           key_stats_source=_source(stats), dtype=lm.dtype, batch_size=job.batch_size,
                           gen_em=job.gen_em, readings=tuple(job.readings))
    null_space = None
    if m.null_space:
        with status("AlphaEdit's null-space projections"):
            null_space = NullSpace.from_stats(stats, hp.null_space_energy)
    memory = EditMemory.from_stats(stats, hp.memory_threshold).attach(lm) if m.gated else None
    return RunContext(settings, hp, templates, load_texts(ppl) if texts is ... else texts, stats, choice,
                      null_space=null_space, anchor=_anchor(lm, job, m, hp, templates, status), memory=memory)


def _anchor(lm: LoadedModel, job: EvalJob, m, hp: Hparams, templates: list[str], status: Status):
    """NAS's norm anchor (``Hparams.nas``): trial edits of ``nas_trials`` cases of the job's data, drawn
    with its seed, on the unedited model (computed once, cached); None without NAS."""
    if not hp.nas:
        return None
    if not job.data:
        raise CromeError("--nas takes its norm anchor from trial edits of a dataset: crome eval --data FILE")
    dataset = load_cases(job.data, job.skip_invalid).cases
    trials = random.Random(job.seed).sample(dataset, min(hp.nas_trials, len(dataset)))
    with status(f"NAS: the norm anchor from {len(trials)} trial edits (once, then cached)"):
        return norm_anchor(lm, [c.request for c in trials], m, hp, templates)


def _source(stats) -> str:
    if isinstance(stats, dict):
        stats = next(iter(stats.values()), None)
    return stats.source if stats is not None else "off"


def guard_setup(lm: LoadedModel, layer: int, guard: str, threshold: float = VERIFY_THRESHOLD,
                rule_file: str | None = None, probe: str | None = None, status: Status = quiet,
                efficacy: bool = True):
    """The guard's rule (for ``refuse``, or when a rule file is named) and verifier (``verify``,
    ``fallback``) for edits from ``layer`` up."""
    rule = rule_for(lm.name, rule_file) if guard == "refuse" or rule_file else None
    verifier = None
    if guard in ("verify", "fallback"):
        with status("probe perplexity for the guard"):
            verifier = Verifier(lm, layer, load_texts(probe) if probe else None, threshold, efficacy)
    return rule, verifier


def with_checks(lm: LoadedModel, ctx: RunContext, job: EvalJob, status: Status = quiet) -> RunContext:
    """``ctx`` with the job's guard (rule, verifier) and the perplexity monitor, built on ``lm``
    (unedited: their baselines are taken now)."""
    rule, verifier = guard_setup(lm, ctx.layers(lm.num_layers)[0], job.guard, job.guard_threshold, job.guard_rule,
                                 job.guard_probe, status, job.guard_efficacy)
    return replace(ctx, rule=rule, verifier=verifier).with_monitor(lm)


class CaseRunner:
    """One model, one prepared run: evaluates cases (what a Ray worker holds)."""

    def __init__(self, lm: LoadedModel, job: EvalJob, ctx: RunContext):
        self.lm, self.ctx = lm, with_checks(lm, ctx, job)

    def __call__(self, cases: list[Case]) -> list[tuple[dict, float]]:
        """(record, seconds) of each case; the v* of several cases are computed together."""
        start = time.perf_counter()
        out = evaluate_cases(self.lm, cases, self.ctx, prepared_by_id=prepare_together(self.lm, cases, self.ctx))
        seconds = (time.perf_counter() - start) / len(cases)
        return [(record.to_dict(), seconds) for record, _ in out]


def run_job(job: EvalJob, progress=None, status: Status = quiet, say=None, lm: LoadedModel | None = None,
            cases: list[Case] | None = None):
    """Run ``job`` in this process: returns (every record of its results file, context, model).
    ``cases``: the job's cases when the caller has loaded them already (``cases_of``)."""
    if cases is None:
        cases, _, _ = cases_of(job)
    if lm is None:
        with status(f"loading {job.model or 'the default model'}"):
            lm = load(job, progress=say is not None)
    ctx = with_checks(lm, prepare(lm, job, status, say), job, status)
    records = run(lm, cases, ctx, job.out, resume=job.resume, progress=progress,
                  edits_per_pass=job.per_pass(lm.device.type))
    return records, ctx, lm


_FIELD_TYPES = _field_types()
