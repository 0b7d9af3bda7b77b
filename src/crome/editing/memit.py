"""The batch step, MEMIT (Meng et al. 2023): B facts in one update, spread over several layers, at
layers and with C already chosen (``api.apply_memit`` fills the defaults).

The same steps as ROME's files:

1. keys: at each edited layer l, every request's key, averaged over the context templates
   (``compute_key.key_and_output``);
2. values: a target z for the residual stream after the last edited layer L: z = h + δ,
   δ from the v* optimisation (``compute_value``) with δ added to layer L's output;
3. insert, layer by layer from the lowest: the residual R = z − h (h read again with the
   layers below already updated), a share 1/(layers left) of it, solved against the keys
   with the key statistics C:

       ΔW_l = (R / m) Kᵀ (λ C + K Kᵀ)⁻¹         (K: [d_in, B], R: [d_out, B])

   kept as factors a bᵀ, a = R / m and b = (λ C + K Kᵀ)⁻¹ K: rank B per layer.

Consistency ("The Fall of ROME"), as data (``Method.reads`` in ``methods.py``): the reference
reads h, and takes the δ's scale, from the bare prompts while its keys are averaged over the
templated ones; the consistent methods read h from the same templated prompts as the keys (their
mean), so each layer's residual is measured where its keys are.

The solve, as data too: a method with ``Method.null_space`` (AlphaEdit) replaces step 3's solve
with AlphaEdit's null-space projected one (``null_space.py``), the rest unchanged. ``Hparams.norm_weight`` μ adds
μ·mean(eig C)·I to either solve (ENCORE's bound on the update's Frobenius norm).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch

from ..errors import CromeError
from ..hooks import widen
from ..models import LoadedModel
from ..request import SLOT, EditRequest, locate
from .compute_key import key_and_output
from .compute_value import compute_v_stars
from .fast import FastRunner
from .hparams import Hparams, memit_layers
from .methods import Method, method
from .mom2 import KeyStats
from .norm_anchor import NormAnchor, check_anchor, reads
from .null_space import NullSpace, alphaedit_solve
from .records import BatchDiagnostics
from .weights import Factors, WeightsHandle, add_factors, check_finite, factor_update


def memit_solve(keys: torch.Tensor, resid: torch.Tensor, c: torch.Tensor,
                weight: float, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ΔW = R Kᵀ (λC + K Kᵀ + ridge·I)⁻¹ as factors (a, b), ΔW = a bᵀ, and the condition number of
    the system. ``keys``: [B, d_in], ``resid``: [B, d_out] (one row per request); solved in float64."""
    k = keys.double().T
    lhs = weight * c.double().to(k.device) + k @ k.T
    if ridge:
        lhs += ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    b = torch.linalg.solve(lhs, k)
    eig = torch.linalg.eigvalsh(lhs)
    out = widen(keys).dtype   # float32, or float64 when the keys are
    return resid.double().T.to(out), b.to(out), float(eig[-1] / eig[0])


@dataclass
class BatchEdit:
    """A MEMIT edit of B requests: the factors of each layer's update and how they came about."""

    requests: list[EditRequest]
    method: str
    layers: tuple[int, ...]
    factors: Factors = field(repr=False)   # layer -> (a, b), ΔW = a bᵀ
    layer_stats: dict[int, dict]      # layer -> update_norm, weight_norm, update_ratio, condition, residual_norm
    per_request: list[dict]           # p_target_opt, opt_steps, first_token_subject, cos_bare_mean (last layer)
    context_templates: list[str]
    seed: int
    hparams: Hparams
    seconds: float
    key_stats: dict[int, dict] = field(default_factory=dict)
    targets: torch.Tensor | None = field(default=None, repr=False)   # z, [B, d]: h after the last layer + δ
    null_space: dict | None = None    # AlphaEdit: per layer, the null space's dimension and energy, earlier edits

    @property
    def finite(self) -> bool:
        return all(math.isfinite(s["update_norm"]) for s in self.layer_stats.values())

    @property
    def diagnostics(self) -> BatchDiagnostics:
        """The fields a ``GuardRule`` reads: the largest update ratio over the layers, the smallest
        cos(k^u, k̄) over the requests."""
        cos = [r["cos_bare_mean"] for r in self.per_request if r.get("cos_bare_mean") is not None]
        return BatchDiagnostics(update_ratio=self.record()["update_ratio"], cos_bare_mean=min(cos) if cos else None,
                                finite=self.finite)

    def record(self) -> dict:
        """What every request's eval record carries about the batch."""
        return dict(layers=list(self.layers), update_cases=len(self.requests), finite=self.finite,
                    update_norm=math.sqrt(sum(s["update_norm"] ** 2 for s in self.layer_stats.values())),
                    update_ratio=max(s["update_ratio"] for s in self.layer_stats.values()),
                    layer_stats={str(k): v for k, v in self.layer_stats.items()},
                    key_stats={str(k): v for k, v in self.key_stats.items()},
                    **({"null_space": self.null_space} if self.null_space is not None else {}))


