"""Key statistics: Ledoit–Wolf shrinkage, C⁻¹k̄ against a direct solve, the statistics cache keys,
the seeded sample of the model's own text, the cast copy, and the statistics a mom2 edit refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HP, REQ, TEMPLATES, tiny_model

from crome import compute_edit
from crome.errors import CromeError


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
