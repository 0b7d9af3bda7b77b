"""Weights and factors: every edit is ΔW = a bᵀ per layer, added to W and taken back bit for bit.

* ``factor_update`` / ``add_factors``: ΔW from factors, summed in a fixed order, added to W in its
  dtype and layout;
* ``replay``: factor sets added in order, the one replay that sequential checkpoints, delta files
  and ``crome serve``'s history use, so all three give the same bits;
* ``WeightsHandle``: the edited layers' W as they were, ``restore()`` puts them back;
* ``Overlay``: edits applied as activation hooks (W untouched), one edited model per batch row;
* ``weights_sha``: the hash of the edited layers' W.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Iterable

import torch

from ..errors import CromeError
from ..hooks import rank_one, widen
from ..models import LoadedModel
from ..models.fingerprint import tensor_sha

Factors = dict[int, tuple[torch.Tensor, torch.Tensor]]   # layer -> (a, b), ΔW = a bᵀ


def factor_update(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW = Σ_j a_j b_jᵀ, summed in a fixed order with no matrix product: the same factors give
    the same bits on every replay (a checkpoint's restore). One column is ``torch.outer``, ROME's ΔW."""
    delta = torch.outer(a[:, 0], b[:, 0])
    for j in range(1, a.shape[1]):
        delta += torch.outer(a[:, j], b[:, j])
    return delta


def check_finite(delta: torch.Tensor | float, layer: int, what: str = "update") -> None:
    """The one rule for a non-finite update (``delta``: ΔW or its norm): refused, one line, W untouched."""
    if not (math.isfinite(delta) if isinstance(delta, float) else bool(torch.isfinite(delta).all())):
        raise CromeError(f"non-finite {what} (NaN or inf) at layer {layer}: edit not applied")


def add_factors(lm: LoadedModel, layer: int, a: torch.Tensor, b: torch.Tensor) -> None:
    """W_layer += a bᵀ (in W's dtype and layout)."""
    add_delta(lm, layer, factor_update(a, b))


def add_delta(lm: LoadedModel, layer: int, delta: torch.Tensor) -> None:
    """W_layer += ΔW ([d_out, d_in]), in W's dtype and layout."""
    param = lm.mlp_out(layer).weight
    delta = delta.T if lm.arch.transposed else delta
    with torch.no_grad():
        param.add_(delta.to(device=param.device, dtype=param.dtype))


def replay(lm: LoadedModel, factor_sets: Iterable[Factors]) -> None:
    """Add each set of factors to the weights, in order, as the edits that made them added them."""
    for factors in factor_sets:
        for layer, (a, b) in factors.items():
            add_factors(lm, int(layer), a, b)


def on_cpu(factors: Factors) -> Factors:
    """Factors detached and on the CPU (what checkpoints, delta files and histories keep)."""
    return {int(x): (a.detach().cpu(), b.detach().cpu()) for x, (a, b) in factors.items()}


def weights_sha(lm: LoadedModel, layers) -> str:
    """sha256 of the edited layers' W (float32, or float64 for a float64 model), first 16 hex digits."""
    return tensor_sha(*(lm.mlp_out(layer).weight.detach() for layer in sorted(layers)))


class WeightsHandle:
    """Edited layers' W as they were; ``restore()`` puts them back bit for bit. ``factors``: what
    was added, per layer (ΔW = a bᵀ), which ``replay`` adds back bit for bit; ``keys``: a batch
    edit's keys per layer, [B, d_in] (an AlphaEdit run adds them to its running sum)."""

    def __init__(self, lm: LoadedModel, layers, factors: Factors | None = None):
        self.params = {layer: lm.mlp_out(layer).weight for layer in layers}
        self.original = {layer: p.detach().clone() for layer, p in self.params.items()}
        self.active = True
        self.factors: Factors = dict(factors or {})
        self.keys: dict[int, torch.Tensor] = {}

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


def rank_one_factors(edit) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank-one edit's (Λ, u) at its one layer, widened (float32, or float64)."""
    (layer, (a, b)), = edit.factors.items()
    return widen(a[:, 0]), widen(b[:, 0])


class Overlay:
    """Rank-one edits applied as activation hooks instead of being written into W: the rows a batch
    gives to edit i are computed with W + Λ_i u_iᵀ at edit i's layer, other rows with W
    (``hooks.rank_one``; an edit has zero factors at every other layer). One forward pass then
    scores several edited models; W is never touched. ``layer``: the lowest edited layer."""

    def __init__(self, edits: list):
        self.layers = sorted({e.layer for e in edits})
        self.layer = self.layers[0]
        self.u, self.lam = {}, {}
        vectors = [rank_one_factors(e) for e in edits]
        for layer in self.layers:
            self.u[layer] = torch.stack([u * (e.layer == layer) for e, (_, u) in zip(edits, vectors)])
            self.lam[layer] = torch.stack([lam * (e.layer == layer) for e, (lam, _) in zip(edits, vectors)])

    def __len__(self) -> int:
        return len(self.u[self.layer])

    @contextmanager
    def rows(self, lm: LoadedModel, owners: list[int | None]):
        """A context in which batch row b is computed under edit ``owners[b]`` (None: unedited)."""
        index = torch.tensor([len(self) if o is None else o for o in owners])
        with ExitStack() as stack:
            for layer in self.layers:
                u = torch.cat([self.u[layer], self.u[layer].new_zeros(1, self.u[layer].shape[1])])[index]
                lam = torch.cat([self.lam[layer], self.lam[layer].new_zeros(1, self.lam[layer].shape[1])])[index]
                module = lm.mlp_out(layer)
                stack.enter_context(rank_one(module, u.to(module.weight.device), lam.to(module.weight.device)))
            yield
