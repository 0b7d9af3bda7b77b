"""The update equation, the two key modes, apply/restore, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import TEMPLATES

from crome import EditRequest, apply_edit, compute_edit
from crome.editing.compute_key import compute_keys
from crome.editing.hparams import Hparams

HP = Hparams(mom2_adjustment=False, layer=1, v_steps=5)
REQ = EditRequest.create("{} is the capital of", "Paris", "Germany")
LATER = EditRequest.create("The capital city of {} is", "Spain", "Rome")


def mlp_io(lm, layer, text, token):
    """Input and output of W at ``token`` for ``text``: an independent hook, not crome's."""
    seen = {}
    h = lm.mlp_out(layer).register_forward_hook(lambda m, a, o: seen.update(k=a[0][0, token], v=o[0, token]))
    lm.model(input_ids=torch.tensor([lm.tokenizer(text)["input_ids"]]))
    h.remove()
    return seen["k"], seen["v"]


def subject_last(lm, text, subject):
    enc = lm.tokenizer(text, return_offsets_mapping=True)
    end = text.index(subject) + len(subject)
    return max(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end)


@pytest.mark.parametrize("request_", [REQ, LATER])
def test_update_equals_formula(tiny, request_):
    edit = compute_edit(tiny, request_, "rome", hparams=HP, templates=TEMPLATES)
    texts = [t.replace("{}", request_.prompt).replace("{}", request_.subject) for t in TEMPLATES]
    keys = torch.stack([mlp_io(tiny, 1, t, subject_last(tiny, t, request_.subject))[0] for t in texts])
    bare = request_.text()
    k_bare, v_bare = mlp_io(tiny, 1, bare, subject_last(tiny, bare, request_.subject))
    k_mean = keys.mean(0)
    torch.testing.assert_close(edit.vectors.k_mean, k_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(edit.vectors.k_bare, k_bare, rtol=1e-4, atol=1e-5)
    v_star = edit.vectors.v_star
    u = k_mean / k_mean.norm()
    expected = torch.outer((v_star - v_bare) / (k_bare @ u), u)
    torch.testing.assert_close(edit.delta_w, expected, rtol=1e-4, atol=1e-5)
    assert edit.diagnostics.denominator == pytest.approx(float(k_bare @ u), rel=1e-4)
    assert edit.diagnostics.numerator_norm == pytest.approx(float((v_star - v_bare).norm()), rel=1e-4)
    assert edit.diagnostics.update_norm == pytest.approx(float(expected.norm()), rel=1e-4)


def test_edited_layer_maps_current_key_to_v_star(tiny):
    """The defining property: after the edit, W' k_cur (+ b) = v*, for both methods."""
    for method in ("rome", "crome"):
        edit = compute_edit(tiny, REQ, method, hparams=HP, templates=TEMPLATES)
        with apply_edit(tiny, edit):
            keys = compute_keys(tiny, REQ, 1, TEMPLATES)
        produced = keys.v_bare if method == "rome" else keys.v_mean
        torch.testing.assert_close(produced, edit.vectors.v_star, rtol=1e-3, atol=1e-4)


def test_methods_differ_only_in_current_key_and_value(tiny):
    rome = compute_edit(tiny, REQ, "rome", hparams=HP, templates=TEMPLATES)
    crome = compute_edit(tiny, REQ, "crome", hparams=HP, templates=TEMPLATES)
    for name in ("k_bare", "k_mean", "v_star", "u"):
        assert torch.equal(getattr(rome.vectors, name), getattr(crome.vectors, name)), name
    assert torch.equal(rome.vectors.k_cur, rome.vectors.k_bare)
    assert torch.equal(crome.vectors.k_cur, crome.vectors.k_mean)
    keys = compute_keys(tiny, REQ, 1, TEMPLATES)
    torch.testing.assert_close(rome.vectors.v_cur, keys.v_bare)
    torch.testing.assert_close(crome.vectors.v_cur, keys.v_mean)
    assert not torch.equal(rome.delta_w, crome.delta_w)


def test_restore_is_bit_exact(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    edit = compute_edit(tiny, REQ, "crome", hparams=HP, templates=TEMPLATES)
    handle = apply_edit(tiny, edit)
    w = tiny.mlp_out(1).weight
    assert not torch.equal(w, before[[k for k in before if k.endswith(tiny.arch.mlp_out_name(1) + ".weight")][0]])
    handle.restore()
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_compute_edit_leaves_weights_untouched(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    compute_edit(tiny, REQ, "rome", hparams=HP, templates=TEMPLATES)
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items())


def test_mom2_adjustment_uses_c_inverse_k_mean(tiny):
    d = tiny.weight(1).shape[1]
    torch.manual_seed(1)
    a = torch.randn(d, d)
    c = a @ a.T / d + torch.eye(d)
    edit = compute_edit(tiny, REQ, "crome", hparams=HP.with_(mom2_adjustment=True), templates=TEMPLATES, mom2=c)
    c_inv_k = torch.linalg.solve(c, edit.vectors.k_mean)
    torch.testing.assert_close(edit.vectors.u, c_inv_k / c_inv_k.norm(), rtol=1e-4, atol=1e-6)
    assert edit.hparams.mom2_adjustment


def test_diagnostics_flag_first_token_subject(tiny):
    first = compute_edit(tiny, REQ, "rome", hparams=HP, templates=TEMPLATES)
    later = compute_edit(tiny, LATER, "rome", hparams=HP, templates=TEMPLATES)
    assert first.diagnostics.first_token_subject and not later.diagnostics.first_token_subject
    d = first.to_dict()
    assert d["context_templates"] == TEMPLATES and d["seed"] == 0 and d["method"] == "rome"
