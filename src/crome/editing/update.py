"""Step 3: the rank-one update, ROME's closed form.

    u  = C⁻¹ k̄ / ‖C⁻¹ k̄‖          (C = identity without mom2 adjustment)
    Λ  = (v* − v_cur) / (k_cur · u)
    ΔW = Λ uᵀ

ROME (the reference code) takes k_cur, v_cur from the bare prompt (k^u);
C-ROME ("The Fall of ROME") takes them from the same templates as k̄, so the
denominator k_cur · u cannot collapse when k^u and k̄ disagree.

A method that inserts several keys K = [k̄, k^u] (``Method.inserts``, the dual-key method) takes the
direction b = C⁻¹K (KᵀC⁻¹K)⁺ 1, the least-C-norm vector with bᵀk = 1 for every key in K: the
denominator k · u is the same at each, and ΔW k = v* − v_bare = δ at both, the vector the v*
optimisation added at the bare prompt and at every prefixed one. A key x with KᵀC⁻¹x = 0 is left as
it was.
"""

from __future__ import annotations

import torch

from .compute_key import Keys
from .methods import Method, method


def current(keys: Keys, name: str | Method) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value the method treats as "current" (``Method.current_key``): data, not branches."""
    k_name, v_name = method(name).current_key
    return getattr(keys, k_name), getattr(keys, v_name)


def insertion_direction(keys: Keys, name: str | Method, solve=None) -> torch.Tensor | None:
    """The input side of ΔW, unnormalised: C⁻¹k̄ for a method inserting k̄ alone (None without C: k̄
    itself), else C⁻¹K (KᵀC⁻¹K)⁺ 1 over its keys K (``solve``: C⁻¹ x; None: C = identity)."""
    names = method(name).inserts
    if names == ("k_mean",):
        return solve(keys.k_mean) if solve is not None else None
    k = torch.stack([getattr(keys, n) for n in names], dim=1)                 # [d_in, r]
    c_inv_k = solve(k) if solve is not None else k
    gram = k.T @ c_inv_k                                                      # KᵀC⁻¹K, [r, r]
    weights = torch.linalg.pinv(gram, rtol=1e-6, hermitian=True) @ torch.ones(len(names), dtype=k.dtype,
                                                                               device=k.device)
    return c_inv_k @ weights


def rank_one_update(k_mean: torch.Tensor, k_cur: torch.Tensor, v_cur: torch.Tensor,
                    v_star: torch.Tensor, direction: torch.Tensor | None = None):
    """ΔW = Λ uᵀ (shape [d_out, d_in]), the direction u, the denominator k_cur · u and Λ. ``direction``:
    u before normalising (``insertion_direction``: C⁻¹k̄, or the multi-key b); None: k̄ (C = identity)."""
    u = k_mean if direction is None else direction
    u = u / u.norm()
    denominator = k_cur @ u
    lam = (v_star - v_cur) / denominator
    return torch.outer(lam, u), u, denominator, lam
