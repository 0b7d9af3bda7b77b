"""NAS, norm-anchor scaling ("Norm Anchors Make Model Edits Last", Liu et al. 2026): every solved value
vector v* is rescaled to a reference norm of the unedited model, and an outlier is not edited.

Sequential edits fail when solved value vectors and edited weights amplify each other (‖v*‖ grows
with ‖W‖, ‖W‖ with ‖v*‖). NAS breaks the loop where v* is solved:

    m̄  = mean ‖v*‖ over trial edits on the unedited model, the top 5% left out
    v* ← v* · m̄ / ‖v*‖,   or no edit when ‖v*‖ > skip · m̄ (skip = 2, the reference code's)

v* = v0 + δ is W's output at the subject's last token of the last edited layer plus the optimised δ;
the batch step's target then becomes z = h − v0 + v* (MEMIT, AlphaEdit: the methods ``--nas`` is
for). crome reads v0 where the method reads h (bare for the reference, the templates' mean for a
consistent method). The reference code averages over 1,000 trial rewrites; crome takes
``Hparams.nas_trials`` of the run's own dataset (seeded), computed once and cached.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch

from ..cache import cached
from ..errors import CromeError
from ..hooks import widen
from ..models import LoadedModel, cache_dir
from ..request import SLOT, EditRequest
from .compute_key import key_and_output
from .compute_value import compute_v_stars
from .fast import FastRunner
from .hparams import Hparams, memit_layers
from .methods import Method

TRIM = 0.05     # the share of the largest trial norms left out of the mean (the reference code's)


@dataclass(frozen=True)
class NormAnchor:
    """m̄ for one model, layer and method, and the rule that uses it."""

    norm: float       # m̄
    layer: int        # where v* is solved (the last edited layer for a batch method)
    trials: int
    skip: float       # a v* over skip · m̄ is not edited

    def scale(self, v_star: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """(v* rescaled to m̄, or None when it is an outlier to skip; ‖v*‖ / m̄)."""
        ratio = float(v_star.norm()) / self.norm
        if not math.isfinite(ratio) or ratio > self.skip:
            return None, ratio
        return v_star * (self.norm / v_star.norm()), ratio

    def record(self) -> dict:
        return asdict(self)


@torch.no_grad()
def reads(lm: LoadedModel, requests: list[EditRequest], layer: int, templates: list[str],
          consistent: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(v0, h) per request at ``layer``: W's output and the residual stream after the layer at the
    subject's last token, on the bare prompt or (a consistent method) averaged over the templates,
    as the batch step reads h; [B, d_out] each."""
    rows, v0, h = [SLOT, *templates], [], []
    for r in requests:
        k, out = key_and_output(lm, r, layer, layer, rows)
        v = widen(lm.mlp_out(layer)(k.to(lm.mlp_out(layer).weight.dtype)))
        v0.append(v[1:].mean(0) if consistent else v[0])
        h.append(out[1:].mean(0) if consistent else out[0])
    return torch.stack(v0), torch.stack(h)


def trial_norms(lm: LoadedModel, requests: list[EditRequest], m: Method, hp: Hparams,
                templates: list[str], runner_cls=FastRunner) -> tuple[int, list[float]]:
    """(the last edited layer, ‖v0 + δ‖ of each trial edit on the model as it is now), δ solved as the
    batch step solves it."""
    layer = memit_layers(hp, lm.num_layers)[-1]
    v0, h = reads(lm, requests, layer, templates, m.consistent)
    site = lm.module(lm.arch.layer_name(layer))
    value_hp = hp.with_(clamp_norm_factor=hp.memit_clamp_norm_factor)
    values = compute_v_stars(lm, requests, layer, templates, list(h), value_hp, runner_cls, site=site)
    return layer, [float((a + v.delta).norm()) for a, v in zip(v0, values)]


def trimmed_mean(norms: list[float], trim: float = TRIM) -> float:
    """The mean of ``norms`` without the largest ``trim`` share (at least one kept)."""
    kept = sorted(norms)[: max(1, len(norms) - math.floor(trim * len(norms)))]
    return sum(kept) / len(kept)


def norm_anchor(lm: LoadedModel, requests: list[EditRequest], m: Method, hp: Hparams, templates: list[str],
                use_cache: bool = True) -> NormAnchor:
    """m̄ from trial edits of ``requests`` on the model as it is now (call it unedited), cached on disk
    by model, method, hyper-parameters, templates and requests."""
    if not m.batch:
        raise CromeError(f"NAS rescales the batch step's value vectors: {m.label} has none")
    if not requests:
        raise CromeError("NAS needs trial edits for its norm anchor: give it requests (a run's data)")
    key = json.dumps([lm.identity, m.name, hp.to_dict(), templates, [r.to_dict() for r in requests]], default=str)
    path = cache_dir() / "nas" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")

    def compute() -> NormAnchor:
        layer, norms = trial_norms(lm, requests, m, hp, templates)
        return NormAnchor(norm=trimmed_mean(norms), layer=layer, trials=len(norms), skip=hp.nas_skip)

    return cached(path, compute, lambda a: json.dumps(a.record()).encode(),
                  lambda b: NormAnchor(**json.loads(b)), "norm anchor", use_cache)


def check_anchor(hp: Hparams, anchor: NormAnchor | None) -> None:
    """NAS on needs its anchor (computed from trial edits), and an anchor needs NAS on."""
    if hp.nas and anchor is None:
        raise CromeError("NAS (--nas) needs its norm anchor, computed from trial edits of the run's data "
                         "(crome eval computes it; from Python: norm_anchor.norm_anchor)")
    if anchor is not None and not hp.nas:
        raise CromeError("a NAS norm anchor was given but NAS is off (Hparams.nas)")
