"""The Python API's wrappers: the one place, with ``evaluation.jobs.prepare`` for runs, where an edit's
defaults are filled in (the layer, the hyper-parameters, the context templates, the key statistics).

The steps below take what these resolve: ``edit.prepare_edits``/``finish_edit`` (a single fact),
``memit.apply_memit`` (a batch), ``guard.guarded`` (either, judged by the run context's guard).
"""

from __future__ import annotations

import torch

from ..models import LoadedModel
from ..request import EditRequest
from . import edit as rank_one
from . import memit
from .context import RunContext, RunSettings
from .edit import Edit, Prepared
from .guard import check_guard, guarded
from .hparams import Hparams
from .layer_choice import resolve
from .memit import BatchEdit
from .memory import EditMemory
from .methods import DEFAULT_BATCH_METHOD, DEFAULT_METHOD, method
from .mom2 import KeyStats, layer_stats, stats_for
from .norm_anchor import NormAnchor
from .null_space import NullSpace
from .records import LayerChoice
from .rules import GuardRule
from .templates import context_templates
from .verify import Verifier
from .weights import WeightsHandle


def resolved(lm: LoadedModel, hparams: Hparams | None = None, layer: int | str | None = None, seed: int = 0,
             templates: list[str] | None = None,
             layer_choice: LayerChoice | None = None) -> tuple[Hparams, LayerChoice, list[str]]:
    """The hyper-parameters (the model's defaults unless given), how the layer was chosen, and the
    context templates (sampled with ``seed`` unless given)."""
    hp, choice = resolve(lm, hparams, layer, seed)
    if templates is None:
        templates = context_templates(lm, seed, hp.template_lengths, hp.template_starts)
    return hp, layer_choice or choice, templates


def context_for(lm: LoadedModel, name: str = DEFAULT_METHOD, hparams: Hparams | None = None, *,
                layer: int | str | None = None, seed: int = 0, guard: str = "off",
                templates: list[str] | None = None, layer_choice: LayerChoice | None = None,
                memory: EditMemory | None = None, **fields) -> RunContext:
    """A run context for edits outside a prepared run (``report.measure_edit`` from Python): the
    model's resolved defaults unless given; other ``RunContext`` fields (stats, rule, verifier,
    monitor, texts, null_space, memory) by name. A memory method without a ``memory`` gets a new, empty
    one, put on the model (``ctx.memory.detach()`` takes it off), gated with its layer's key statistics."""
    m = method(name)
    hp, choice, templates = resolved(lm, hparams, layer, seed, templates, layer_choice)
    settings = RunSettings(method=m.name, model=lm.name, layer=hp.layer, seed=seed, guard=guard)
    if m.gated and memory is None:
        stats = stats_for(lm, hp, fields.get("stats"))
        if stats is None:
            m.require_stats()
        memory = EditMemory.from_stats(stats, hp.memory_threshold).attach(lm)
    return RunContext(settings, hp, templates, layer_choice=choice, memory=memory, **fields)


def prepare_edits(lm: LoadedModel, requests: list[EditRequest], *, hparams: Hparams | None = None,
                  layer: int | str | None = None, templates: list[str] | None = None, seed: int = 0,
                  runner_cls=None, layer_choice: LayerChoice | None = None) -> list[Prepared]:
    """The keys and v* of independent edits (``edit.prepare_edits``), defaults filled in."""
    hp, choice, templates = resolved(lm, hparams, layer, seed, templates, layer_choice)
    runner = {} if runner_cls is None else dict(runner_cls=runner_cls)
    return rank_one.prepare_edits(lm, requests, hp, templates, seed, layer_choice=choice, **runner)


def prepare_edit(lm: LoadedModel, request: EditRequest, *, hparams: Hparams | None = None,
                 layer: int | str | None = None, templates: list[str] | None = None, seed: int = 0,
                 runner_cls=None, layer_choice: LayerChoice | None = None) -> Prepared:
    """The key and v* of one edit; arguments as ``prepare_edits``."""
    return prepare_edits(lm, [request], hparams=hparams, layer=layer, templates=templates, seed=seed,
                         runner_cls=runner_cls, layer_choice=layer_choice)[0]