def _read(lm: LoadedModel, requests, layer: int, last: int, rows, consistent: bool):
    """Per request: the mean key at ``layer``, h after layer ``last`` (mean over the templates, or
    the bare prompt's), and cos(k^u, k̄)."""
    ks, hs, cos = [], [], []
    for r in requests:
        k, h = key_and_output(lm, r, layer, last, rows)
        ks.append(k[1:].mean(0))
        hs.append(h[1:].mean(0) if consistent else h[0])
        cos.append(float(torch.nn.functional.cosine_similarity(k[0], k[1:].mean(0), dim=0)))
    return torch.stack(ks), torch.stack(hs), cos


def _insert(lm: LoadedModel, layers, z: torch.Tensor, read, solve):
    """Spread the residual z − h over ``layers``, one solve and update per layer, the layers below
    already edited: (handle, factors, per-layer statistics, cos of the last read). ``solve(layer,
    keys, resid)`` gives the layer's factors and condition number. The handle keeps each layer's
    keys (``handle.keys``: an AlphaEdit run adds them to its running sum). A non-finite update
    restores every layer and raises."""
    handle = WeightsHandle(lm, layers)
    factors, layer_stats = {}, {}
    try:
        for i, layer in enumerate(layers):
            keys, h, cos = read(layer)
            resid = (z - h) / (len(layers) - i)
            a, b, condition = solve(layer, keys, resid)
            w_norm = float(widen(lm.mlp_out(layer).weight).norm())
            update_norm = float(factor_update(a, b).norm())
            layer_stats[layer] = dict(update_norm=update_norm, weight_norm=w_norm, update_ratio=update_norm / w_norm,
                                      condition=condition, residual_norm=float((z - h).norm(dim=1).mean()))
            check_finite(update_norm, layer, "MEMIT update")
            add_factors(lm, layer, a, b)
            factors[layer] = handle.factors[layer] = (a.cpu(), b.cpu())
            handle.keys[layer] = keys.detach().cpu()
    except BaseException:
        handle.restore()
        raise
    return handle, factors, layer_stats, cos


def solver(m: Method, hp: Hparams, stats: dict[int, KeyStats], null_space: NullSpace | None, weight: float):
    """Step 3's solve for the method ``m``: ``solve(layer, keys, resid) -> (a, b, condition)``, with
    ``hp.norm_weight`` μ as a ridge μ·mean(eig C)·I."""
    def ridge(layer):
        c = stats[layer].mom2
        return hp.norm_weight * float(torch.trace(c.double())) / c.shape[0] if hp.norm_weight else 0.0

    if m.null_space:
        def solve(layer, keys, resid):
            mean = null_space.records[layer]["mean_eigenvalue"]
            return alphaedit_solve(keys, resid, null_space.bases[layer], null_space.prior_at(layer),
                                   hp.alphaedit_l2 * mean + ridge(layer))
    else:
        def solve(layer, keys, resid):
            return memit_solve(keys, resid, stats[layer].mom2, weight, ridge(layer))
    return solve


