"""Which layer to edit: the table's entry, the user's, or ``auto`` from causal tracing.

``auto`` follows ROME's "locate" step: for facts the model knows (a small list that
ships with crome, ``corpus/facts.tsv``, CC0), corrupt the subject's embeddings and
restore the MLP output at the subject's last token, in a window of layers around
each layer; the layer whose window restores the most probability of the right answer
(the mean indirect effect over the facts) is the one to edit. The window is a fifth
of the depth (ROME: 10 of 48 layers). Layer 0's MLP is never restored: the noise is
added to the embeddings, and the first MLP mostly re-encodes the token itself, so
restoring it undoes the corruption wholesale (on SmolLM2 every window that holds
layer 0 restores ~0.35 of the probability, every other ≤ 0.09) and would drag the
choice to the bottom of the model. Layer 0 is therefore not a candidate either.

The trace says where a fact is recalled, not where a rank-one insertion works: on a
held-out Qwen2 model the traced peak (layer 3) builds the first position's massive
activation (an "attention sink": the bare key 6x the prefixed keys' norm), and every
first-token C-ROME edit there failed to take. So the candidates, in order of traced
effect, are checked by trial C-ROME edits of a few known facts, first-token subjects
among them (``trial_requests``, ``editability``): each is applied, checked the way ``--guard verify``
checks efficacy, and restored. The first candidate where every trial edit takes, with no
warning from its diagnostics (a bare key over 4x the prefixed keys' norm, a value shift over
8) and an update under ``MAX_TRIAL_UPDATE``·‖W‖, is chosen. The choice is cached per model and
recorded with every result (``LayerChoice.record()``): the traced curve, every candidate's
trial edits (took, update ratio, ‖v*−v_cur‖/‖v_cur‖, the bare key's outlier ratio), the cost.

Models in the hyper-parameter table keep their entry; every other model gets
``auto``. Too few known facts (fewer than ``MIN_FACTS``) fall back to the
relative-depth rule, and the record says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass

from ..cache import cached
from ..errors import CromeError
from ..models import LoadedModel, cache_dir
from ..request import EditRequest
from ..scoring.measure import score_targets
from ..scoring.texts import corpus_path
from . import locate
from .edit import apply_edit, finish_edit, prepare_edits
from .efficacy import EfficacyCheck
from .hparams import DEFAULTS, Hparams, defaults_for, depth_rule
from .methods import FALLBACK_METHOD
from .mom2 import stats_for
from .records import LayerChoice
from .templates import context_templates

MIN_FACTS = 3
RULE_VERSION = 3   # part of the cache key: a changed rule recomputes cached choices
MAX_CANDIDATES = 4     # layers tried, in order of traced effect
TRIAL_EDITS = 4        # trial edits per candidate layer, half with first-token subjects
TRIAL_PLACES = ("prefix",)  # a trial edit (C-ROME) must take where it was learned: after the test prefix
MAX_TRIAL_UPDATE = 1.0  # ‖ΔW‖/‖W‖ above this (an update larger than W) fails a trial: no clean edit on
                        # either real model came near it (docs/MODELS.md, "Layer choice")
FACTS_FILE = "facts.tsv"


@dataclass(frozen=True)
class Fact:
    prompt: str
    subject: str
    answer: str


def load_facts() -> list[Fact]:
    """The fact list that ships with crome."""
    text = corpus_path(FACTS_FILE).read_text(encoding="utf-8")
    facts = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            prompt, subject, answer = line.split("\t")
            facts.append(Fact(prompt, subject, answer))
    return facts


def known_facts(lm: LoadedModel, facts: list[Fact]) -> list[Fact]:
    """The facts whose answer is the model's top-1 prediction (its first token)."""
    scores = score_targets(lm, [(f.prompt.replace("{}", f.subject) if "{}" in f.prompt else f.prompt, f.answer)
                                for f in facts])
    return [f for f, s in zip(facts, scores) if s.hits[0]]


def first_position(lm: LoadedModel, fact: Fact) -> bool:
    """The fact's subject is one token at the prompt's start: its last token is the first position."""
    one = len(lm.tokenizer(fact.subject, add_special_tokens=False)["input_ids"]) == 1
    return fact.prompt.startswith("{}") and one


