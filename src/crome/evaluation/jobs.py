"""An eval run as data: ``EvalJob`` says what to run, ``prepare`` does the once-per-run work.

``crome eval`` runs a job in this process (``run_job``) or on Ray workers
(``crome.distribution.workers``); ``crome sweep`` runs one job per grid cell. All three
share these steps, so a case's record is the same whichever ran it:

1. ``load``: the model, in the job's dtype and placement;
2. ``prepare``: the layer, the key statistics, the context templates and the run's
   ``Settings`` (what every record carries and ``--resume`` checks);
3. ``CaseRunner``: the perplexity monitor and guard, then ``evaluate_cases`` on each batch of cases.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

from ..editing.edit import METHODS
from ..editing.guard import GUARD_ACTIONS, VERIFY_THRESHOLD
from ..editing.hparams import Hparams
from ..editing.memit import BATCH_METHODS, edited_layers, memit_layers
from ..editing.mom2 import KeyStats
from ..errors import CromeError
from ..models import LoadedModel
from .datasets import Case, load_cases, select
from .datasets import resolve as resolve_data
from .evaluate import Settings, default_edits_per_pass, evaluate_cases, prepare_together, run
from .texts import load_texts, perplexity_source

Status = Callable[[str], contextlib.AbstractContextManager]


def _quiet(_message: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def check_mom2_flags(mom2: bool, corpus: str | None) -> None:
    if not mom2 and corpus:
        raise CromeError("--no-mom2 and --mom2-corpus contradict each other")


@dataclass(frozen=True)
class EvalJob:
    """Everything ``crome eval`` takes, as one record (a sweep cell is one of these)."""

    data: str
    out: str
    method: str = "crome"
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
    gen_tokens: int = 100
    guard: str = "off"
    guard_threshold: float = VERIFY_THRESHOLD
    guard_rule: str | None = None
    guard_probe: str | None = None
    guard_efficacy: bool = True        # verify/fallback: also roll back an edit that did not take
    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    edits_per_pass: int | None = None  # K cases per pass (a speed setting: records don't change); None: the device's
    batch_size: int = 1                # MEMIT: B cases as one update (a run setting)
    hparams: dict = field(default_factory=dict)   # overrides of the model's defaults (e.g. v_steps)

    def __post_init__(self):
        if self.monitor_every < 1:
            raise CromeError("--monitor-every must be at least 1")
        if self.retained_every < 0:
            raise CromeError("--retained-every must be at least 1 (or 0: with the perplexity)")
        if self.n_cases is not None and self.n_cases < 1:
            raise CromeError("--n must be at least 1")
        if self.edits_per_pass is not None and self.edits_per_pass < 1:
            raise CromeError("--edits-per-pass must be at least 1")
        if self.batch_size < 1:
            raise CromeError("--batch-size must be at least 1")
        if self.method not in (*METHODS, *BATCH_METHODS):
            raise CromeError(f"unknown method '{self.method}': choose one of {', '.join((*METHODS, *BATCH_METHODS))}")
        if self.method in BATCH_METHODS and not self.mom2:
            raise CromeError("MEMIT's solve needs key statistics (C): drop --no-mom2")
        check_mom2_flags(self.mom2, self.mom2_corpus)
        if self.guard not in GUARD_ACTIONS:
            raise CromeError(f"unknown guard action '{self.guard}': choose one of {', '.join(GUARD_ACTIONS)}")
        unknown = set(self.hparams) - {f.name for f in fields(Hparams)}
        if unknown:
            raise CromeError(f"unknown hyper-parameter {sorted(unknown)[0]!r}")

    def per_pass(self, device_type: str) -> int:
        """K, the cases whose edits are computed and measured together: ``edits_per_pass``, else
        the measured default for the device; 1 for sequential runs and MEMIT (whose batches are
        ``batch_size``)."""
        if self.sequential or self.method in BATCH_METHODS:
            return self.edits_per_pass or 1   # evaluate.run refuses K > 1 there, saying why
        return self.edits_per_pass or default_edits_per_pass(device_type)

    def cases_per_chunk(self, device_type: str) -> int:
        """Cases handled together: a MEMIT batch, or K edits per pass."""
        return self.batch_size if self.method in BATCH_METHODS else self.per_pass(device_type)

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
        if d.get("case_ids") is not None:
            d["case_ids"] = tuple(str(c) for c in d["case_ids"])
        return cls(**d)


@dataclass
class Setup:
    """What ``prepare`` computes once per run and every worker then shares."""

    settings: Settings
    hparams: Hparams
    templates: list[str]
    stats: KeyStats | None
    layer_choice: object
    texts: list[str] | None


def cases_of(job: EvalJob, load_dataset=load_cases) -> tuple[list[Case], list[str], str]:
    """The cases a job evaluates, the skipped records' messages, and the dataset's path
    (``load_dataset(path, skip_invalid)``: where several jobs share a file, a cached loader)."""
    dataset = load_dataset(job.data, job.skip_invalid)
    cases = select(dataset, job.n_cases, list(job.case_ids) if job.case_ids else None)
    return cases, dataset.skipped, str(dataset.path)


def load(job: EvalJob, device=None, progress: bool = True) -> LoadedModel:
    from ..models import load_model

    return load_model(job.model, device=device, dtype=job.dtype, progress=progress, device_map=job.device_map,
                      trust_remote_code=job.trust_remote_code, allow_pickle=job.allow_pickle)


def model_setup(lm: LoadedModel, layer, seed: int, mom2: bool = True, corpus: str | None = None,
                samples: int | None = None, overrides: dict | None = None, status: Status = _quiet,
                say: Callable[[str], None] | None = None):
    """The layer, hyper-parameters and key statistics for edits on ``lm``: (hparams, choice, stats).
    ``status(message)`` wraps the slow steps (a spinner); with ``say``, the key statistics say
    where they come from and show a progress bar when they are computed."""
    from ..editing.edit import resolve_stats
    from ..editing.layer_choice import resolve

    check_mom2_flags(mom2, corpus)
    if corpus and not Path(corpus).is_file():
        corpus = str(resolve_data(corpus))
    traced = " (causal trace on crome's fact list, once per model)" if layer in (None, "auto") else ""
    with status("choosing the layer" + traced):
        hp, choice = resolve(lm, None, layer, seed)
    hp = hp.with_(mom2_adjustment=mom2, mom2_samples=samples, **(overrides or {}))
    if say and hp.mom2_adjustment:
        say(f"key statistics for layer {hp.layer} from {corpus or 'text sampled from the model'} "
            f"(computed once, then cached)")
    return hp, choice, resolve_stats(lm, hp, corpus=corpus, progress=say is not None)


def memit_stats(lm: LoadedModel, hp: Hparams, stats, seed: int, corpus=None, samples=None, overrides=None,
                status: Status = _quiet, say=None) -> dict:
    """C at every layer MEMIT edits (``stats``: the one already computed for ``hp.layer``)."""
    return {layer: stats if layer == hp.layer else model_setup(lm, layer, seed, True, corpus, samples, overrides,
                                                               status, say)[2]
            for layer in memit_layers(hp, lm.num_layers)}


def prepare(lm: LoadedModel, job: EvalJob, status: Status = _quiet, say=None) -> Setup:
    """Layer, key statistics, context templates, perplexity texts and the run's settings."""
    from ..editing.templates import context_templates

    hp, choice, stats = model_setup(lm, job.layer, job.seed, job.mom2, job.mom2_corpus, job.mom2_samples,
                                    job.hparams, status, say)
    if job.method in BATCH_METHODS:
        stats = memit_stats(lm, hp, stats, job.seed, job.mom2_corpus, job.mom2_samples, job.hparams, status, say)
    with status("context templates"):
        templates = context_templates(lm, job.seed, hp.template_lengths, hp.template_starts)
    ppl = perplexity_source(job.ppl_data)
    texts = load_texts(ppl)
    settings = Settings(method=job.method, model=lm.name, layer=hp.layer, seed=job.seed, test_prefix=job.test_prefix,
                        data=Path(job.data).name, ppl_data=ppl.name,
                        gen_tokens=job.gen_tokens, sequential=job.sequential,
                        monitor_every=job.monitor_every if job.sequential else 1,
                        retained_every=job.retained_every if job.sequential else 0, guard=job.guard,
                        guard_threshold=job.guard_threshold if job.guard in ("verify", "fallback") else None,
                        key_stats_source=_source(stats), dtype=lm.dtype, batch_size=job.batch_size)
    return Setup(settings, hp, templates, stats, choice, texts)


