"""Step 3: the rank-one update, ROME's closed form.

    u  = C⁻¹ k̄ / ‖C⁻¹ k̄‖          (C = identity without mom2 adjustment)
    Λ  = (v* − v_cur) / (k_cur · u)
    ΔW = Λ uᵀ

ROME (the reference code) takes k_cur, v_cur from the bare prompt (k^u);
C-ROME ("The Fall of ROME") takes them from the same templates as k̄, so the
denominator k_cur · u cannot collapse when k^u and k̄ disagree.
"""

from __future__ import annotations

import torch

from .compute_key import Keys

# Which key/value each method treats as "current": data, not branches.
CURRENT_KEY = {
    "rome": ("k_bare", "v_bare"),
    "crome": ("k_mean", "v_mean"),
}


def current(keys: Keys, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    k_name, v_name = CURRENT_KEY[method]
    return getattr(keys, k_name), getattr(keys, v_name)


def rank_one_update(k_mean: torch.Tensor, k_cur: torch.Tensor, v_cur: torch.Tensor,
                    v_star: torch.Tensor, c_inv_k_mean: torch.Tensor | None = None):
    """ΔW = Λ uᵀ (shape [d_out, d_in]), the direction u, the denominator k_cur · u and Λ."""
    u = k_mean if c_inv_k_mean is None else c_inv_k_mean
    u = u / u.norm()
    denominator = k_cur @ u
    lam = (v_star - v_cur) / denominator
    return torch.outer(lam, u), u, denominator, lam
