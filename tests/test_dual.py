"""The dual-key update (issue 38): one rank-one ΔW that writes v* − v_bare = δ at both the bare key k^u
and the template-mean key k̄, with the same denominator at each, and leaves every key C⁻¹-orthogonal to
both as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import TEMPLATES, stats_for, tiny_model

from crome import EditRequest
from crome.editing.api import prepare_edit
from crome.editing.edit import apply_edit, finish_edit
from crome.editing.hparams import Hparams
from crome.editing.methods import method

HP = Hparams(layer=1, v_steps=3)
PARIS = EditRequest.create("{} is the capital of", "Paris", "Germany")             # a first-token subject
DARRIEUX = EditRequest.create("The mother tongue of {} is", "Danielle Darrieux", "English")


@pytest.fixture
def lm(tokenizer):
    return tiny_model("llama", tokenizer, dtype=torch.float64)


@pytest.mark.parametrize("request_", [PARIS, DARRIEUX], ids=["first-token", "later"])
@pytest.mark.parametrize("with_c", [True, False], ids=["C", "identity"])
def test_dual_writes_delta_at_both_keys_and_nothing_orthogonal_to_them(lm, request_, with_c):
    stats = stats_for(lm, [HP.layer])[HP.layer] if with_c else None
    prepared = prepare_edit(lm, request_, hparams=HP, templates=TEMPLATES)
    keys, delta = prepared.keys, prepared.value.delta
    edit = finish_edit(lm, prepared, "dual", stats)
    dw = edit.delta_w
    for k in (keys.k_bare, keys.k_mean):
        assert torch.allclose(dw @ k, delta, rtol=1e-6, atol=1e-9 * float(delta.norm()))
    assert float(keys.k_bare @ edit.vectors.u) == pytest.approx(float(keys.k_mean @ edit.vectors.u), rel=1e-8)
    # a key C⁻¹-orthogonal to both: x − K (KᵀC⁻¹K)⁻¹ KᵀC⁻¹ x
    k = torch.stack([keys.k_bare, keys.k_mean], dim=1)
    solve = stats.solve if stats is not None else (lambda y: y)
    x = torch.randn(k.shape[0], dtype=k.dtype, generator=torch.Generator().manual_seed(0))
    x = x - k @ torch.linalg.solve(k.T @ solve(k), solve(k).T @ x)
    assert float((dw @ x).norm()) < 1e-8 * float(dw.norm()) * float(x.norm())
    # C-ROME writes δ' at k̄ only; at the bare key it writes what k̄ and k^u share
    crome = finish_edit(lm, prepared, "crome", stats)
    assert not torch.allclose(crome.delta_w @ keys.k_bare, delta, rtol=1e-3)


def test_dual_edit_reverts_bit_for_bit(lm):
    stats = stats_for(lm, [HP.layer])[HP.layer]
    before = lm.mlp_out(HP.layer).weight.detach().clone()
    edit = finish_edit(lm, prepare_edit(lm, PARIS, hparams=HP, templates=TEMPLATES), "dual", stats)
    handle = apply_edit(lm, edit)
    assert not torch.equal(lm.mlp_out(HP.layer).weight, before)
    handle.restore()
    assert torch.equal(lm.mlp_out(HP.layer).weight, before)


def test_dual_is_a_table_entry_tested_on_the_bare_prompt():
    m = method("dual")
    assert m.inserts == ("k_mean", "k_bare") and m.served and m.test_places == ("bare", "prefix") and not m.in_place
    assert method("crome").inserts == ("k_mean",) and method("crome").test_places == ("bare", "prefix")