def _targets(lm: LoadedModel, requests, m: Method, hp: Hparams, templates, layers, read, runner_cls,
             anchor: NormAnchor | None = None):
    """Step 2: z = h + δ after the last layer (δ from the v* optimisation on the residual stream there);
    with a NAS ``anchor``, z = h − v0 + v* with v* = v0 + δ rescaled (or z = h: not edited). Returns
    (z, the v* results, per request the NAS fields)."""
    _, h0, _ = read(layers[0])
    value_hp = replace(hp, clamp_norm_factor=hp.memit_clamp_norm_factor)
    site = lm.module(lm.arch.layer_name(layers[-1]))
    values = compute_v_stars(lm, requests, layers[-1], templates, list(h0), value_hp, runner_cls, site=site)
    z = [h + v.delta for h, v in zip(h0, values)]
    if anchor is None:
        return torch.stack(z), values, [{} for _ in requests]
    v0, _ = reads(lm, requests, layers[-1], templates, m.consistent)
    nas = []
    for i, (h, v, a) in enumerate(zip(h0, values, v0)):
        scaled, ratio = anchor.scale(a + v.delta)
        z[i] = h if scaled is None else h - a + scaled
        nas.append(dict(nas_ratio=ratio, nas_skipped=scaled is None))
    return torch.stack(z), values, nas


def _check_stats(m: Method, stats: dict[int, KeyStats], layers) -> None:
    missing = [x for x in layers if x not in stats]
    if missing:
        m.require_stats(missing)


def apply_memit(lm: LoadedModel, requests: list[EditRequest], name: str | Method, hp: Hparams,
                stats: dict[int, KeyStats], templates: list[str], seed: int = 0, runner_cls=FastRunner,
                null_space: NullSpace | None = None,
                anchor: NormAnchor | None = None) -> tuple[BatchEdit, WeightsHandle]:
    """Compute and apply the batch method ``name``'s edit of ``requests`` at ``memit_layers(hp)`` with
    C by layer ``stats`` and context templates ``templates`` (``seed``: theirs, recorded).

    Layers are updated one after another (each layer's residual is read with the layers below
    already edited), so computing is applying. Returns the edit and a handle that restores every
    edited layer; a non-finite update is rolled back and raises. ``null_space``: AlphaEdit's
    projections and running key sum (a sequential run's); None: made from ``stats``, no earlier edits.
    ``anchor``: NAS's norm anchor (``Hparams.nas``)."""
    m = method(name, "batch")
    check_anchor(hp, anchor)
    if not requests:
        raise CromeError("no requests to edit")
    layers = memit_layers(hp, lm.num_layers)
    _check_stats(m, stats, layers)
    start, last = time.perf_counter(), layers[-1]
    rows = [SLOT, *templates]       # row 0 the bare prompt, then the templates (as compute_keys)
    # λ: GPT-J's MEMIT takes 15,000 for keys of width 16,384; by default crome scales it with the width d_in
    weight = hp.mom2_update_weight if hp.mom2_update_weight is not None else float(stats[last].mom2.shape[0])
    if m.null_space and null_space is None:
        null_space = NullSpace.from_stats({x: stats[x] for x in layers}, hp.null_space_energy)

    def read(layer):
        return _read(lm, requests, layer, last, rows, m.consistent)

    z, values, nas = _targets(lm, requests, m, hp, templates, layers, read, runner_cls, anchor)
    handle, factors, layer_stats, cos = _insert(lm, layers, z, read, solver(m, hp, stats, null_space, weight))
    per_request = [dict(p_target_opt=v.p_target, opt_steps=v.steps, cos_bare_mean=c,
                        first_token_subject=locate(lm.tokenizer, r).subject_is_first, **extra)
                   for r, v, c, extra in zip(requests, values, cos, nas)]
    edit = BatchEdit(requests=list(requests), method=m.name, layers=layers, factors=factors, layer_stats=layer_stats,
                     per_request=per_request, context_templates=list(templates), seed=seed, hparams=hp,
                     seconds=time.perf_counter() - start, key_stats={x: stats[x].record() for x in layers},
                     targets=z.cpu(), null_space=null_space.record() if m.null_space else None)
    return edit, handle