def _source(stats) -> str:
    if isinstance(stats, dict):
        stats = next(iter(stats.values()), None)
    return stats.source if stats is not None else "off"


def guard_setup(lm: LoadedModel, layer: int, guard: str, threshold: float = VERIFY_THRESHOLD,
                rule_file: str | None = None, probe: str | None = None, status: Status = _quiet,
                efficacy: bool = True):
    """The guard's rule (for ``refuse``, or when a rule file is named) and verifier."""
    from ..editing.guard import Verifier, rule_for

    rule = rule_for(lm.name, rule_file) if guard == "refuse" or rule_file else None
    verifier = None
    if guard in ("verify", "fallback"):
        with status("probe perplexity for the guard"):
            verifier = Verifier(lm, layer, load_texts(probe) if probe else None, threshold, efficacy)
    return rule, verifier


def job_guard(lm: LoadedModel, layer: int, job: EvalJob, status: Status = _quiet):
    """``guard_setup`` with a job's guard options."""
    return guard_setup(lm, layer, job.guard, job.guard_threshold, job.guard_rule, job.guard_probe, status,
                       job.guard_efficacy)


class CaseRunner:
    """One model, one prepared run: evaluates cases (what a Ray worker holds)."""

    def __init__(self, lm: LoadedModel, job: EvalJob, setup: Setup):
        from ..editing.fast import PerplexityMonitor

        self.lm, self.job, self.setup = lm, job, setup
        first = edited_layers(job.method, setup.hparams, lm.num_layers)[0]
        self.monitor = PerplexityMonitor(lm, setup.texts, first) if setup.texts else None
        self.rule, self.verifier = job_guard(lm, first, job)

    def __call__(self, cases: list[Case]) -> list[tuple[dict, float]]:
        """(record, seconds) of each case; the v* of several cases are computed together."""
        s = self.setup
        start = time.perf_counter()
        together = prepare_together(self.lm, cases, s.hparams, s.templates, s.settings.seed,
                                    s.layer_choice) if len(cases) > 1 and self.job.method not in BATCH_METHODS else {}
        out = evaluate_cases(self.lm, cases, s.settings, s.hparams, s.templates, self.monitor, stats=s.stats,
                             rule=self.rule, verifier=self.verifier, layer_choice=s.layer_choice, prepared=together)
        seconds = (time.perf_counter() - start) / len(cases)
        return [(record, seconds) for record, _ in out]


def run_job(job: EvalJob, progress=None, status: Status = _quiet, say=None, lm: LoadedModel | None = None,
            cases: list[Case] | None = None):
    """Run ``job`` in this process: returns (every record of its results file, setup, model).
    ``cases``: the job's cases when the caller has loaded them already (``cases_of``)."""
    if cases is None:
        cases, _, _ = cases_of(job)
    if lm is None:
        with status(f"loading {job.model or 'the default model'}"):
            lm = load(job, progress=say is not None)
    setup = prepare(lm, job, status, say)
    rule, verifier = job_guard(lm, edited_layers(job.method, setup.hparams, lm.num_layers)[0], job, status)
    records = run(lm, cases, setup.settings, setup.hparams, setup.templates, setup.texts, job.out,
                  resume=job.resume, progress=progress, stats=setup.stats, rule=rule, verifier=verifier,
                  layer_choice=setup.layer_choice, edits_per_pass=job.per_pass(lm.device.type))
    return records, setup, lm
