"""The fast v* runner gives the reference runner's result."""

from __future__ import annotations

import pytest
import torch
from conftest import TEMPLATES, assert_same, tiny_model

from crome import EditRequest, compute_edit
from crome.editing.compute_value import ReferenceRunner
from crome.editing.edit import apply_edit
from crome.editing.fast import FastRunner
from crome.editing.hparams import Hparams
from crome.scoring.measure import perplexity
from crome.scoring.monitor import PerplexityMonitor

REQUESTS = [
    EditRequest.create("{} is the capital of", "Paris", "Germany"),                      # first-token subject
    EditRequest.create("The mother tongue of {} is", "Danielle Darrieux", "English French"),  # multi-token target
]


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gptj", "gpt_neox", "qwen2", "mistral", "gemma3_text"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("method", ["rome", "crome"])
def test_fast_matches_reference_on_tiny_models(tokenizer, model_type, layer, method):
    lm = tiny_model(model_type, tokenizer)
    hp = Hparams(mom2_adjustment=False, layer=layer, v_steps=6)
    for req in REQUESTS:
        ref = compute_edit(lm, req, method, hparams=hp, templates=TEMPLATES, runner_cls=ReferenceRunner)
        fast = compute_edit(lm, req, method, hparams=hp, templates=TEMPLATES, runner_cls=FastRunner)
        assert_same(ref, fast)


def test_fast_is_the_default(tiny):
    edit = compute_edit(tiny, REQUESTS[0], "rome", hparams=Hparams(mom2_adjustment=False, layer=1, v_steps=6), templates=TEMPLATES)
    fast = compute_edit(tiny, REQUESTS[0], "rome", hparams=Hparams(mom2_adjustment=False, layer=1, v_steps=6), templates=TEMPLATES,
                        runner_cls=FastRunner)
    assert torch.equal(edit.delta_w, fast.delta_w)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "gemma3_text"])
def test_perplexity_monitor_matches_reference(tokenizer, model_type):
    lm = tiny_model(model_type, tokenizer)
    texts = ["The cat sat on the mat and looked at the door.", "Rain fell.",
             "A longer passage about rivers, mountains and the people who live between them.", "Yes."]
    monitor = PerplexityMonitor(lm, texts, layer=1, batch_size=3)
    assert monitor.baseline == pytest.approx(perplexity(lm, texts, batch_size=3), rel=1e-5)
    edit = compute_edit(lm, REQUESTS[0], "rome", hparams=Hparams(mom2_adjustment=False, layer=1, v_steps=4), templates=TEMPLATES)
    with apply_edit(lm, edit):
        after = perplexity(lm, texts)
        assert after != pytest.approx(monitor.baseline, rel=1e-3)  # the edit changed something
        assert monitor() == pytest.approx(after, rel=1e-5)
    assert monitor() == pytest.approx(monitor.baseline, rel=1e-6)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_perplexity_in_output_row_chunks_matches_the_models_own_loss(tokenizer, model_type, monkeypatch):
    """The output layer run a few rows at a time, at real positions only (padded batches), gives the
    perplexity of the model's own loss on each text alone; Gemma's logit soft-capping included."""
    import math

    from crome.scoring import measure

    lm = tiny_model(model_type, tokenizer)
    if model_type == "gemma3_text":
        lm.model.config.final_logit_softcapping = 3.0   # the loss below must see the cap too
    texts = ["The cat sat on the mat and looked at the door.", "Rain fell.", "A longer passage about rivers."]
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            nll += float(lm.model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    monkeypatch.setattr(measure, "OUTPUT_ROWS", 3)
    assert perplexity(lm, texts, batch_size=3) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert PerplexityMonitor(lm, texts, layer=1, batch_size=3).baseline == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_monitor_rejects_bad_layer(tiny):
    from crome.errors import CromeError

    with pytest.raises(CromeError, match="layer"):
        PerplexityMonitor(tiny, ["some text"], layer=99)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["rome", "crome"])
def test_fast_matches_reference_on_default_model(default_lm, method):
    req = REQUESTS[0]
    templates = TEMPLATES + ["You can see it. {}"]
    ref = compute_edit(default_lm, req, method, templates=templates, runner_cls=ReferenceRunner)
    fast = compute_edit(default_lm, req, method, templates=templates, runner_cls=FastRunner)
    assert_same(ref, fast)
