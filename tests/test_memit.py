"""MEMIT and C-MEMIT: the batch solve against a direct solve, the one-request relation to ROME."""

from __future__ import annotations

import pytest
import torch
from conftest import TEMPLATES, save_tiny, stats_for, tiny_model

from crome import CromeError, EditRequest
from crome.editing.api import apply_memit
from crome.editing.compute_key import key_and_output
from crome.editing.compute_value import ReferenceRunner, compute_v_stars
from crome.editing.fast import FastRunner
from crome.editing.hparams import Hparams
from crome.editing.update import rank_one_update
from crome.editing.weights import add_factors, factor_update
from crome.request import SLOT

REQUESTS = [
    EditRequest.create("{} is the capital of", "Paris", "Germany"),                      # first-token subject
    EditRequest.create("The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest.create("{}, developed by", "Porsche 911", "Honda Motor Company"),        # multi-token target
]


def direct(keys, resid, c, weight):
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ by an explicit inverse, in float64."""
    k, r = keys.double().T, resid.double().T
    return r @ k.T @ torch.linalg.inv(weight * c.double() + k @ k.T)


@pytest.mark.parametrize("model_type, method", [("llama", "memit"), ("llama", "cmemit"), ("gpt2", "cmemit"),
                                                ("gptj", "memit")])
def test_each_layer_solves_its_normal_equations(tokenizer, model_type, method):
    """Replayed layer by layer, each edited layer's ΔW satisfies ΔW (λC + KKᵀ) = R Kᵀ with K and R
    read from the model as edited below that layer, and equals a direct solve."""
    lm = tiny_model(model_type, tokenizer)
    hp = Hparams(layer=1, v_steps=4, memit_layers=(0, 1, 2), mom2_update_weight=3.0)
    stats = stats_for(lm, hp.memit_layers)
    original = {x: lm.mlp_out(x).weight.detach().clone() for x in hp.memit_layers}
    edit, handle = apply_memit(lm, REQUESTS, method, hparams=hp, stats=stats, templates=TEMPLATES)
    edited = {x: lm.mlp_out(x).weight.detach().clone() for x in hp.memit_layers}
    handle.restore()
    assert all(torch.equal(lm.mlp_out(x).weight, original[x]) for x in hp.memit_layers)

    rows, z, m = [SLOT, *TEMPLATES], edit.targets, len(hp.memit_layers)
    for i, layer in enumerate(hp.memit_layers):
        ks, hs = [], []
        for r in REQUESTS:
            k, h = key_and_output(lm, r, layer, 2, rows)
            ks.append(k[1:].mean(0))
            hs.append(h[1:].mean(0) if method == "cmemit" else h[0])
        keys, resid = torch.stack(ks), (z - torch.stack(hs)) / (m - i)
        delta = edited[layer].double() - original[layer].double()
        delta = delta.T if lm.arch.transposed else delta
        c = stats[layer].mom2.double()
        k64 = keys.double().T
        lhs, rhs = delta @ (3.0 * c + k64 @ k64.T), resid.double().T @ k64.T
        assert float((lhs - rhs).norm() / rhs.norm()) < 1e-4
        want = direct(keys, resid, c, 3.0)
        assert float((delta - want).norm() / want.norm()) < 1e-4
        assert float(want.norm()) > 1e-3
        a, b = edit.factors[layer]
        add_factors(lm, layer, a, b)   # the model as edited up to this layer, for the next one
    handle.restore()
    assert edit.layer_stats[0]["condition"] > 1 and len(edit.per_request) == 3


def test_one_request_at_one_layer_is_rome_shrunk_by_the_prior(tokenizer):
    """B = 1, one layer: Sherman–Morrison gives ΔW = R (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k), the rank-one update
    ROME's closed form makes from the same key and residual (R (C⁻¹k)ᵀ / kᵀC⁻¹k), times
    s / (λ + s) with s = kᵀC⁻¹k. So MEMIT tends to it as λ → 0, and is it for no λ > 0."""
    lm = tiny_model("llama", tokenizer)
    for weight in (3.0, 1e-6):
        hp = Hparams(layer=1, v_steps=4, memit_layers=(1,), mom2_update_weight=weight)
        stats = stats_for(lm, (1,))
        before = lm.mlp_out(1).weight.detach().clone()
        edit, handle = apply_memit(lm, REQUESTS[1:2], "cmemit", hparams=hp, stats=stats, templates=TEMPLATES)
        delta = lm.mlp_out(1).weight.detach().double() - before.double()
        handle.restore()
        k, h = key_and_output(lm, REQUESTS[1], 1, 1, [SLOT, *TEMPLATES])
        k_mean, h_mean = k[1:].mean(0).double(), h[1:].mean(0).double()
        c_inv_k = torch.linalg.solve(stats[1].mom2.double(), k_mean)
        rome, _, _, _ = rank_one_update(k_mean, k_mean, h_mean, edit.targets[0].double(), c_inv_k)
        s = float(k_mean @ c_inv_k)
        assert float((delta - rome * s / (weight + s)).norm() / delta.norm()) < 1e-4
        if weight < 1e-3:
            assert float((delta - rome).norm() / rome.norm()) < 1e-4


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma3_text"])
def test_the_value_step_at_a_layer_output_is_the_same_on_both_runners(tokenizer, model_type):
    lm = tiny_model(model_type, tokenizer)
    hp = Hparams(mom2_adjustment=False, layer=1, v_steps=5)
    site = lm.module(lm.arch.layer_name(1))
    v0 = [key_and_output(lm, r, 1, 1, [SLOT])[1][0] for r in REQUESTS]
    ref = compute_v_stars(lm, REQUESTS, 1, TEMPLATES, v0, hp, ReferenceRunner, site=site)
    fast = compute_v_stars(lm, REQUESTS, 1, TEMPLATES, v0, hp, FastRunner, site=site)
    for a, b in zip(ref, fast):
        assert float((a.v_star - b.v_star).norm() / a.v_star.norm()) < 1e-4 and a.steps == b.steps
        assert float(a.delta.norm()) > 1e-3


def test_factor_update_replays_bit_for_bit_and_rank_one_is_rome_outer(tokenizer):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 4, generator=g), torch.randn(5, 4, generator=g)
    assert torch.equal(factor_update(a, b), factor_update(a.clone(), b.clone()))
    torch.testing.assert_close(factor_update(a, b), a @ b.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(factor_update(a[:, :1], b[:, :1]), torch.outer(a[:, 0], b[:, 0]))


def test_memit_needs_key_statistics_and_a_known_method(tokenizer):
    lm = tiny_model("llama", tokenizer)
    hp = Hparams(layer=1, v_steps=2, memit_layers=(0, 1))
    with pytest.raises(CromeError, match="key statistics"):
        apply_memit(lm, REQUESTS, "memit", hparams=hp, stats={}, templates=TEMPLATES)
    with pytest.raises(CromeError, match="unknown batch method"):
        apply_memit(lm, REQUESTS, "rome", hparams=hp, stats={}, templates=TEMPLATES)
    with pytest.raises(CromeError, match="ascending"):
        apply_memit(lm, REQUESTS, "memit", hparams=Hparams(layer=1, memit_layers=(1, 0)), stats={},
                    templates=TEMPLATES)


# ---------------------------------------------------------------- from the command line

@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    import json

    from conftest import FLAT

    root = tmp_path_factory.mktemp("memit")
    save_tiny(root / "tiny", tokenizer)
    (root / "data.json").write_text(json.dumps([dict(FLAT[i % len(FLAT)], case_id=i) for i in range(4)]))
    (root / "texts.txt").write_text("The cat sat on the mat.\nRivers run to the sea and the sea is wide.\n")
    (root / "requests.json").write_text(json.dumps([
        {"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new} for r in REQUESTS]))
    return root


def test_cli_edit_with_memit_takes_a_file_of_requests(folder):
    import json

    from click.testing import CliRunner

    from crome.cli import main

    common = ["--model", str(folder / "tiny"), "--layer", "1", "--mom2-samples", "300",
              "--ppl-data", str(folder / "texts.txt")]
    r = CliRunner().invoke(main, ["edit", "--method", "cmemit", "--requests", str(folder / "requests.json"),
                                  "--memit-layers", "0-1", "--guard", "off", "--json", *common])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert report["layers"] == [0, 1] and len(report["requests"]) == 3 and report["applied"]
    assert set(report["layer_stats"]) == {"0", "1"} and report["layer_stats"]["1"]["condition"] > 1
    assert report["requests"][0]["first_token_subject"] and report["ppl_ratio"] > 0
    r = CliRunner().invoke(main, ["edit", "--method", "rome", "--requests", str(folder / "requests.json"), *common])
    assert r.exit_code != 0 and "--method memit" in r.output
    r = CliRunner().invoke(main, ["edit", "--method", "memit", "--requests", str(folder / "requests.json"),
                                  "--no-mom2", *common])
    assert r.exit_code != 0 and "key statistics" in r.output
    r = CliRunner().invoke(main, ["edit", "--method", "memit", *common])
    assert r.exit_code != 0 and "needs --prompt" in r.output


def test_cli_edit_with_memit_honours_the_guard_rule(folder, tmp_path):
    """--guard-rule on the MEMIT path is a pre-check of the batch (it used to be dropped): a rule that
    predicts a collapse refuses the batch (exit 3, nothing saved), one that does not lets it through."""
    import json

    from click.testing import CliRunner

    from crome.cli import main

    args = ["edit", "--method", "cmemit", "--requests", str(folder / "requests.json"), "--memit-layers", "0-1",
            "--model", str(folder / "tiny"), "--layer", "1", "--mom2-samples", "300", "--no-ppl", "--guard", "verify",
            "--guard-probe", str(folder / "texts.txt"), "--guard-threshold", "1e9"]
    strict, lenient = tmp_path / "strict.json", tmp_path / "lenient.json"
    strict.write_text(json.dumps({"feature": "update_ratio", "threshold": 1e-9, "above": True}))
    lenient.write_text(json.dumps({"feature": "update_ratio", "threshold": 1e9, "above": True}))
    r = CliRunner().invoke(main, [*args, "--guard-rule", str(strict), "--save", str(tmp_path / "saved")])
    assert r.exit_code == 3 and "guard refused the cmemit batch: update_ratio" in r.output, r.output
    assert not (tmp_path / "saved").exists()
    r = CliRunner().invoke(main, [*args, "--guard-rule", str(lenient), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert report["guard_rule"]["threshold"] == 1e9 and report["guard_predicted_collapse"] is False
    denominator = tmp_path / "denominator.json"
    denominator.write_text(json.dumps({"feature": "denominator", "threshold": 0.1, "above": False}))
    r = CliRunner().invoke(main, [*args, "--guard-rule", str(denominator)])
    assert r.exit_code == 2 and "ROME's" in r.output


def test_cli_eval_memit_batches_sequentially_and_resumes(folder, tmp_path):
    from click.testing import CliRunner

    from crome.cli import main
    from crome.evaluation.results import ResultsFile

    out = tmp_path / "memit.jsonl"
    args = ["eval", "--data", str(folder / "data.json"), "--model", str(folder / "tiny"), "--layer", "1",
            "--method", "memit", "--batch-size", "2", "--memit-layers", "0,1", "--mom2-samples", "300",
            "--ppl-data", str(folder / "texts.txt"), "--gen-tokens", "0", "--sequential", "--out", str(out)]
    r = CliRunner().invoke(main, [*args, "--n", "2"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, [*args, "--n", "4", "--resume", "--retained-every", "4"])
    assert r.exit_code == 0, r.output
    records = ResultsFile(out).read()
    assert [r["retained_every"] for r in records] == [0, 0, 4, 4]
    assert [r["update"] for r in records] == [1, 1, 2, 2] and all(r["batch_size"] == 2 for r in records)
    assert records[-1]["n_applied"] == 4 and records[-1]["retained_efficacy"] is not None
    assert records[0]["layers"] == [0, 1] and records[0]["hparams"]["memit_layers"] == [0, 1]


def test_an_eval_records_the_perplexity_of_the_model_memit_edited(tokenizer, tmp_path):
    """The monitor starts at MEMIT's lowest layer (0 here), not at --layer (1): the record's
    perplexity is the plain perplexity of the edited model; every case of the batch shares it."""
    from conftest import FLAT, TEXTS, settings, write

    from crome.editing.context import RunContext
    from crome.evaluation.datasets import load_cases
    from crome.evaluation.evaluate import run
    from crome.scoring.measure import perplexity

    lm = tiny_model("llama", tokenizer)
    hp = Hparams(layer=1, v_steps=3, memit_layers=(0, 1), mom2_update_weight=3.0)
    stats = stats_for(lm, (0, 1))
    cases = load_cases(write(tmp_path, FLAT[:2])).cases
    records = run(lm, cases, RunContext(settings(method="cmemit", batch_size=2), hp, TEMPLATES, TEXTS, stats=stats), tmp_path / "m.jsonl")
    _, handle = apply_memit(lm, [c.request for c in cases], "cmemit", hparams=hp, stats=stats, templates=TEMPLATES)
    edited = perplexity(lm, TEXTS)
    handle.restore()
    assert records[0]["ppl_after"] == pytest.approx(edited, rel=1e-4) == records[1]["ppl_after"]
    assert abs(edited / perplexity(lm, TEXTS) - 1) > 1e-4   # the edit moves perplexity: the check has teeth
