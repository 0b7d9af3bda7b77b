"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the
preserved keys, solved against the keys of every earlier edit.

The preserved knowledge is C, the second moment of the keys (``mom2.py``). Its eigenvectors
with the smallest eigenvalues span the directions that ordinary keys hardly use; P = Û Ûᵀ
projects onto them. An update of the form Δ = D P leaves every key with P k = 0 unchanged.
crome keeps Û (n columns) rather than P, and solves in its n coordinates (``alphaedit_solve``).

    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + λ I)⁻¹

K₁, R: this update's keys and residuals (as MEMIT's); K_p K_pᵀ: the running sum of the keys
of every earlier update (``NullSpace.prior``), so that a new edit does not undo an old one.

The cut-off. The reference keeps the eigenvectors whose eigenvalue is below 2·10⁻², an
absolute number that means something different for every model and layer (on crome's
default model it keeps 977–1,243 of 1,536 directions). crome keeps the smallest eigenvalues
whose sum is at most a share ``energy`` of C's trace (``Hparams.null_space_energy``): the
share of ordinary keys' energy that an update can touch. The eigenvalues are those of the
sample second moment (the Ledoit–Wolf shrinkage that ``KeyStats`` applies is undone; it
does not change the eigenvectors). λ is in units of C's mean eigenvalue
(``Hparams.alphaedit_l2``), so it is scale-free too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import CromeError
from ..hooks import widen
from .mom2 import KeyStats


def projection(stats: KeyStats, energy: float) -> tuple[torch.Tensor, dict]:
    """Û (float64, [d_in, n]): the eigenvectors of C that hold the smallest share ``energy`` of its
    trace (P = Û Ûᵀ), and a record: null-space dimension n, the share left out, the cut."""
    if not 0.0 < energy < 1.0:
        raise CromeError(f"the null space's energy share must be in (0, 1), not {energy}")
    c = stats.mom2.double()
    d = c.shape[0]
    mean = torch.trace(c) / d
    sample = (c - stats.shrinkage * mean * torch.eye(d, dtype=c.dtype)) / (1.0 - stats.shrinkage)
    eigenvalues, vectors = torch.linalg.eigh(sample)          # ascending
    eigenvalues = eigenvalues.clamp(min=0.0)
    share = torch.cumsum(eigenvalues, 0) / eigenvalues.sum()
    dim = int((share <= energy).sum())
    if dim == 0:
        raise CromeError(f"no eigenvector of C at layer {stats.layer} holds under {energy:g} of its energy: "
                         f"raise the null space's energy share")
    record = dict(null_dim=dim, d_in=d, energy=float(share[dim - 1]), energy_asked=energy,
                  cutoff_eigenvalue=float(eigenvalues[dim - 1]), mean_eigenvalue=float(mean))
    return vectors[:, :dim].contiguous(), record


def alphaedit_solve(keys: torch.Tensor, resid: torch.Tensor, basis: torch.Tensor, prior: torch.Tensor,
                    weight: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Δ = R K₁ᵀ P (S P + λI)⁻¹ with P = Û Ûᵀ, S = K₁K₁ᵀ + K_pK_pᵀ, as factors (a, b), Δ = a bᵀ, and the
    condition number of the system solved. ``keys``: [B, d_in], ``resid``: [B, d_out]; ``basis``: Û,
    [d_in, n]; ``prior``: Ûᵀ K_pK_pᵀ Û, [n, n] (the running sum, in the null space's coordinates).

    b = (P S + λI)⁻¹ P K₁ lies in P's range, b = Û y, and then (P S + λI) Û y = Û (ÛᵀSÛ + λI) y:
    so y = (ÛᵀSÛ + λI)⁻¹ ÛᵀK₁, an n × n system (float64) instead of a d_in × d_in one."""
    basis = basis.to(keys.device)
    reduced = basis.T @ keys.double().T                      # Ûᵀ K₁, [n, B]
    lhs = reduced @ reduced.T + prior.to(keys.device)
    lhs += weight * torch.eye(lhs.shape[0], dtype=torch.float64, device=keys.device)
    b = basis @ torch.linalg.solve(lhs, reduced)
    eig = torch.linalg.eigvalsh(lhs)
    out = widen(keys).dtype   # float32, or float64 when the keys are
    return resid.double().T.to(out), b.to(out), float(eig[-1] / eig[0])


def outer_sum(vectors: torch.Tensor) -> torch.Tensor:
    """Σ_j v_j v_jᵀ in float64, one outer product at a time in a fixed order (no matrix product
    whose summation order depends on the thread count): the same vectors give the same bits."""
    vectors = vectors.double()
    total = torch.outer(vectors[0], vectors[0])
    for v in vectors[1:]:
        total += torch.outer(v, v)
    return total


@dataclass
class NullSpace:
    """AlphaEdit's state per edited layer: Û (fixed by C) and the running key sum of the edits kept."""

    bases: dict[int, torch.Tensor] = field(repr=False)            # layer -> Û, [d_in, n], float64
    records: dict[int, dict]                                       # layer -> ``projection``'s record
    prior: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)   # layer -> Ûᵀ(Σ k kᵀ)Û
    edits: int = 0                                                 # keys accumulated so far

    @classmethod
    def from_stats(cls, stats: dict[int, KeyStats], energy: float) -> "NullSpace":
        made = {layer: projection(s, energy) for layer, s in stats.items()}
        return cls({x: u for x, (u, _) in made.items()}, {x: r for x, (_, r) in made.items()})

    def fresh(self) -> "NullSpace":
        """The same projections with no earlier edits (a new sequential run)."""
        return NullSpace(self.bases, self.records)

    def prior_at(self, layer: int) -> torch.Tensor:
        n = self.bases[layer].shape[1]
        return self.prior.get(layer, torch.zeros(n, n, dtype=torch.float64))

    def accumulate(self, keys: dict[int, torch.Tensor]) -> None:
        """Add a kept update's keys (layer -> [B, d_in]) to the running sum."""
        for layer, k in keys.items():
            reduced = k.cpu().double() @ self.bases[layer]   # [B, n]: each row alone, the same bits whatever B
            self.prior[layer] = self.prior_at(layer) + outer_sum(reduced)
        self.edits += next((len(k) for k in keys.values()), 0)

    def state(self) -> dict:
        """What a checkpoint keeps of it (the running sum is rebuilt from each update's keys)."""
        return dict(bases=dict(self.bases), records=self.records)

    @classmethod
    def from_state(cls, state: dict) -> "NullSpace":
        return cls(dict(state["bases"]), dict(state["records"]))

    def record(self) -> dict:
        return {str(x): dict(r, prior_edits=self.edits) for x, r in self.records.items()}
