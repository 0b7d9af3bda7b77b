"""Locating subjects, templates, perplexity, the collapse verdict, mom2 statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from crome import EditRequest
from crome.editing.mom2 import second_moment
from crome.editing.templates import context_templates
from crome.request import locate, target_ids
from crome.scoring.measure import Prefixed, collapsed, perplexity, target_logprob, template_prefix
from crome.scoring.texts import load_texts


def test_subject_last_token_from_offsets(tokenizer):
    r = EditRequest.create("{}'s mother tongue is", "Danielle Darrieux", "English")
    loc = locate(tokenizer, r)
    toks = tokenizer.convert_ids_to_tokens(loc.ids)
    assert toks[loc.subject_first] == "Daniel" and toks[loc.subject_last] == "ux"
    assert loc.subject_is_first
    later = locate(tokenizer, r, "The day was long. {}")
    assert not later.subject_is_first
    assert tokenizer.convert_ids_to_tokens(later.ids)[later.subject_last] == "ux"


def test_subject_merged_with_next_character(tokenizer):
    """A BPE merge across the subject's end: the token holding its last character counts."""
    r = EditRequest.create("{}ese food is", "Japan", "bad")  # "Japanese" is one token
    loc = locate(tokenizer, r)
    text = r.text()
    enc = tokenizer(text, return_offsets_mapping=True)
    a, b = enc["offset_mapping"][loc.subject_last]
    assert a < len("Japan") <= b


def test_target_ids_continue_the_prompt(tokenizer):
    ids = target_ids(tokenizer, "Paris is the capital of", "Germany")
    assert tokenizer.decode(ids) == " Germany"
    assert len(target_ids(tokenizer, "x", "Danielle Darrieux")) > 1


def test_templates_are_seeded_and_recorded(tiny):
    a = context_templates(tiny, seed=3, use_cache=False)
    b = context_templates(tiny, seed=3, use_cache=False)
    c = context_templates(tiny, seed=4, use_cache=False)
    assert a == b and a != c
    assert len(a) == 21 and a[0] == "{}" and all(t.endswith(". {}") for t in a[1:])
    assert all(t.count("{}") == 1 for t in a)
    cached = context_templates(tiny, seed=3)
    assert cached == a and context_templates(tiny, seed=3) == a


def test_perplexity_matches_model_loss(tiny):
    texts = ["The river runs slowly through the valley.", "A short one.", "Bread is made from flour and water."]
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tiny.tokenizer(t)["input_ids"]])
        loss = tiny.model(input_ids=ids, labels=ids).loss
        nll += float(loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert perplexity(tiny, texts, batch_size=2) == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_collapse_verdict():
    assert not collapsed(90.0, 95.0)
    assert collapsed(90.0, 1e5)
    assert collapsed(90.0, float("nan"))
    assert collapsed(90.0, 170.0, threshold=1.5)


def test_prefix_changes_the_context(tiny):
    p = Prefixed(tiny, "The day was long.")
    assert p.target_probability("Paris is the capital of", "Germany") == pytest.approx(
        math.exp(target_logprob(tiny, "The day was long. Paris is the capital of", "Germany")), rel=1e-5)
    assert template_prefix("The day was long. {}") == "The day was long."


def test_load_texts_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"Corpus": "x", "Text": "one"}, {"Corpus": "y", "Text": "two"}]))
    (tmp_path / "b.txt").write_text("one\n\ntwo\n")
    (tmp_path / "c.json").write_text(json.dumps({"T": {"extract": "one"}}))
    assert load_texts(tmp_path / "a.json") == ["one", "two"] == load_texts(tmp_path / "b.txt")
    assert load_texts(tmp_path / "c.json") == ["one"]
    assert len(load_texts()) == 50  # the bundled corpus
    (tmp_path / "bad.json").write_text(json.dumps([{"Corpus": "x"}]))
    from crome import CromeError

    with pytest.raises(CromeError, match="record 0"):
        load_texts(tmp_path / "bad.json")


def test_second_moment_matches_direct_computation(tiny, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The river runs slowly.\nBread is made from flour.\n")
    c = second_moment(tiny, 1, corpus, samples=1000, shrinkage=0.0, progress=False)  # the reference: no shrinkage
    keys = []
    for t in ["The river runs slowly.", "Bread is made from flour."]:
        seen = {}
        h = tiny.mlp_out(1).register_forward_hook(lambda m, a, o: seen.update(k=a[0][0]))
        tiny.model(input_ids=torch.tensor([tiny.tokenizer(t)["input_ids"]]))
        h.remove()
        keys.append(seen["k"])
    k = torch.cat(keys)
    torch.testing.assert_close(c, k.T @ k / k.shape[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(second_moment(tiny, 1, corpus, samples=1000, shrinkage=0.0, progress=False), c)  # cached
