"""MEMIT (Meng et al. 2023): B facts in one update, spread over several layers.

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

Consistency ("The Fall of ROME"), as data: ``memit`` (the reference) reads h, and takes the
δ's scale, from the bare prompts while its keys are averaged over the templated ones;
``cmemit`` reads h from the same templated prompts as the keys (their mean), so each
layer's residual is measured where its keys are.

The solve, as data too: ``alphaedit`` and ``calphaedit`` replace step 3's solve with AlphaEdit's
null-space projected one (``null_space.py``), the rest unchanged. ``Hparams.norm_weight`` μ adds
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
from .compute_key import key_and_output
from .compute_value import compute_v_stars
from .edit import WeightsHandle
from .hparams import Hparams
from .mom2 import KeyStats
from .null_space import NullSpace, alphaedit_solve
from .request import SLOT, EditRequest, locate
from .templates import context_templates


@dataclass(frozen=True)
class BatchMethod:
    consistent: bool    # read h (and the value step's v0) from the templated prompts' mean, not the bare prompt
    null_space: bool    # AlphaEdit's projected solve, against the running sum of earlier edits' keys


BATCH_METHODS = {"memit": BatchMethod(False, False), "cmemit": BatchMethod(True, False),
                 "alphaedit": BatchMethod(False, True), "calphaedit": BatchMethod(True, True)}


def memit_layers(hp: Hparams, num_layers: int) -> tuple[int, ...]:
    """``hp.memit_layers``, else five layers centred on ROME's layer (GPT-J: ROME 5, MEMIT 3–8)."""
    layers = hp.memit_layers or tuple(range(max(0, hp.layer - 2), min(num_layers, hp.layer + 3)))
    if list(layers) != sorted(set(layers)) or not all(0 <= x < num_layers for x in layers):
        raise CromeError(f"MEMIT layers must be distinct, ascending and in 0..{num_layers - 1}: {list(layers)}")
    return tuple(layers)


def edited_layers(method: str, hp: Hparams, num_layers: int) -> tuple[int, ...]:
    """The layers an edit with ``method`` changes; a perplexity monitor or probe must start at the first."""
    return memit_layers(hp, num_layers) if method in BATCH_METHODS else (hp.layer,)


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


