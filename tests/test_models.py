"""The architecture table, saving and reloading."""

from __future__ import annotations

import pytest
import torch
from conftest import TEMPLATES, tiny_model

from crome import EditRequest, apply_edit, compute_edit, save_model
from crome.arch import ARCHITECTURES
from crome.editing.hparams import Hparams, defaults_for

TESTABLE = [t for t in ARCHITECTURES if t != "gemma3"]  # gemma3 multimodal needs a vision tower


@pytest.mark.parametrize("model_type", TESTABLE)
def test_every_architecture_edits(model_type, tokenizer):
    lm = tiny_model(model_type, tokenizer)
    w = lm.weight(1)
    d_model = lm.model.config.get_text_config().hidden_size
    assert w.shape[0] == d_model and w.shape[1] != d_model  # [d_out = hidden, d_in = MLP width]
    req = EditRequest.create("{} is the capital of", "Paris", "Germany")
    edit = compute_edit(lm, req, "crome", hparams=Hparams(mom2_adjustment=False, layer=1, v_steps=3), templates=TEMPLATES)
    before = lm.mlp_out(1).weight.clone()
    with apply_edit(lm, edit):
        torch.testing.assert_close(lm.weight(1), (before.T if lm.arch.transposed else before) + edit.delta_w)
    assert torch.equal(lm.mlp_out(1).weight, before)


def test_gemma3_multimodal_template_names_its_language_model():
    assert ARCHITECTURES["gemma3"].mlp_out_name(4) == "model.language_model.layers.4.mlp.down_proj"


def test_saved_edited_model_reloads_with_same_logits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    req = EditRequest.create("{} is the capital of", "Paris", "Germany")
    edit = compute_edit(tiny, req, "crome", hparams=Hparams(mom2_adjustment=False, layer=1, v_steps=3), templates=TEMPLATES)
    ids = torch.tensor([tiny.tokenizer("Paris is the capital of")["input_ids"]])
    with apply_edit(tiny, edit):
        save_model(tiny, tmp_path / "edited")
        expected = tiny.model(input_ids=ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_defaults_table():
    assert defaults_for("smollm2-135m-instruct", 30).layer == 6
    assert defaults_for("someone/unknown-model", 40).layer == 8
    hp = defaults_for("smollm2-135m-instruct", 30)
    assert (hp.v_lr, hp.v_steps, hp.kl_factor, hp.v_weight_decay, hp.clamp_norm_factor) == (0.5, 20, 0.0625, 0.5, 4.0)
