"""The rank-one step: one fact into one layer, in the paper's steps, at a layer and C already chosen.

``prepare_edits`` runs steps 1 and 2 (the keys and v*), the same for every method and every C;
``finish_edit`` step 3 (the update, ``update.rank_one_update``) for a method of the table, without
touching the weights; ``apply_edit`` adds ΔW in place and returns a handle whose ``restore()`` puts
back the exact original tensor. Choosing the layer and C is the caller's (``api.py``, the run context).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import CromeError
from ..hooks import widen
from ..models import LoadedModel
from ..request import EditRequest
from .compute_key import Keys, compute_keys
from .compute_value import ValueResult, compute_v_stars
from .fast import FastRunner
from .hparams import Hparams
from .methods import Method, method
from .mom2 import KeyStats
from .records import Diagnostics, LayerChoice, OneFact
from .update import current, insertion_direction, rank_one_update
from .weights import Factors, WeightsHandle, add_delta, check_finite


@dataclass
class EditVectors:
    """The vectors of one edit, named after the paper: ΔW = lam uᵀ."""

    k_bare: torch.Tensor    # k^u: the key of the bare prompt
    k_mean: torch.Tensor    # k̄: the key averaged over the prefixed templates
    k_cur: torch.Tensor     # the key the update uses (ROME: k_bare; C-ROME: k_mean)
    v_cur: torch.Tensor     # W k_cur, the value now
    v_star: torch.Tensor    # v*: the value that makes the model say the new target
    u: torch.Tensor         # C⁻¹k̄ / ‖C⁻¹k̄‖
    lam: torch.Tensor       # Λ = (v* − v_cur) / (k_cur · u)


@dataclass
class Edit(OneFact):
    """A computed rank-one edit (ΔW is [d_out, d_in]) and everything needed to reproduce it."""

    request: EditRequest
    method: str
    layer: int
    delta_w: torch.Tensor = field(repr=False)
    diagnostics: Diagnostics
    vectors: EditVectors = field(repr=False)
    context_templates: list[str]
    seed: int
    hparams: Hparams
    seconds: float
    key_stats: dict | None = None      # KeyStats.record(): source, n_keys, shrinkage, hash (None: C = I)
    layer_choice: dict | None = None   # LayerChoice.record(): how the layer was chosen

    @property
    def factors(self) -> Factors:
        """ΔW as factors, layer -> (a, b) with ΔW = a bᵀ (as a MEMIT ``BatchEdit`` holds them)."""
        return {self.layer: (self.vectors.lam[:, None], self.vectors.u[:, None])}

    @property
    def finite(self) -> bool:
        return self.diagnostics.finite

    def to_dict(self) -> dict:
        return {
            "request": self.request.to_dict(), "method": self.method, "layer": self.layer,
            **asdict(self.diagnostics), "seed": self.seed, "edit_seconds": self.seconds,
            "hparams": self.hparams.to_dict(), "context_templates": self.context_templates,
            "key_stats": self.key_stats, "layer_choice": self.layer_choice,
        }


@dataclass
class Prepared:
    """Steps 1 and 2 of an edit (keys, v*): the same for every method and every C."""

    request: EditRequest
    hparams: Hparams
    keys: Keys
    value: ValueResult
    templates: list[str]
    seed: int
    seconds: float
    layer_choice: dict | None = None


def prepare_edits(lm: LoadedModel, requests: list[EditRequest], hp: Hparams, templates: list[str], seed: int = 0,
                  runner_cls=FastRunner, layer_choice: LayerChoice | None = None) -> list[Prepared]:
    """The keys (step 1) and v* (step 2) of independent edits at layer ``hp.layer``, their v* optimised
    together (one batched forward per step; each edit's numbers as if it were alone). ``seed``: the
    one the templates were sampled with (recorded); ``layer_choice``: how ``hp.layer`` was chosen."""
    if not requests:
        return []
    lm.check_layer(hp.layer)
    choice = layer_choice or LayerChoice(hp.layer, "user")
    if choice.layer != hp.layer:
        raise CromeError(f"the layer choice says layer {choice.layer}, the edit is at layer {hp.layer}")
    if not templates:
        raise CromeError("no context templates")
    start = time.perf_counter()
    keys = [compute_keys(lm, r, hp.layer, templates) for r in requests]                       # step 1
    values = compute_v_stars(lm, requests, hp.layer, templates, [k.v_bare for k in keys], hp, runner_cls)  # step 2
    seconds = (time.perf_counter() - start) / len(requests)   # a batch's time, shared
    return [Prepared(r, hp, k, v, list(templates), seed, seconds, choice.record())
            for r, k, v in zip(requests, keys, values)]


def prepare_edit(lm: LoadedModel, request: EditRequest, hp: Hparams, templates: list[str], seed: int = 0,
                 runner_cls=FastRunner, layer_choice: LayerChoice | None = None) -> Prepared:
    """The key (step 1) and v* (step 2) of one edit; arguments as ``prepare_edits``."""
    return prepare_edits(lm, [request], hp, templates, seed, runner_cls, layer_choice)[0]


def finish_edit(lm: LoadedModel, prepared: Prepared, name: str | Method, stats: KeyStats | None) -> Edit:
    """Step 3, the update, for the method ``name`` with key statistics ``stats`` (None: C = identity)."""
    m = method(name, "rank_one")
    start = time.perf_counter()
    hp, keys, value = prepared.hparams, prepared.keys, prepared.value
    if stats is not None and stats.layer != hp.layer:
        raise CromeError(f"key statistics are for layer {stats.layer}, the edit is at layer {hp.layer}")
    k_cur, v_cur = current(keys, m)
    direction = insertion_direction(keys, m, stats.solve if stats is not None else None)
    delta_w, u, denominator, lam = rank_one_update(keys.k_mean, k_cur, v_cur, value.v_star, direction)  # step 3

    w = lm.weight(hp.layer)
    update_norm = float(delta_w.norm())
    weight_norm = float(widen(w).norm())
    diagnostics = Diagnostics(
        denominator=float(denominator),
        numerator_norm=float((value.v_star - v_cur).norm() * u.norm()),
        update_norm=update_norm,
        weight_norm=weight_norm,
        update_ratio=update_norm / weight_norm,
        cos_bare_mean=float(torch.nn.functional.cosine_similarity(keys.k_bare, keys.k_mean, dim=0)),
        first_token_subject=keys.first_token_subject,
        p_target_opt=value.p_target,
        opt_steps=value.steps,
        finite=bool(torch.isfinite(delta_w).all()) and math.isfinite(update_norm),
        key_outlier_ratio=keys.key_outlier_ratio,
        value_shift=float((value.v_star - v_cur).norm() / v_cur.norm()),
    )
    return Edit(request=prepared.request, method=m.name, layer=hp.layer, delta_w=delta_w.to(w.dtype),
                diagnostics=diagnostics,
                vectors=EditVectors(k_bare=keys.k_bare, k_mean=keys.k_mean, k_cur=k_cur, v_cur=v_cur,
                                    v_star=value.v_star, u=u, lam=lam), context_templates=prepared.templates,
                seed=prepared.seed,
                hparams=hp, seconds=prepared.seconds + time.perf_counter() - start,
                key_stats=stats.record() if stats is not None else None, layer_choice=prepared.layer_choice)


class EditHandle(WeightsHandle):
    """An applied ROME edit: one layer, ΔW = Λ uᵀ."""

    def __init__(self, lm: LoadedModel, edit: Edit):
        super().__init__(lm, [edit.layer], edit.factors)
        self.lm, self.edit = lm, edit


def apply_edit(lm: LoadedModel, edit: Edit) -> EditHandle:
    """Add ΔW to W in place. A non-finite update is refused and W stays as it was."""
    if not edit.diagnostics.finite:
        raise CromeError(f"non-finite update (NaN or inf) at layer {edit.layer}: edit not applied")
    check_finite(edit.delta_w, edit.layer)
    handle = EditHandle(lm, edit)
    add_delta(lm, edit.layer, edit.delta_w)
    return handle
