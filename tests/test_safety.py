"""Safe edits on any model: GGUF files, key statistics, layer choice, the verifying guard."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TEMPLATES, tiny_model

from crome import EditRequest, compute_edit
from crome.editing.hparams import Hparams
from crome.errors import CromeError

HP = Hparams(mom2_adjustment=False, layer=1, v_steps=3)
REQ = EditRequest.create("{} is the capital of", "Paris", "Germany")


# ------------------------------------------------------------------ GGUF files

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's layout of q/k rows (its converter permutes them; loaders undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path) -> None:
    """A tiny Llama written as an F32 GGUF by the ``gguf`` package, with the default model's tokenizer."""
    import gguf

    from crome.models import default_gguf_path

    cfg = model.config
    src = gguf.GGUFReader(default_gguf_path())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model(src.fields["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(src.fields["tokenizer.ggml.pre"].contents())
    w.add_token_list(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    for key in ("bos", "eos", "unknown", "padding"):
        value = src.fields[f"tokenizer.ggml.{key}_token_id"].contents()
        getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unknown": "add_unk_token_id",
                    "padding": "add_pad_token_id"}[key])(value)
    w.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = _permute(t, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        w.add_tensor(gg, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_with_the_source_logits_and_a_changed_file_reconverts(tokenizer, tmp_path, monkeypatch):
    from crome.models import load_model

    monkeypatch.setenv("CROME_CACHE_DIR", str(tmp_path / "cache"))
    src = tiny_model("llama", tokenizer, seed=3)
    src.model.lm_head.weight = torch.nn.Parameter(src.model.lm_head.weight.detach().clone())  # untied
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(src.model, path)
    ids = torch.tensor([tokenizer("The capital of France is Paris")["input_ids"]])
    lm = load_model(str(path), device="cpu", progress=False)
    assert lm.name == "tiny" and lm.arch.mlp_out == "model.layers.{}.mlp.down_proj"
    torch.testing.assert_close(lm.model(input_ids=ids).logits, src.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    folders = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert len(folders) == 1
    assert load_model(str(path), device="cpu", progress=False).identity == lm.identity  # cached, same weights
    import shutil

    copy = shutil.copy(path, tmp_path / "other-name.gguf")        # the same bytes under another name: one entry
    same = load_model(str(copy), device="cpu", progress=False)
    assert same.name == "other-name" and same.identity == lm.identity
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == folders

    with torch.no_grad():
        src.model.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    write_llama_gguf(src.model, path)  # same name, new content
    changed = load_model(str(path), device="cpu", progress=False)
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2
    assert changed.identity != lm.identity
    torch.testing.assert_close(changed.model(input_ids=ids).logits, src.model(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-4)

    # end to end through the CLI: --model x.gguf, the auto layer (a random model knows no facts:
    # the depth rule, recorded), key statistics sampled from the model, the verifying guard
    from crome.cli import main

    res = CliRunner().invoke(main, ["edit", "--model", str(path), "--prompt", "{} is the capital of", "--subject",
                                    "Paris", "--target", "Germany", "--layer", "auto", "--mom2-samples", "300",
                                    "--guard-threshold", "1e9", "--json", "--no-ppl"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{"):])
    assert data["model"] == "tiny" and data["layer"] == 1 and data["layer_choice"]["rule"] == "depth"
    assert data["key_stats"]["n_keys"] == 300 and data["guard_action"] == "applied" and data["applied"]


def test_missing_gguf_file_is_a_one_line_error(tmp_path):
    from crome.models import load_model

    with pytest.raises(CromeError, match="no such GGUF file"):
        load_model(str(tmp_path / "nothing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CromeError, match="is not a GGUF file"):      # the header check, before any parser
        load_model(str(bad), progress=False)
    import struct

    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + b"\0" * 64)   # a well-formed header, no model
    with pytest.raises(CromeError, match="cannot convert GGUF file"):
        load_model(str(bad), progress=False)


# ------------------------------------------------------------------ key statistics

def test_ledoit_wolf_matches_scikit_learn():
    from sklearn.covariance import ledoit_wolf

    from crome.editing.mom2 import ledoit_wolf as lw
    from crome.editing.mom2 import shrink

    rng = np.random.default_rng(0)
    for n, d in ((40, 16), (10, 32)):  # n > d, and n < d (a singular second moment)
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 0.5
        expected, lam_sk = ledoit_wolf(x, assume_centered=True)
        t = torch.tensor(x, dtype=torch.float64)
        lam = lw(t.T @ t, float((t.pow(2).sum(1) ** 2).sum()), n)
        assert lam == pytest.approx(lam_sk, rel=1e-9)
        np.testing.assert_allclose(shrink(t.T @ t / n, lam).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_key_stats_direction_equals_a_direct_solve(tiny, tmp_path):
    """u = C⁻¹k̄/‖C⁻¹k̄‖ with C the (shrunk) mean of k kᵀ over the corpus' keys, recomputed here."""
    from crome.editing.mom2 import key_stats
    from crome.hooks import run_until

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["The cat sat on the mat and looked at the garden."] * 2 +
                                ["Rain fell over the old town all night long."] * 2))
    stats = key_stats(tiny, 1, corpus, samples=1000, progress=False)
    keys = []
    for line in corpus.read_text().splitlines():
        ids = torch.tensor([tiny.tokenizer(line)["input_ids"]])
        keys.append(run_until(tiny.model, tiny.mlp_out(1), input_ids=ids).input[0].double())
    k = torch.cat(keys)
    assert stats.n_keys == k.shape[0] < k.shape[1]  # fewer keys than dimensions: S alone is singular
    s = k.T @ k / k.shape[0]
    assert torch.linalg.matrix_rank(s) < s.shape[0]
    assert 0 < stats.shrinkage <= 1
    c = (1 - stats.shrinkage) * s + stats.shrinkage * torch.trace(s) / s.shape[0] * torch.eye(s.shape[0], dtype=s.dtype)
    torch.testing.assert_close(stats.mom2.double(), c, rtol=1e-5, atol=1e-6)

    edit = compute_edit(tiny, REQ, "crome", hparams=HP.with_(mom2_adjustment=True), templates=TEMPLATES, mom2=stats)
    direct = torch.linalg.solve(c, edit.vectors.k_mean.double())
    torch.testing.assert_close(edit.vectors.u.double(), direct / direct.norm(), rtol=1e-4, atol=1e-5)
    assert edit.key_stats == stats.record() and edit.key_stats["n_keys"] == stats.n_keys
    assert torch.isfinite(edit.delta_w).all()


def test_key_stats_cache_is_keyed_by_model_layer_source_and_count(tokenizer, tmp_path, monkeypatch):
    from crome.editing.mom2 import key_stats

    monkeypatch.setenv("CROME_CACHE_DIR", str(tmp_path / "cache"))
    lm = tiny_model("llama", tokenizer, seed=0)
    corpus = tmp_path / "a.txt"
    corpus.write_text("One line of text about the weather.\nAnother line about the sea and ships.\n")
    a = key_stats(lm, 1, corpus, samples=500, progress=False)
    files = lambda: sorted(p.name for p in (tmp_path / "cache" / "mom2").glob("*.pt"))  # noqa: E731
    assert len(files()) == 1
    assert key_stats(lm, 1, corpus, samples=500, progress=False).hash == a.hash and len(files()) == 1  # a hit
    assert key_stats(lm, 0, corpus, samples=500, progress=False).layer == 0 and len(files()) == 2
    assert key_stats(lm, 1, corpus, samples=5, progress=False).n_keys == 5 and len(files()) == 3
    corpus.write_text("A changed corpus gives other statistics.\n")
    changed = key_stats(lm, 1, corpus, samples=500, progress=False)
    assert changed.hash != a.hash and changed.source_hash != a.source_hash and len(files()) == 4
    other = tiny_model("llama", tokenizer, seed=1)  # same name, other weights
    assert key_stats(other, 1, corpus, samples=500, progress=False).hash != changed.hash and len(files()) == 5


def test_default_key_stats_are_sampled_from_the_model_seeded_and_recorded(tokenizer, tmp_path, monkeypatch):
    from crome.editing.mom2 import MODEL_SOURCE, key_stats

    monkeypatch.setenv("CROME_CACHE_DIR", str(tmp_path / "cache"))
    lm = tiny_model("gpt2", tokenizer)
    a = key_stats(lm, 1, None, samples=300, progress=False)
    assert a.source.startswith(MODEL_SOURCE) and a.n_keys == 300
    for p in (tmp_path / "cache" / "mom2").iterdir():
        p.unlink()  # recompute everything, sampling included: the seed makes it identical
    assert key_stats(lm, 1, None, samples=300, progress=False).hash == a.hash
    assert key_stats(lm, 1, None, samples=300, seed=1, progress=False).hash != a.hash
    edit = compute_edit(lm, REQ, "crome", hparams=HP.with_(mom2_adjustment=True, mom2_samples=300), templates=TEMPLATES)
    assert edit.key_stats["source"] == a.source and edit.key_stats["hash"] == a.hash


def test_sampled_rows_do_not_depend_on_the_batch_and_the_model_is_untouched(tokenizer):
    from crome.editing.mom2 import sample_token_ids

    lm = tiny_model("llama", tokenizer)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    one_batch = sample_token_ids(lm, 5 * 16, length=16, batch_size=8, dtype=torch.float32)
    small_batches = sample_token_ids(lm, 5 * 16, length=16, batch_size=2, dtype=torch.float32)
    assert len(one_batch) == 5 and all(len(r) == 16 for r in one_batch)
    assert one_batch == small_batches  # each row has its own seeded generator
    assert sample_token_ids(lm, 5 * 16, length=16, seed=1, dtype=torch.float32) != one_batch
    bf16 = sample_token_ids(lm, 5 * 16, length=16, dtype=torch.bfloat16)  # on a cast copy
    assert len(bf16) == 5 and next(lm.model.parameters()).dtype == torch.float32
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_cast_copy_keeps_tied_weights_tied(tokenizer):
    from crome.editing.mom2 import _cast_copy

    lm = tiny_model("gpt2", tokenizer)  # GPT-2 ties the output layer to the token embeddings
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    copy = _cast_copy(lm.model, torch.bfloat16)
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    assert copy.get_output_embeddings().weight.dtype == torch.bfloat16
    assert lm.model.get_output_embeddings().weight.dtype == torch.float32
    assert _cast_copy(lm.model, torch.float32) is lm.model  # nothing to cast: no copy


def test_mom2_off_with_statistics_given_is_an_error(tiny):
    with pytest.raises(CromeError, match="mom2 adjustment is off"):
        compute_edit(tiny, REQ, "crome", hparams=HP, templates=TEMPLATES, mom2=torch.eye(64))


def test_statistics_for_another_layer_are_refused(tiny, tmp_path):
    from crome.editing.mom2 import key_stats

    corpus = tmp_path / "c.txt"
    corpus.write_text("Some text for the statistics.\n")
    stats = key_stats(tiny, 0, corpus, samples=50, progress=False)
    with pytest.raises(CromeError, match="layer 0"):
        compute_edit(tiny, REQ, "crome", hparams=HP.with_(mom2_adjustment=True), templates=TEMPLATES, mom2=stats)


# ------------------------------------------------------------------ layer choice

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
    from crome.analysis import trace as tr

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
    from crome.analysis import trace as tr

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


# ------------------------------------------------------------------ the verifying guard

TEXTS = ["The weather was mild and the market was busy all morning.", "She wrote a letter to her brother.",
         "Trains left the station every ten minutes."]


@pytest.mark.parametrize("factor", [0.999, 1.001])
def test_guard_verify_rolls_back_bit_exactly_or_keeps_the_edit(tiny, factor):
    """The threshold is set just under (rollback) or just over (kept) the edit's measured probe ratio."""
    from crome.editing.guard import GuardRefused, Verifier, guarded_apply

    w = tiny.mlp_out(1).weight.detach().clone()
    verifier = Verifier(tiny, 1, TEXTS, threshold=1e9, efficacy=False)  # the probe alone (tiny edits don't take)
    edit, handle, decision = guarded_apply(tiny, REQ, "rome", "verify", verifier=verifier, hparams=HP, templates=TEMPLATES)
    handle.restore()
    ratio = decision.guard_ppl_ratio
    assert ratio != 1.0
    verifier.threshold = ratio * factor
    if factor < 1:
        with pytest.raises(GuardRefused, match="rolled back") as refused:
            guarded_apply(tiny, REQ, "rome", "verify", verifier=verifier, hparams=HP, templates=TEMPLATES)
        assert torch.equal(tiny.mlp_out(1).weight, w)
        assert refused.value.decision.guard_action == "rolled back"
        assert refused.value.decision.guard_ppl_ratio == pytest.approx(ratio)
    else:
        edit, handle, decision = guarded_apply(tiny, REQ, "rome", "verify", verifier=verifier, hparams=HP,
                                               templates=TEMPLATES)
        assert decision.guard_action == "applied" and decision.guard_ppl_ratio == pytest.approx(ratio)
        delta = edit.delta_w.T if tiny.arch.transposed else edit.delta_w
        torch.testing.assert_close(tiny.mlp_out(1).weight, w + delta)
        handle.restore()
        assert torch.equal(tiny.mlp_out(1).weight, w)


def test_guard_fallback_with_a_rule_that_rejects_both_refuses_untouched(tiny):
    from crome.editing.guard import GuardRefused, GuardRule, Verifier, guarded_apply

    w = tiny.mlp_out(1).weight.detach().clone()
    always = GuardRule("update_ratio", -1.0, True)
    verifier = Verifier(tiny, 1, TEXTS, threshold=1e9)
    with pytest.raises(GuardRefused, match="guard refused the rome edit: rome at layer 1: .*; crome at layer 1: ") as refused:
        guarded_apply(tiny, REQ, "rome", "fallback", rule=always, verifier=verifier, hparams=HP, templates=TEMPLATES)
    assert refused.value.decision.guard_action == "refused" and refused.value.edit.method == "crome"
    assert torch.equal(tiny.mlp_out(1).weight, w)


def test_guard_fallback_applies_crome_when_rome_fails_the_probe(tiny, monkeypatch):
    from crome.editing.guard import GuardRefused, Verifier, guarded_apply

    w = tiny.mlp_out(1).weight.detach().clone()
    verifier = Verifier(tiny, 1, TEXTS, threshold=2.0, efficacy=False)
    seen = []
    monkeypatch.setattr(Verifier, "ratio", lambda self, layer=None: seen.append(1) or (5.0 if len(seen) == 1 else 1.01))
    edit, handle, decision = guarded_apply(tiny, REQ, "rome", "fallback", verifier=verifier, hparams=HP,
                                           templates=TEMPLATES)
    assert edit.method == "crome" and decision.guard_action == "fallback: crome instead of rome"
    assert decision.guard_ppl_ratio == 1.01 and len(seen) == 2
    handle.restore()
    assert torch.equal(tiny.mlp_out(1).weight, w)
    monkeypatch.setattr(Verifier, "ratio", lambda self, layer=None: 3.0)
    with pytest.raises(GuardRefused, match="crome at layer 1: damaged the model: probe perplexity"):
        guarded_apply(tiny, REQ, "rome", "fallback", verifier=verifier, hparams=HP, templates=TEMPLATES)
    assert torch.equal(tiny.mlp_out(1).weight, w)


def test_efficacy_rule_needs_the_new_target_to_rise_above_the_old():
    from crome.editing.guard import Efficacy

    assert Efficacy("France", None, 0.01, 0.6, 0.2).took
    assert not Efficacy("France", None, 0.01, 0.3, 0.5).took          # rose, still below the old target
    assert not Efficacy("France", "A day.", 0.011, 0.00007, 0.5).took  # fell (the held-out model's layer 3)
    assert Efficacy(None, None, 0.5, 0.9).took and not Efficacy(None, None, 0.5, 0.4).took  # already the answer
    assert "did not take" in Efficacy("France", "A day.", 0.011, 0.00007, 0.5).reason("Germany")


def test_guard_verify_rolls_back_an_edit_that_did_not_take(tokenizer):
    """On a random tiny model an edit does not take (P(new target) falls): verify rolls it back bit for
    bit and says "did not take", even with a probe threshold that never fires."""
    from crome.editing.guard import GuardRefused, Verifier, guarded_apply

    lm = tiny_model("llama", tokenizer)
    req = EditRequest.create("{} is the capital of", "Paris", "Germany", "France")
    w = lm.mlp_out(1).weight.detach().clone()
    verifier = Verifier(lm, 1, TEXTS, threshold=1e9)
    with pytest.raises(GuardRefused, match=r"crome at layer 1: did not take: P\(Germany\)") as refused:
        guarded_apply(lm, req, "crome", "verify", verifier=verifier, hparams=HP, templates=TEMPLATES)
    d = refused.value.decision
    assert d.guard_action == "rolled back" and d.guard_reason == "did not take" and d.guard_took is False
    eff = d.guard_efficacy
    assert eff["target_old"] == "France" and eff["prefix"] == "The day was long."   # C-ROME: the test prefix
    assert not (eff["p_new_after"] > eff["p_new_before"] and eff["p_new_after"] > eff["p_old_after"])
    assert torch.equal(lm.mlp_out(1).weight, w)
    # without a known old target, the model's own answer is the one to beat
    with pytest.raises(GuardRefused, match="did not take") as refused:
        guarded_apply(lm, REQ, "rome", "verify", verifier=verifier, hparams=HP, templates=TEMPLATES)
    assert refused.value.decision.guard_efficacy["prefix"] is None                # ROME: the bare prompt
    assert refused.value.decision.guard_efficacy["target_old"]
    assert torch.equal(lm.mlp_out(1).weight, w)


def test_guard_fallback_moves_to_a_neighbouring_layer(tokenizer, monkeypatch):
    """When ROME and C-ROME at the layer both fail, fallback tries C-ROME one layer up, and keeps it."""
    from crome.editing.guard import GuardRefused, Verifier, guarded_apply

    lm = tiny_model("llama", tokenizer)
    w1, w2 = lm.mlp_out(1).weight.detach().clone(), lm.mlp_out(2).weight.detach().clone()
    verifier = Verifier(lm, 1, TEXTS, threshold=2.0, efficacy=False)
    seen = []
    monkeypatch.setattr(Verifier, "ratio", lambda self, layer=None: seen.append(layer) or (5.0 if layer == 1 else 1.01))
    edit, handle, decision = guarded_apply(lm, REQ, "rome", "fallback", verifier=verifier, hparams=HP,
                                           templates=TEMPLATES)
    assert seen == [1, 1, 2] and edit.layer == 2 and edit.method == "crome"
    assert decision.guard_action == "fallback: crome at layer 2 instead of rome"
    assert edit.layer_choice["rule"] == "fallback" and edit.layer_choice["detail"] == {"from_layer": 1}
    assert torch.equal(lm.mlp_out(1).weight, w1) and not torch.equal(lm.mlp_out(2).weight, w2)
    handle.restore()
    assert torch.equal(lm.mlp_out(2).weight, w2)
    # in a sequential run the layer stays put (earlier edits are measured from that layer up)
    seen.clear()
    with pytest.raises(GuardRefused, match="damaged the model"):
        guarded_apply(lm, REQ, "rome", "fallback", verifier=verifier, hparams=HP, templates=TEMPLATES, neighbours=False)
    assert seen == [1, 1] and torch.equal(lm.mlp_out(1).weight, w1)


def test_verifier_measures_an_edit_below_its_layer_against_the_unedited_model(tokenizer):
    """A fallback one layer down is measured by a monitor made for that layer before the edit is applied:
    its ratio is the plain perplexity ratio of the edited model to the unedited one."""
    from crome.editing.guard import Verifier, guarded_apply
    from crome.evaluation.measure import perplexity

    lm = tiny_model("llama", tokenizer)
    unedited = perplexity(lm, TEXTS)
    verifier = Verifier(lm, 2, TEXTS, threshold=1e9, efficacy=False)
    edit, handle, decision = guarded_apply(lm, REQ, "rome", "verify", verifier=verifier, hparams=HP,
                                           templates=TEMPLATES)
    assert edit.layer == 1
    assert decision.guard_ppl_ratio == pytest.approx(perplexity(lm, TEXTS) / unedited, rel=1e-4)
    assert decision.guard_ppl_ratio != pytest.approx(1.0, abs=1e-6)
    handle.restore()


def test_cli_edit_says_did_not_take_or_damaged(tokenizer, tmp_path):
    """`crome edit` exits 3 either way, with messages that say which check failed."""
    from conftest import save_tiny

    from crome.cli import main

    folder = save_tiny(tmp_path / "tiny", tokenizer)
    base = ["edit", "--model", str(folder), "--prompt", "{} is the capital of", "--subject", "Paris", "--target",
            "Germany", "--layer", "1", "--mom2-samples", "300", "--no-ppl", "--method", "rome"]  # old target: its own answer
    res = CliRunner().invoke(main, base + ["--guard-threshold", "1e9"])
    assert res.exit_code == 3 and "did not take" in res.output and "damaged" not in res.output
    res = CliRunner().invoke(main, base + ["--guard-threshold", "1e-6", "--no-guard-efficacy"])
    assert res.exit_code == 3 and "damaged the model" in res.output and "did not take" not in res.output


def test_diagnostics_report_the_outlier_ratio_and_value_shift(tiny):
    from crome.editing.compute_key import compute_keys
    from crome.editing.update import current

    edit = compute_edit(tiny, REQ, "crome", hparams=HP, templates=TEMPLATES)
    keys = compute_keys(tiny, REQ, 1, TEMPLATES)
    prefixed = torch.stack([k for k, t in zip(keys.keys, TEMPLATES) if t != "{}"])
    d = edit.diagnostics
    assert d.key_outlier_ratio == pytest.approx(float(keys.k_bare.norm() / prefixed.norm(dim=1).median()), rel=1e-5)
    _, v_cur = current(keys, "crome")
    shift = float((edit.vectors.v_star - v_cur).norm() / v_cur.norm())
    assert d.value_shift == pytest.approx(shift, rel=1e-5) and d.value_shift > 0
    huge = dataclasses.replace(d, value_shift=1e3, key_outlier_ratio=1.0)
    assert "‖v*−v_cur‖/‖v_cur‖ = 1e+03" in huge.unlikely_to_take()
    sink = dataclasses.replace(d, value_shift=0.1, key_outlier_ratio=7.0, first_token_subject=True)
    assert "first-position outlier" in sink.unlikely_to_take()
    assert dataclasses.replace(d, value_shift=0.1, key_outlier_ratio=1.2).unlikely_to_take() is None


def test_guard_refuse_needs_a_rule_for_the_model(tiny, tmp_path):
    from crome.editing.guard import DEFAULT_RULE, GuardRule, guarded_apply, rule_for

    with pytest.raises(CromeError, match="needs a rule calibrated"):
        guarded_apply(tiny, REQ, "rome", "refuse", hparams=HP, templates=TEMPLATES)
    assert rule_for(tiny.name) is None and rule_for("smollm2-135m-instruct") == DEFAULT_RULE
    path = tmp_path / "rule.json"
    GuardRule("denominator", 0.5, False, model="other-model", calibration="x").save(path)
    with pytest.raises(CromeError, match="calibrated on other-model"):
        rule_for(tiny.name, path)
    GuardRule("denominator", 0.5, False, model=tiny.name).save(path)
    assert rule_for(tiny.name, path).threshold == 0.5
    path.write_text("{}")
    with pytest.raises(CromeError, match="not a guard rule file"):
        rule_for(tiny.name, path)


def test_eval_with_guard_verify_records_ratio_and_decision(tiny, tmp_path):
    from crome.editing.guard import Verifier
    from crome.evaluation.context import RunContext, RunSettings
    from crome.evaluation.datasets import load_cases
    from crome.evaluation.evaluate import run

    data = tmp_path / "cf.json"
    data.write_text(json.dumps([dict(case_id=i, prompt=f"{s} is the capital of", subject=s, target_new="Germany",
                                     ground_truth="France", rephrase_prompt=f"The capital {s} is in",
                                     locality_prompt="Rome is the capital of", locality_ground_truth="Italy")
                                for i, s in enumerate(["Paris", "Lyon"])]))
    cases = load_cases(data).cases
    settings = RunSettings(method="rome", model=tiny.name, layer=1, seed=0, gen_tokens=0, guard="verify",
                        guard_threshold=1e-6)
    w = tiny.mlp_out(1).weight.detach().clone()
    records = run(tiny, cases, RunContext(settings, HP, TEMPLATES, TEXTS, verifier=Verifier(tiny, 1, TEXTS, threshold=1e-6)), tmp_path / "out.jsonl")  # any edit fails: every case rolled back
    assert len(records) == 2 and torch.equal(tiny.mlp_out(1).weight, w)
    for r in records:
        assert r["guard_action"] == "rolled back" and r["guard_ppl_ratio"] > 1e-6 and not r["applied"]
        assert "rolled back" in r["error"] and r["denominator"] is not None


def test_eval_records_an_edit_that_did_not_take(tokenizer, tmp_path):
    """`crome eval --guard verify` records the efficacy check with every case: the action, the reason
    and the probabilities it compared; a case that did not take is rolled back, not measured."""
    from crome.editing.guard import Verifier
    from crome.evaluation.context import RunContext, RunSettings
    from crome.evaluation.datasets import load_cases
    from crome.evaluation.evaluate import run

    lm = tiny_model("llama", tokenizer)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps([dict(case_id=0, prompt="Paris is the capital of", subject="Paris", target_new="Germany",
                                     ground_truth="France", rephrase_prompt="The capital Paris is in",
                                     locality_prompt="Rome is the capital of", locality_ground_truth="Italy")]))
    settings = RunSettings(method="crome", model=lm.name, layer=1, seed=0, gen_tokens=0, guard="verify",
                        guard_threshold=1e9)
    w = lm.mlp_out(1).weight.detach().clone()
    [r] = run(lm, load_cases(data).cases, RunContext(settings, HP, TEMPLATES, TEXTS, verifier=Verifier(lm, 1, TEXTS, threshold=1e9)), tmp_path / "out.jsonl")
    assert r["guard_action"] == "rolled back" and r["guard_reason"] == "did not take" and r["guard_took"] is False
    assert r["guard_efficacy"]["target_old"] == "France" and not r["applied"] and "did not take" in r["error"]
    assert r["key_outlier_ratio"] > 0 and r["value_shift"] > 0 and torch.equal(lm.mlp_out(1).weight, w)


# ------------------------------------------------------------------ small things

def test_cli_out_in_a_missing_folder_is_created_before_work(tmp_path, monkeypatch):
    from crome import cli

    loaded = []
    monkeypatch.setattr(cli, "_load", lambda model, options: loaded.append(model) or (_ for _ in ()).throw(CromeError("stop")))
    out = tmp_path / "missing" / "dir" / "x.json"
    res = CliRunner().invoke(cli.main, ["edit", "--prompt", "{} is in", "--subject", "Paris", "--target", "France",
                                        "--out", str(out)])
    assert out.parent.is_dir() and loaded  # the folder exists before the model is even loaded
    (tmp_path / "afolder").mkdir()
    res = CliRunner().invoke(cli.main, ["edit", "--prompt", "{} is in", "--subject", "Paris", "--target", "France",
                                        "--out", str(tmp_path / "afolder")])
    assert res.exit_code == 2 and "output path is a folder" in res.output and len(loaded) == 1


def test_report_names_the_folder_relative_to_where_it_ran(tmp_path, monkeypatch):
    from crome.analysis.html_report import build_report

    run_dir = tmp_path / "work" / "analysis"
    run_dir.mkdir(parents=True)
    (run_dir / "trace.json").write_text(json.dumps({"n_facts": 1}))
    (run_dir / "trace.md").write_text("| a |\n|---|\n| 1 |\n")
    monkeypatch.chdir(tmp_path / "work")
    page = build_report(run_dir, tmp_path / "r.html").read_text()  # an absolute path given
    assert str(tmp_path) not in page and "analysis" in page