def trial_requests(lm: LoadedModel, facts: list[Fact], known: list[Fact], n: int = TRIAL_EDITS) -> list[EditRequest]:
    """Counterfactual edits for the trials: half of them of facts whose subject's last token is the first
    position (where keys are outliers; from the whole list: an edit's counterfactual target needs no
    recall), the rest of facts the model knows whose subject comes later. A fact's new target is another
    fact's answer to the same prompt."""
    def paired(f):   # another fact asks the same question: its answer is a counterfactual of the same kind
        return any(g.prompt == f.prompt and g.answer != f.answer for g in facts)

    first = sorted((f for f in facts if first_position(lm, f)), key=lambda f: not paired(f))[: (n + 1) // 2]
    chosen = first + [f for f in known if not f.prompt.startswith("{}")][: n - len(first)]
    requests = []
    for f in chosen:
        others = [g.answer for g in facts if g.answer != f.answer and g.prompt == f.prompt]
        others = others or [g.answer for g in facts if g.answer != f.answer]
        requests.append(EditRequest.create(f.prompt, f.subject, others[0], f.answer))
    return requests


def editability(lm: LoadedModel, layer: int, requests: list[EditRequest], seed: int = 0,
                samples: int | None = None) -> dict:
    """Trial C-ROME edits at ``layer`` with crome's default key statistics (C from sampled text):
    each is computed, applied, checked (``guard.EfficacyCheck``: does it take?) and restored.
    The layer is editable when every trial edit takes, none has diagnostics that say it is unlikely to
    take (``Diagnostics.unlikely_to_take``: an attention-sink bare key, an outsized value shift: the same
    rule ``crome edit`` warns with) and none is larger than ``MAX_TRIAL_UPDATE``·‖W‖."""
    hp = defaults_for(lm.name, lm.num_layers).with_(layer=layer, mom2_samples=samples)
    templates = context_templates(lm, seed, hp.template_lengths, hp.template_starts)
    prepared = prepare_edits(lm, requests, hp, templates, seed, layer_choice=LayerChoice(layer, "trial"))
    stats = stats_for(lm, hp)
    trials = []
    for p in prepared:
        check = EfficacyCheck(lm, p.request, p.templates)
        edit, took = finish_edit(lm, p, FALLBACK_METHOD, stats), False
        if edit.diagnostics.finite:
            with apply_edit(lm, edit):
                took = check.after(FALLBACK_METHOD, TRIAL_PLACES).took
        d = edit.diagnostics
        warned = d.unlikely_to_take()
        trials.append(dict(subject=p.request.subject, target_new=p.request.target_new,
                           first_token_subject=d.first_token_subject, took=took, warned=warned,
                           update_ratio=_round(d.update_ratio), value_shift=_round(d.value_shift),
                           key_outlier_ratio=_round(d.key_outlier_ratio)))
    took = sum(t["took"] for t in trials)
    worst = max((math.inf if t["update_ratio"] is None else t["update_ratio"] for t in trials), default=0.0)
    warned = sum(t["warned"] is not None for t in trials)
    editable = bool(trials) and took == len(trials) and not warned and worst <= MAX_TRIAL_UPDATE
    return dict(layer=layer, editable=editable, took=took, warned=warned, trials=trials, max_update_ratio=worst)


def _try_editability(lm: LoadedModel, layer: int, requests: list[EditRequest], seed: int, samples) -> dict:
    """``editability``, or a layer where no edit could be computed at all (singular key statistics: a dead MLP)."""
    import torch

    try:
        return editability(lm, layer, requests, seed, samples)
    except (CromeError, torch.linalg.LinAlgError) as exc:
        return dict(layer=layer, editable=False, took=0, trials=[], max_update_ratio=math.inf,
                    error=f"{type(exc).__name__}: {exc}"[:200])


def _round(x: float) -> float | None:
    return float(f"{x:.4g}") if math.isfinite(x) else None


def _pick(candidates: list[dict]) -> dict:
    """The first editable candidate (they come in order of traced effect), else the one whose
    trial edits did best: most taken, then the smallest update."""
    for c in candidates:
        if c["editable"]:
            return c
    return min(candidates, key=lambda c: (-c["took"], c.get("warned", 0), c["max_update_ratio"]))


def auto_layer(lm: LoadedModel, seed: int = 0, n_facts: int = 20, window: int | None = None,
               use_cache: bool = True, samples: int | None = None) -> LayerChoice:
    """Where the fact is recalled and an edit takes: the layers whose MLP window at the subject's
    last token carries the most causal effect, in that order, each checked by trial edits
    (``editability``); the first editable one."""
    facts = load_facts()
    window = window or max(1, round(lm.num_layers / 5))
    key = json.dumps([RULE_VERSION, lm.identity, [asdict(f) for f in facts], seed, n_facts, window, samples])
    path = cache_dir() / "layers" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")
    return cached(path, lambda: _auto_layer(lm, facts, seed, n_facts, window, samples),
                  lambda c: json.dumps(c.record()).encode(), lambda b: LayerChoice(**json.loads(b)),
                  "layer choice", use_cache)


def _auto_layer(lm: LoadedModel, facts, seed: int, n_facts: int, window: int, samples: int | None) -> LayerChoice:
    """``auto_layer``'s work, uncached."""
    start = time.perf_counter()
    known_all = known_facts(lm, facts)
    known = known_all[:n_facts]
    if len(known) < max(1, MIN_FACTS):
        layer = depth_rule(lm.num_layers)
        choice = LayerChoice(layer, "depth", dict(reason=f"the model knows {len(known)} of {len(facts)} facts "
                                                         f"(needs {MIN_FACTS}): relative-depth rule", known=len(known)))
    else:
        L = lm.num_layers
        effects = [0.0] * L
        for f in known:
            t = locate.trace_fact(lm, f.prompt, f.subject, f.answer, seed=seed, window=window, kinds=("mlp",),
                           last_subject_only=True, first_layer=1)
            for layer in range(L):
                effects[layer] += t.effects["mlp"][layer][t.subject_last] / len(known)
        traced = time.perf_counter() - start
        ranked = sorted(range(1, L), key=lambda i: -effects[i])[:MAX_CANDIDATES] if L > 1 else [0]
        requests, candidates = trial_requests(lm, facts, known_all), []
        for layer in ranked:
            trial = _try_editability(lm, layer, requests, seed, samples)
            candidates.append(dict(trial, effect=round(effects[layer], 6)))
            if candidates[-1]["editable"]:
                break
        best = _pick(candidates)
        choice = LayerChoice(best["layer"], "auto", dict(
            method="causal trace, MLP at the last subject token (layers >= 1), then trial C-ROME edits in order of "
                   "effect: the first layer where every trial edit takes, none warned", window=window, seed=seed,
            n_facts=len(known), scanned=len(facts), effects=[round(e, 6) for e in effects],
            candidates=candidates, editable=best["editable"], trace_seconds=round(traced, 1),
            seconds=round(time.perf_counter() - start, 1)))
    return choice


def choose_layer(lm: LoadedModel, layer: int | str | None = None, seed: int = 0) -> LayerChoice:
    """``layer``: an index, ``"auto"``, ``"depth"``, or None (the table's entry, else auto)."""
    if isinstance(layer, str):
        if layer.lstrip("-").isdigit():
            layer = int(layer)
        elif layer == "auto":
            return auto_layer(lm, seed)
        elif layer == "depth":
            return LayerChoice(depth_rule(lm.num_layers), "depth")
        else:
            raise CromeError(f"--layer must be a layer index, 'auto' or 'depth', not {layer!r}")
    if layer is not None:
        lm.check_layer(layer)
        return LayerChoice(layer, "user")
    if lm.name in DEFAULTS:
        return LayerChoice(DEFAULTS[lm.name].layer, "table")
    return auto_layer(lm, seed)


def resolve(lm: LoadedModel, hparams: Hparams | None = None, layer: int | str | None = None,
            seed: int = 0) -> tuple[Hparams, LayerChoice]:
    """Hyper-parameters and the layer choice for an edit: explicit ``hparams`` keep their layer
    unless ``layer`` overrides it."""
    if hparams is not None and layer is None:
        lm.check_layer(hparams.layer)
        return hparams, LayerChoice(hparams.layer, "user")
    choice = choose_layer(lm, layer, seed)
    hp = (hparams or defaults_for(lm.name, lm.num_layers)).with_(layer=choice.layer)
    lm.check_layer(hp.layer)
    return hp, choice