def compute_edits(lm: LoadedModel, requests: list[EditRequest], name: str = DEFAULT_METHOD, *,
                  hparams: Hparams | None = None, layer: int | str | None = None, templates: list[str] | None = None,
                  seed: int = 0, mom2: KeyStats | torch.Tensor | None = None, runner_cls=None,
                  layer_choice: LayerChoice | None = None) -> list[Edit]:
    """``compute_edit`` for K independent requests, their v* optimised in one batched forward per
    step: each edit equals the one ``compute_edit`` gives alone (up to float summation order)."""
    m = method(name, "rank_one")
    prepared = prepare_edits(lm, requests, hparams=hparams, layer=layer, templates=templates, seed=seed,
                             runner_cls=runner_cls, layer_choice=layer_choice)
    if not prepared:
        return []
    stats = stats_for(lm, prepared[0].hparams, mom2)
    return [rank_one.finish_edit(lm, p, m, stats) for p in prepared]


def compute_edit(lm: LoadedModel, request: EditRequest, name: str = DEFAULT_METHOD, *,
                 hparams: Hparams | None = None, layer: int | str | None = None, templates: list[str] | None = None,
                 seed: int = 0, mom2: KeyStats | torch.Tensor | None = None, runner_cls=None,
                 layer_choice: LayerChoice | None = None) -> Edit:
    """Compute (not apply) a single-fact edit: the reference ROME or the consistent C-ROME.

    Key statistics: ``mom2`` when given, else (mom2 adjustment on, the default) C from text
    sampled from the model, computed once and cached; ``hparams.mom2_adjustment=False`` uses
    C = I, the "Fall of ROME" paper's setting. ``layer``: an index, "auto", or None for the model's
    default; ``templates``: sampled with ``seed`` when None."""
    method(name, "rank_one")
    return compute_edits(lm, [request], name, hparams=hparams, layer=layer, templates=templates, seed=seed,
                         mom2=mom2, runner_cls=runner_cls, layer_choice=layer_choice)[0]


def apply_memit(lm: LoadedModel, requests: list[EditRequest], name: str = DEFAULT_BATCH_METHOD, *,
                hparams: Hparams | None = None, stats: dict[int, KeyStats] | None = None,
                templates: list[str] | None = None, seed: int = 0, runner_cls=None,
                null_space: NullSpace | None = None,
                anchor: NormAnchor | None = None) -> tuple[BatchEdit, WeightsHandle]:
    """Compute and apply a batch method's edit (``memit.apply_memit``), defaults filled in: the model's
    hyper-parameters, C at every edited layer (computed once, cached), sampled templates. ``anchor``:
    NAS's norm anchor, with ``hparams.nas`` (``norm_anchor.norm_anchor``)."""
    m = method(name, "batch")
    hp, _, templates = resolved(lm, hparams, None, seed, templates)
    if stats is None:
        stats = layer_stats(lm, m, hp)
    runner = {} if runner_cls is None else dict(runner_cls=runner_cls)
    return memit.apply_memit(lm, requests, m, hp, stats, templates, seed, null_space=null_space, anchor=anchor,
                             **runner)


def guarded_apply(lm: LoadedModel, request: EditRequest, name: str, action: str = "off", *,
                  rule: GuardRule | None = None, verifier: Verifier | None = None, prepared: Prepared | None = None,
                  neighbours: bool = True, mom2: KeyStats | torch.Tensor | None = None,
                  hparams: Hparams | None = None, layer: int | str | None = None, seed: int = 0,
                  templates: list[str] | None = None, layer_choice: LayerChoice | None = None):
    """A single-fact edit through the guard (``guard.guard_single``) from keyword arguments: the
    context is built here (``context_for``). ``prepared``: the request's keys and v*, when computed.
    Returns (edit, handle, decision); raises ``GuardRefused`` with the weights untouched or restored."""
    method(name, "rank_one")
    check_guard(lm.name, name, action, rule, verifier)
    if prepared is not None:
        hparams, templates = hparams or prepared.hparams, templates or prepared.templates
    ctx = context_for(lm, name, hparams, layer=layer, seed=seed, guard=action, templates=templates,
                      layer_choice=layer_choice, rule=rule, verifier=verifier)
    ctx.stats = stats_for(lm, ctx.hparams, mom2)
    return guarded(lm, [request], ctx, prepared=prepared, neighbours=neighbours)


def guarded_memit(lm: LoadedModel, requests: list[EditRequest], name: str, action: str = "off", *,
                  rule: GuardRule | None = None, verifier: Verifier | None = None,
                  stats: dict[int, KeyStats] | None = None, null_space: NullSpace | None = None,
                  hparams: Hparams | None = None, seed: int = 0, templates: list[str] | None = None):
    """A batch method's edit through the guard (``guard.guard_batch``) from keyword arguments."""
    method(name, "batch")
    check_guard(lm.name, name, action, rule, verifier)
    ctx = context_for(lm, name, hparams, seed=seed, guard=action, templates=templates, rule=rule,
                      verifier=verifier, stats=stats, null_space=null_space)
    return guarded(lm, requests, ctx)
