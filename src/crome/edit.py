"""An edit from request to weights: compute it, check it, apply it, undo it.

``compute_edit`` follows the paper's steps (key, value, update) and never
touches the weights; ``apply_edit`` adds ΔW in place and returns a handle
whose ``restore()`` puts back the exact original tensor.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .compute_key import compute_keys
from .compute_value import ReferenceRunner, compute_v_star
from .errors import CromeError
from .hparams import Hparams, defaults_for
from .models import LoadedModel
from .request import EditRequest
from .templates import context_templates
from .update import CURRENT_KEY, current, rank_one_update

METHODS = tuple(CURRENT_KEY)


@dataclass
class Diagnostics:
    """What an edit will do, known before it touches the weights."""

    denominator: float          # k_cur · u
    numerator_norm: float       # ‖u (v* − v_cur)ᵀ‖
    update_norm: float          # ‖ΔW‖
    weight_norm: float          # ‖W‖
    update_ratio: float         # ‖ΔW‖ / ‖W‖
    cos_bare_mean: float        # cos(k^u, k̄)
    first_token_subject: bool   # the subject starts at the prompt's first token
    p_target_opt: float         # P(target) reached by the v* optimisation
    opt_steps: int
    finite: bool


@dataclass
class Edit:
    """A computed rank-one edit (ΔW is [d_out, d_in]) and everything needed to reproduce it."""

    request: EditRequest
    method: str
    layer: int
    delta_w: torch.Tensor = field(repr=False)
    diagnostics: Diagnostics
    vectors: dict[str, torch.Tensor] = field(repr=False)  # k_bare, k_mean, k_cur, v_cur, v_star, u
    context_templates: list[str]
    seed: int
    hparams: Hparams
    seconds: float

    def to_dict(self) -> dict:
        return {
            "request": self.request.to_dict(), "method": self.method, "layer": self.layer,
            **asdict(self.diagnostics), "seed": self.seed, "edit_seconds": self.seconds,
            "hparams": self.hparams.to_dict(), "context_templates": self.context_templates,
        }


def compute_edit(lm: LoadedModel, request: EditRequest, method: str = "crome", *,
                 hparams: Hparams | None = None, layer: int | None = None,
                 templates: list[str] | None = None, seed: int = 0,
                 mom2: torch.Tensor | None = None, runner_cls=None) -> Edit:
    """Compute (not apply) the ROME (``method="rome"``) or C-ROME (``"crome"``) edit."""
    if method not in METHODS:
        raise CromeError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    hp = (hparams or defaults_for(lm.name, lm.num_layers)).with_(layer=layer)
    lm.check_layer(hp.layer)
    if hp.mom2_adjustment and mom2 is None:
        raise CromeError("mom2 adjustment is on but no second-moment statistics were given (--mom2-corpus)")
    if runner_cls is None:
        from .fast import FastRunner

        runner_cls = FastRunner if lm.arch.fast else ReferenceRunner
    start = time.perf_counter()
    if templates is None:
        templates = context_templates(lm, seed, hp.template_lengths, hp.template_starts)
    if not templates:
        raise CromeError("no context templates")

    keys = compute_keys(lm, request, hp.layer, templates)                              # step 1
    value = compute_v_star(lm, request, hp.layer, templates, keys.v_bare, hp, runner_cls)  # step 2
    k_cur, v_cur = current(keys, method)
    c_inv_k = torch.linalg.solve(mom2.to(keys.k_mean), keys.k_mean) if mom2 is not None else None
    delta_w, u, denominator = rank_one_update(keys.k_mean, k_cur, v_cur, value.v_star, c_inv_k)  # step 3

    w = lm.weight(hp.layer)
    update_norm = float(delta_w.norm())
    weight_norm = float(w.float().norm())
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
    )
    return Edit(request=request, method=method, layer=hp.layer, delta_w=delta_w.to(w.dtype),
                diagnostics=diagnostics,
                vectors=dict(k_bare=keys.k_bare, k_mean=keys.k_mean, k_cur=k_cur, v_cur=v_cur,
                             v_star=value.v_star, u=u), context_templates=list(templates), seed=seed,
                hparams=hp, seconds=time.perf_counter() - start)


class EditHandle:
    """An applied edit; ``restore()`` puts the original weights back bit for bit."""

    def __init__(self, lm: LoadedModel, edit: Edit):
        self.lm, self.edit = lm, edit
        self.param = lm.mlp_out(edit.layer).weight
        self.original = self.param.detach().clone()
        self.active = True

    def restore(self) -> None:
        if self.active:
            with torch.no_grad():
                self.param.copy_(self.original)
            self.active = False

    def __enter__(self) -> "EditHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def apply_edit(lm: LoadedModel, edit: Edit) -> EditHandle:
    """Add ΔW to W in place. A non-finite update is refused and W stays as it was."""
    if not edit.diagnostics.finite or not torch.isfinite(edit.delta_w).all():
        raise CromeError(f"non-finite update (NaN or inf) for layer {edit.layer}: edit not applied")
    handle = EditHandle(lm, edit)
    delta = edit.delta_w.T if lm.arch.transposed else edit.delta_w
    with torch.no_grad():
        handle.param.add_(delta.to(handle.param.device))
    return handle
