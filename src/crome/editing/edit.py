"""An edit from request to weights: compute it, check it, apply it, undo it.

``compute_edit`` follows the paper's steps (key, value, update) and never
touches the weights; ``apply_edit`` adds ΔW in place and returns a handle
whose ``restore()`` puts back the exact original tensor.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

import torch

from ..errors import CromeError
from ..hooks import widen
from ..models import LoadedModel
from .compute_key import Keys, compute_keys
from .compute_value import ValueResult, compute_v_stars
from .hparams import Hparams
from .mom2 import KeyStats
from .request import EditRequest
from .templates import context_templates
from .update import CURRENT_KEY, current, rank_one_update

METHODS = tuple(CURRENT_KEY)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise CromeError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")


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
    key_outlier_ratio: float = 1.0  # ‖k^u‖ / median ‖k‖ of the prefixed templates' keys
    value_shift: float = 0.0        # ‖v* − v_cur‖ / ‖v_cur‖: how far v* moves W's output

    def unlikely_to_take(self) -> str | None:
        """Why these numbers say the edit is unlikely to take (None: they don't); guard.WARN_*."""
        from .guard import WARN_OUTLIER, WARN_VALUE_SHIFT

        reasons = []
        if self.value_shift > WARN_VALUE_SHIFT:
            reasons.append(f"‖v*−v_cur‖/‖v_cur‖ = {self.value_shift:.3g} > {WARN_VALUE_SHIFT:g}")
        if self.first_token_subject and self.key_outlier_ratio > WARN_OUTLIER:
            reasons.append(f"the bare key is {self.key_outlier_ratio:.3g}x the prefixed keys' norm "
                           f"(a first-position outlier, an attention sink)")
        return "; ".join(reasons) or None


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
class Edit:
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
    def factors(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """ΔW as factors, layer -> (a, b) with ΔW = a bᵀ (as a MEMIT ``BatchEdit`` holds them)."""
        return {self.layer: (self.vectors.lam[:, None], self.vectors.u[:, None])}

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


def prepare_edits(lm: LoadedModel, requests: list[EditRequest], *, hparams: Hparams | None = None,
                  layer: int | str | None = None, templates: list[str] | None = None, seed: int = 0,
                  runner_cls=None, layer_choice=None) -> list[Prepared]:
    """The keys (step 1) and v* (step 2) of independent edits at one layer, their v* optimised
    together (one batched forward per step; each edit's numbers as if it were alone).
    ``layer``: an index, "auto", or None for the model's default. ``layer_choice``: how
    ``hparams.layer`` was chosen, when the caller chose it (recorded)."""
    from .layer_choice import resolve

    if not requests:
        return []
    hp, choice = resolve(lm, hparams, layer, seed)
    if layer_choice is not None:
        if layer_choice.layer != hp.layer:
            raise CromeError(f"the layer choice says layer {layer_choice.layer}, the edit is at layer {hp.layer}")
        choice = layer_choice
    if runner_cls is None:
        from .fast import FastRunner

        runner_cls = FastRunner
    start = time.perf_counter()
    if templates is None:
        templates = context_templates(lm, seed, hp.template_lengths, hp.template_starts)
    if not templates:
        raise CromeError("no context templates")
    keys = [compute_keys(lm, r, hp.layer, templates) for r in requests]                       # step 1
    values = compute_v_stars(lm, requests, hp.layer, templates, [k.v_bare for k in keys], hp, runner_cls)  # step 2
    seconds = (time.perf_counter() - start) / len(requests)   # a batch's time, shared
    return [Prepared(r, hp, k, v, list(templates), seed, seconds, choice.record())
            for r, k, v in zip(requests, keys, values)]


def prepare_edit(lm: LoadedModel, request: EditRequest, **kwargs) -> Prepared:
    """The key (step 1) and v* (step 2) of one edit; arguments as ``prepare_edits``."""
    return prepare_edits(lm, [request], **kwargs)[0]


def finish_edit(lm: LoadedModel, prepared: Prepared, method: str, stats: KeyStats | None) -> Edit:
    """Step 3, the update, for ``method`` with key statistics ``stats`` (None: C = identity)."""
    check_method(method)
    start = time.perf_counter()
    hp, keys, value = prepared.hparams, prepared.keys, prepared.value
    if stats is not None and stats.layer != hp.layer:
        raise CromeError(f"key statistics are for layer {stats.layer}, the edit is at layer {hp.layer}")
    k_cur, v_cur = current(keys, method)
    c_inv_k = stats.solve(keys.k_mean) if stats is not None else None
    delta_w, u, denominator, lam = rank_one_update(keys.k_mean, k_cur, v_cur, value.v_star, c_inv_k)  # step 3

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
    return Edit(request=prepared.request, method=method, layer=hp.layer, delta_w=delta_w.to(w.dtype),
                diagnostics=diagnostics,
                vectors=EditVectors(k_bare=keys.k_bare, k_mean=keys.k_mean, k_cur=k_cur, v_cur=v_cur,
                                    v_star=value.v_star, u=u, lam=lam), context_templates=prepared.templates,
                seed=prepared.seed,
                hparams=hp, seconds=prepared.seconds + time.perf_counter() - start,
                key_stats=stats.record() if stats is not None else None, layer_choice=prepared.layer_choice)


def resolve_stats(lm: LoadedModel, hp: Hparams, mom2: KeyStats | torch.Tensor | None = None,
                  corpus=None, progress: bool = False) -> KeyStats | None:
    """The key statistics an edit with ``hp`` uses: None with mom2 adjustment off; ``mom2`` when
    given (a bare matrix is wrapped); else C from ``corpus``, or from text sampled from the model
    when there is none (computed once, cached)."""
    if not hp.mom2_adjustment:
        if mom2 is not None:
            raise CromeError("key statistics were given but mom2 adjustment is off (--no-mom2)")
        return None
    if mom2 is None:
        from .mom2 import key_stats

        return key_stats(lm, hp.layer, corpus, hp.mom2_samples, shrinkage=hp.mom2_shrinkage, progress=progress)
    if isinstance(mom2, torch.Tensor):
        return KeyStats(mom2=mom2, source="matrix given", source_hash="", layer=hp.layer, n_keys=0,
                        shrinkage=0.0, hash=_tensor_hash(mom2))
    return mom2


def _tensor_hash(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def compute_edit(lm: LoadedModel, request: EditRequest, method: str = "crome", *,
                 hparams: Hparams | None = None, layer: int | str | None = None,
                 templates: list[str] | None = None, seed: int = 0,
                 mom2: KeyStats | torch.Tensor | None = None, runner_cls=None, layer_choice=None) -> Edit:
    """Compute (not apply) the ROME (``method="rome"``) or C-ROME (``"crome"``) edit.

    Key statistics: ``mom2`` when given, else (mom2 adjustment on, the default) C from text
    sampled from the model, computed once and cached; ``hparams.mom2_adjustment=False`` uses
    C = I, the "Fall of ROME" paper's setting."""
    check_method(method)
    prepared = prepare_edit(lm, request, hparams=hparams, layer=layer, templates=templates, seed=seed,
                            runner_cls=runner_cls, layer_choice=layer_choice)
    stats = resolve_stats(lm, prepared.hparams, mom2)
    return finish_edit(lm, prepared, method, stats)


def compute_edits(lm: LoadedModel, requests: list[EditRequest], method: str = "crome", *,
                  hparams: Hparams | None = None, layer: int | str | None = None,
                  templates: list[str] | None = None, seed: int = 0,
                  mom2: KeyStats | torch.Tensor | None = None, runner_cls=None, layer_choice=None) -> list[Edit]:
    """``compute_edit`` for K independent requests, their v* optimised in one batched forward per
    step: each edit equals the one ``compute_edit`` gives alone (up to float summation order)."""
    check_method(method)
    prepared = prepare_edits(lm, requests, hparams=hparams, layer=layer, templates=templates, seed=seed,
                             runner_cls=runner_cls, layer_choice=layer_choice)
    if not prepared:
        return []
    stats = resolve_stats(lm, prepared[0].hparams, mom2)
    return [finish_edit(lm, p, method, stats) for p in prepared]


class WeightsHandle:
    """Edited layers' W as they were; ``restore()`` puts them back bit for bit. ``factors``: what
    was added, per layer (ΔW = a bᵀ), as checkpoint factors ``memit.add_factors`` adds back bit for bit."""

    def __init__(self, lm: LoadedModel, layers):
        self.params = {layer: lm.mlp_out(layer).weight for layer in layers}
        self.original = {layer: p.detach().clone() for layer, p in self.params.items()}
        self.active = True
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.keys: dict[int, torch.Tensor] = {}   # a batch edit's keys per layer, [B, d_in]

    def restore(self) -> None:
        if self.active:
            with torch.no_grad():
                for layer, p in self.params.items():
                    p.copy_(self.original[layer])
            self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class EditHandle(WeightsHandle):
    """An applied ROME edit: one layer, ΔW = Λ uᵀ."""

    def __init__(self, lm: LoadedModel, edit: Edit):
        super().__init__(lm, [edit.layer])
        self.lm, self.edit = lm, edit
        self.factors = edit.factors


class Overlay:
    """Edits applied as activation hooks instead of being written into W: the rows a batch gives
    to edit i are computed with W + Λ_i u_iᵀ at edit i's layer, other rows with W
    (``hooks.rank_one``; an edit has zero factors at every other layer). One forward pass then
    scores several edited models; W is never touched. ``layer``: the lowest edited layer."""

    def __init__(self, edits: list[Edit]):
        self.layers = sorted({e.layer for e in edits})
        self.layer = self.layers[0]
        self.u, self.lam = {}, {}
        for layer in self.layers:
            self.u[layer] = torch.stack([widen(e.vectors.u) * (e.layer == layer) for e in edits])
            self.lam[layer] = torch.stack([widen(e.vectors.lam) * (e.layer == layer) for e in edits])

    def __len__(self) -> int:
        return len(self.u[self.layer])

    @contextmanager
    def rows(self, lm: LoadedModel, owners: list[int | None]):
        """A context in which batch row b is computed under edit ``owners[b]`` (None: unedited)."""
        from ..hooks import rank_one

        index = torch.tensor([len(self) if o is None else o for o in owners])
        with ExitStack() as stack:
            for layer in self.layers:
                u = torch.cat([self.u[layer], self.u[layer].new_zeros(1, self.u[layer].shape[1])])[index]
                lam = torch.cat([self.lam[layer], self.lam[layer].new_zeros(1, self.lam[layer].shape[1])])[index]
                module = lm.mlp_out(layer)
                stack.enter_context(rank_one(module, u.to(module.weight.device), lam.to(module.weight.device)))
            yield


def apply_edit(lm: LoadedModel, edit: Edit) -> EditHandle:
    """Add ΔW to W in place. A non-finite update is refused and W stays as it was."""
    if not edit.diagnostics.finite or not torch.isfinite(edit.delta_w).all():
        raise CromeError(f"non-finite update (NaN or inf) for layer {edit.layer}: edit not applied")
    handle = EditHandle(lm, edit)
    param = handle.params[edit.layer]
    delta = edit.delta_w.T if lm.arch.transposed else edit.delta_w
    with torch.no_grad():
        param.add_(delta.to(param.device))
    return handle
