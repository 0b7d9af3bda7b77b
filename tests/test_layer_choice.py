"""Layer choice: --layer auto traces, caches and records its choice, peaks where the trace peaks,
avoids a layer where edits do not take; compute_edit records the choice."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HP, REQ, TEMPLATES, tiny_model

from crome import compute_edit
from crome.errors import CromeError


def test_layer_auto_traces_caches_and_records(tokenizer, tmp_path, monkeypatch):
    from crome.editing.layer_choice import auto_layer, choose_layer, load_facts

    monkeypatch.setenv("CROME_CACHE_DIR", str(tmp_path / "cache"))
    assert len(load_facts()) >= 40
    lm = tiny_model("llama", tokenizer)
    choice = choose_layer(lm, "auto")
    # a random tiny model knows no facts: the relative-depth rule, and the record says why
    assert choice.rule == "depth" and "knows 0" in choice.detail["reason"]
    import crome.editing.layer_choice as lc

    monkeypatch.setattr(lc, "MIN_FACTS", 0)
    forced = auto_layer(lm, use_cache=False)
    assert forced.rule == "depth"  # still no known fact to trace
    assert choose_layer(lm, 2).record() == {"layer": 2, "rule": "user", "detail": {}}
    assert choose_layer(lm, "depth").layer == 1
    with pytest.raises(CromeError, match="'auto'"):
        choose_layer(lm, "middle")
    with pytest.raises(CromeError, match="out of range"):
        choose_layer(lm, 9)


def test_auto_layer_peaks_where_the_trace_peaks(tokenizer, tmp_path, monkeypatch):
    """With facts the model 'knows' (scores patched), the chosen layer is the argmax of the traced
    MLP effect over layers >= 1, and the choice is cached."""
    import crome.editing.layer_choice as lc
    from crome.editing import locate as tr

    monkeypatch.setenv("CROME_CACHE_DIR", str(tmp_path / "cache"))
    lm = tiny_model("llama", tokenizer)

    monkeypatch.setattr(lc, "known_facts", lambda lm, facts: facts)
    monkeypatch.setattr(lc, "editability", lambda lm, layer, *a: dict(layer=layer, editable=True, took=4, trials=[],
                                                                         max_update_ratio=0.1))
    calls = []

    def fake_trace(lm, prompt, subject, answer, **kw):
        calls.append(kw)
        effects = {"mlp": [[0.0, 0.0], [0.1, 0.3], [0.2, 0.1]]}
        return tr.Trace(prompt, subject, answer, 1.0, 0.0, ["x", "y"], effects, subject_last=1)

    monkeypatch.setattr(tr, "trace_fact", fake_trace)
    choice = lc.auto_layer(lm, n_facts=4)
    assert choice.rule == "auto" and choice.layer == 1 and choice.detail["n_facts"] == 4
    assert all(kw["first_layer"] == 1 and kw["last_subject_only"] and kw["kinds"] == ("mlp",) for kw in calls)
    assert choice.detail["effects"] == pytest.approx([0.0, 0.3, 0.1])
    n = len(calls)
    assert lc.auto_layer(lm, n_facts=4).layer == 1 and len(calls) == n  # cached


def test_auto_layer_avoids_a_layer_where_edits_do_not_take(tokenizer, tmp_path, monkeypatch):
    """The trace peaks at layer 1, but layer 1 is made non-editable (a dead MLP: every key is zero, so
    no rank-one update can be computed there): the trial edits find it out and auto picks layer 2,
    recording why, with each candidate's trial edits and the cost."""
    import crome.editing.layer_choice as lc
    from crome.editing import locate as tr

    monkeypatch.setenv("CROME_CACHE_DIR", str(tmp_path / "cache"))
    lm = tiny_model("llama", tokenizer)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.up_proj.weight.zero_()
    monkeypatch.setattr(lc, "known_facts", lambda lm, facts: facts)

    def fake_trace(lm, prompt, subject, answer, **kw):
        effects = {"mlp": [[0.0, 0.0], [0.1, 0.5], [0.2, 0.3]]}
        return tr.Trace(prompt, subject, answer, 1.0, 0.0, ["x", "y"], effects, subject_last=1)

    monkeypatch.setattr(tr, "trace_fact", fake_trace)
    choice = lc.auto_layer(lm, n_facts=6, samples=300)
    assert choice.rule == "auto" and choice.layer == 2
    first, second = choice.detail["candidates"]
    assert first["layer"] == 1 and not first["editable"] and first["took"] == 0 and "LinAlgError" in first["error"]
    assert second["max_update_ratio"] < math.inf
    assert second["layer"] == 2 and [c["effect"] for c in (first, second)] == [0.5, 0.3]
    trials = second["trials"]
    assert len(trials) == lc.TRIAL_EDITS and sum(t["first_token_subject"] for t in trials) == 2
    assert all({"took", "update_ratio", "value_shift", "key_outlier_ratio"} <= set(t) for t in trials)
    assert choice.detail["seconds"] >= choice.detail["trace_seconds"] >= 0


def test_compute_edit_records_the_layer_choice(tiny):
    edit = compute_edit(tiny, REQ, "crome", hparams=HP, templates=TEMPLATES)
    assert edit.layer_choice == {"layer": 1, "rule": "user", "detail": {}}
    edit = compute_edit(tiny, REQ, "crome", hparams=HP, layer="depth", templates=TEMPLATES)
    assert edit.layer_choice["rule"] == "depth" and edit.layer == 1