def factor_update(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW = Σ_j a_j b_jᵀ, summed in a fixed order with no matrix product: the same factors give
    the same bits on every replay (a checkpoint's restore). One column is ``torch.outer``, ROME's ΔW."""
    delta = torch.outer(a[:, 0], b[:, 0])
    for j in range(1, a.shape[1]):
        delta += torch.outer(a[:, j], b[:, j])
    return delta


def add_factors(lm: LoadedModel, layer: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """W_layer += a bᵀ (in W's dtype and layout)."""
    delta = factor_update(a, b)
    param = lm.mlp_out(layer).weight
    delta = delta.T if lm.arch.transposed else delta
    with torch.no_grad():
        param.add_(delta.to(device=param.device, dtype=param.dtype))


@dataclass
class BatchEdit:
    """A MEMIT edit of B requests: the factors of each layer's update and how they came about."""

    requests: list[EditRequest]
    method: str
    layers: tuple[int, ...]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(repr=False)   # layer -> (a, b), ΔW = a bᵀ
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
            if not math.isfinite(update_norm):
                raise CromeError(f"non-finite MEMIT update (NaN or inf) at layer {layer}: edit not applied")
            add_factors(lm, layer, a, b)
            factors[layer] = handle.factors[layer] = (a.cpu(), b.cpu())
            handle.keys[layer] = keys.detach().cpu()
    except BaseException:
        handle.restore()
        raise
    return handle, factors, layer_stats, cos


def solver(method: str, hp: Hparams, stats: dict[int, KeyStats], null_space: NullSpace | None, weight: float):
    """Step 3's solve for ``method``: ``solve(layer, keys, resid) -> (a, b, condition)``, with
    ``hp.norm_weight`` μ as a ridge μ·mean(eig C)·I."""
    def ridge(layer):
        c = stats[layer].mom2
        return hp.norm_weight * float(torch.trace(c.double())) / c.shape[0] if hp.norm_weight else 0.0

    if BATCH_METHODS[method].null_space:
        def solve(layer, keys, resid):
            mean = null_space.records[layer]["mean_eigenvalue"]
            return alphaedit_solve(keys, resid, null_space.bases[layer], null_space.prior_at(layer),
                                   hp.alphaedit_l2 * mean + ridge(layer))
    else:
        def solve(layer, keys, resid):
            return memit_solve(keys, resid, stats[layer].mom2, weight, ridge(layer))
    return solve


def apply_memit(lm: LoadedModel, requests: list[EditRequest], method: str = "cmemit", *,
                hparams: Hparams | None = None, stats: dict[int, KeyStats] | None = None,
                templates: list[str] | None = None, seed: int = 0, runner_cls=None,
                null_space: NullSpace | None = None) -> tuple[BatchEdit, WeightsHandle]:
    """Compute and apply the MEMIT (``method="memit"``), C-MEMIT (``"cmemit"``), AlphaEdit
    (``"alphaedit"``) or C-AlphaEdit (``"calphaedit"``) edit of ``requests``.

    Layers are updated one after another (each layer's residual is read with the layers below
    already edited), so computing is applying. Returns the edit and a handle that restores every
    edited layer; a non-finite update is rolled back and raises. ``hparams``: the model's defaults
    when None; ``stats``: C by layer, computed (once, cached) from text sampled from the model when None.
    ``null_space``: AlphaEdit's projections and running key sum (a sequential run's); None: made
    from ``stats``, with no earlier edits."""
    if method not in BATCH_METHODS:
        raise CromeError(f"unknown batch method '{method}': choose one of {', '.join(BATCH_METHODS)}")
    if not requests:
        raise CromeError("no requests to edit")
    consistent = BATCH_METHODS[method].consistent
    if hparams is None:
        from .layer_choice import resolve

        hparams, _ = resolve(lm, None, None, seed)
    hp = hparams
    layers = memit_layers(hp, lm.num_layers)
    if stats is None:
        from .edit import resolve_stats

        if not hp.mom2_adjustment:
            raise CromeError("MEMIT's solve needs key statistics (C): mom2 adjustment is off")
        stats = {x: resolve_stats(lm, replace(hp, layer=x)) for x in layers}
    missing = [x for x in layers if x not in stats]
    if missing:
        raise CromeError(f"MEMIT's solve needs key statistics (C) at layers {missing}: drop --no-mom2")
    if runner_cls is None:
        from .fast import FastRunner

        runner_cls = FastRunner
    start = time.perf_counter()
    if templates is None:
        templates = context_templates(lm, seed, hp.template_lengths, hp.template_starts)
    rows = [SLOT, *templates]       # row 0 the bare prompt, then the templates (as compute_keys)
    last = layers[-1]
    # λ: GPT-J's MEMIT takes 15,000 for keys of width 16,384; by default crome scales it with the width d_in
    weight = hp.mom2_update_weight if hp.mom2_update_weight is not None else float(stats[last].mom2.shape[0])

    if BATCH_METHODS[method].null_space and null_space is None:
        null_space = NullSpace.from_stats({x: stats[x] for x in layers}, hp.null_space_energy)

    def read(layer):
        return _read(lm, requests, layer, last, rows, consistent)

    _, h0, _ = read(layers[0])
    value_hp = replace(hp, clamp_norm_factor=hp.memit_clamp_norm_factor)
    site = lm.module(lm.arch.layer_name(last))
    values = compute_v_stars(lm, requests, last, templates, list(h0), value_hp, runner_cls, site=site)
    z = torch.stack([h + v.delta for h, v in zip(h0, values)])
    handle, factors, layer_stats, cos = _insert(lm, layers, z, read, solver(method, hp, stats, null_space, weight))
    per_request = [dict(p_target_opt=v.p_target, opt_steps=v.steps, cos_bare_mean=c,
                        first_token_subject=locate(lm.tokenizer, r).subject_is_first)
                   for r, v, c in zip(requests, values, cos)]
    edit = BatchEdit(requests=list(requests), method=method, layers=layers, factors=factors, layer_stats=layer_stats,
                     per_request=per_request, context_templates=list(templates), seed=seed, hparams=hp,
                     seconds=time.perf_counter() - start, key_stats={x: stats[x].record() for x in layers},
                     targets=z.cpu(), null_space=null_space.record() if BATCH_METHODS[method].null_space else None)
    return edit, handle
