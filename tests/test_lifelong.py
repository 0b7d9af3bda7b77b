"""Lifelong editing (issue 23): AlphaEdit's null-space solve, its checkpoint, MPES, norm control,
‖W‖ recording and generation-based exact match."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from conftest import FLAT, TEMPLATES, TEXTS, save_tiny, settings, stats_for, tiny_model, write
from test_sequential import MORE, final_weights, killed_and_resumed

from crome import CromeError, EditRequest
from crome.cli import main
from crome.editing.api import apply_memit
from crome.editing.compute_value import Batch, ReferenceRunner, build_batch, compute_v_stars
from crome.editing.context import RunContext
from crome.editing.fast import FastRunner
from crome.editing.hparams import Hparams
from crome.editing.memit import memit_solve
from crome.editing.mom2 import KeyStats
from crome.editing.null_space import NullSpace, alphaedit_solve, outer_sum, projection
from crome.editing.weights import factor_update
from crome.evaluation.checkpoint import FactorStore
from crome.evaluation.datasets import load_cases
from crome.scoring.measure import answer_matches, generation_matches

REQUESTS = [EditRequest.create("{} is the capital of", "Paris", "Germany"),
            EditRequest.create("The mother tongue of {} is", "Danielle Darrieux", "English")]
HP = Hparams(layer=1, v_steps=4, memit_layers=(0, 1), mom2_update_weight=3.0, null_space_energy=0.3)
F64 = torch.float64


def _problem(d=12, d_out=7, b=3, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, resid = torch.randn(b, d, generator=g), torch.randn(b, d_out, generator=g)
    earlier = torch.randn(4, d, generator=g)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0][:, :n]
    return keys, resid, earlier, basis


def test_the_alphaedit_update_solves_its_normal_equations_and_zeroes_the_objectives_gradient():
    """Δ = R K₁ᵀ P (S P + λI)⁻¹ (S = K₁K₁ᵀ + K_pK_pᵀ): the factors equal an explicit inverse, and Δ
    is a stationary point of AlphaEdit's objective ‖ΔK₁ − R‖² + ‖ΔK_p‖² + λ‖Δ‖² over Δ = D P."""
    keys, resid, earlier, basis = _problem()
    lam, p = 0.3, basis @ basis.T
    a, b, condition = alphaedit_solve(keys, resid, basis, basis.T @ outer_sum(earlier) @ basis, lam)
    delta = factor_update(a, b).double()
    k1, kp, r = keys.double().T, earlier.double().T, resid.double().T
    s = k1 @ k1.T + kp @ kp.T
    want = r @ k1.T @ p @ torch.linalg.inv(s @ p + lam * torch.eye(len(p), dtype=F64))
    assert float((delta - want).norm() / want.norm()) < 1e-5
    assert float((delta @ (s @ p + lam * torch.eye(len(p), dtype=F64)) - r @ k1.T @ p).norm()) < 1e-4
    d = delta.clone().requires_grad_(True)
    dp = d @ p
    loss = ((dp @ k1 - r) ** 2).sum() + ((dp @ kp) ** 2).sum() + lam * (dp ** 2).sum()
    loss.backward()
    assert float(d.grad.norm()) < 1e-4 * float(r.norm())
    assert condition >= 1.0


def test_with_p_identity_and_no_earlier_edits_alphaedit_is_memit_with_c_identity():
    """P = I, K_p = 0: R K₁ᵀ (K₁K₁ᵀ + λI)⁻¹, which is MEMIT's R Kᵀ (λ_M C + KKᵀ)⁻¹ at C = I, λ_M = λ."""
    keys, resid, _, _ = _problem(n=12)
    eye = torch.eye(12, dtype=F64)
    a, b, _ = alphaedit_solve(keys, resid, eye, torch.zeros(12, 12, dtype=F64), 0.7)
    a2, b2, _ = memit_solve(keys, resid, eye.float(), 0.7)
    assert torch.allclose(factor_update(a, b), factor_update(a2, b2), atol=1e-6)


def test_the_cut_off_keeps_the_smallest_eigenvalues_up_to_the_energy_share():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(8, 8, dtype=F64))[0]
    eig = torch.tensor([1e-3, 2e-3, 5e-3, 0.1, 0.3, 0.6, 1.0, 2.0], dtype=F64)
    c = (q * eig) @ q.T
    stats = KeyStats(mom2=c.float(), source="test", source_hash="", layer=0, n_keys=0, shrinkage=0.0, hash="")
    basis, record = projection(stats, energy=0.0025)      # the three smallest hold 0.8/4.018 = 0.2%
    assert record["null_dim"] == 3 and basis.shape == (8, 3)
    assert torch.allclose(basis @ basis.T, q[:, :3] @ q[:, :3].T, atol=1e-5)
    assert record["energy"] <= 0.0025
    # the same share on C scaled by 1,000 gives the same subspace: the rule is scale-free
    scaled = replace(stats, mom2=c.float() * 1000)
    assert projection(scaled, 0.0025)[1]["null_dim"] == 3
    with pytest.raises(CromeError, match="energy"):
        projection(stats, 1e-9)


@pytest.mark.parametrize("method", ["alphaedit", "calphaedit"])
def test_an_alphaedit_edit_leaves_keys_outside_the_null_space_unchanged(tokenizer, method):
    """ΔW x = 0 for every x with P x = 0 (the preserved subspace), within float32 rounding; keys
    inside it do change."""
    lm = tiny_model("llama", tokenizer)
    stats = stats_for(lm, HP.memit_layers)
    null_space = NullSpace.from_stats(stats, HP.null_space_energy)
    before = {x: lm.mlp_out(x).weight.detach().clone() for x in HP.memit_layers}
    edit, handle = apply_memit(lm, REQUESTS, method, hparams=HP, stats=stats, templates=TEMPLATES,
                               null_space=null_space)
    torch.manual_seed(1)
    for layer in HP.memit_layers:
        delta = (lm.mlp_out(layer).weight.detach() - before[layer]).double()
        basis = null_space.bases[layer]
        outside = (torch.eye(len(basis), dtype=F64) - basis @ basis.T) @ torch.randn(len(basis), 16, dtype=F64)
        inside = basis @ torch.randn(basis.shape[1], 16, dtype=F64)
        assert float((delta @ outside).norm()) < 1e-5 * float(delta.norm() * outside.norm())
        assert float((delta @ inside).norm()) > 1e-2 * float(delta.norm() * inside.norm())
        assert edit.null_space[str(layer)]["null_dim"] == basis.shape[1]
    handle.restore()
    assert all(torch.equal(lm.mlp_out(x).weight, before[x]) for x in HP.memit_layers)


def test_the_running_key_sum_protects_earlier_edits_keys(tokenizer):
    """After edit 1's keys enter the running sum, edit 2's update barely moves them; without the sum
    it moves them more (λ small, so that the sum, not the ridge, decides)."""
    lm = tiny_model("llama", tokenizer)
    hp = replace(HP, alphaedit_l2=1e-3)
    stats = stats_for(lm, HP.memit_layers)
    null_space = NullSpace.from_stats(stats, HP.null_space_energy)
    _, h1 = apply_memit(lm, REQUESTS[:1], "alphaedit", hparams=hp, stats=stats, templates=TEMPLATES,
                        null_space=null_space)
    keys1 = h1.keys
    moved = {}
    for with_sum in (True, False):
        ns = null_space.fresh()
        if with_sum:
            ns.accumulate(keys1)
        before = {x: lm.mlp_out(x).weight.detach().clone() for x in HP.memit_layers}
        _, h2 = apply_memit(lm, REQUESTS[1:], "alphaedit", hparams=hp, stats=stats, templates=TEMPLATES, null_space=ns)
        layer = HP.memit_layers[-1]
        delta = lm.mlp_out(layer).weight.detach() - before[layer]
        moved[with_sum] = float((delta @ keys1[layer].T).norm() / delta.norm())
        h2.restore()
    print(moved)
    assert moved[True] < 0.1 * moved[False]
    h1.restore()


def test_a_killed_alphaedit_run_resumes_with_its_projections_and_key_sum(tokenizer, tmp_path):
    """Byte-identical records and bit-identical weights; the checkpoint holds Û and every update's
    keys, and the resumed run's running sum equals the uninterrupted one's."""
    lm = tiny_model("llama", tokenizer)
    layers = HP.memit_layers
    stats = stats_for(lm, layers)
    s = settings(method="calphaedit", sequential=True, monitor_every=2, batch_size=1, gen_em=True)
    cases = load_cases(write(tmp_path, MORE)).cases

    def ctx():
        return RunContext(s, HP, TEMPLATES, TEXTS, stats=stats, null_space=NullSpace.from_stats(stats, 0.3))

    reference, whole, part = killed_and_resumed(lm, cases, ctx, tmp_path)
    a, b = final_weights(lm, whole, layers), final_weights(lm, part, layers)
    assert all(torch.equal(a[x], b[x]) for x in layers)
    store = FactorStore(part)
    assert torch.equal(store.read_null_space()["bases"][1], NullSpace.from_stats(stats, 0.3).bases[1])
    sums = []
    for out in (whole, part):
        ns = NullSpace.from_state(FactorStore(out).read_null_space())
        for n in FactorStore(out).updates():
            ns.accumulate(FactorStore(out).read(n)["keys"])
        sums.append(ns.prior[1])
    assert torch.equal(*sums) and ns.edits == len(cases)
    # what each record of a monitored step carries
    last = reference[-1]
    assert set(last["weight_norms"]) == {"0", "1"} and last["weight_norms"]["1"]["ratio"] != 1.0
    assert 0.0 <= last["retained_gen_em"] <= 1.0 and "gen_em" in last["metrics"]
    assert last["null_space"]["1"]["prior_edits"] == len(cases) - 1   # the keys before this update


def _on_top(lm, request, delta, hp, layer):
    batch = build_batch(lm, request, TEMPLATES, hp.kl_prompts)
    target_lp, _, top_lp = ReferenceRunner(lm, batch, layer)(delta)
    return bool((target_lp >= top_lp).all())


@pytest.mark.integration
def test_mpes_stops_once_the_target_is_on_top_and_the_target_is_reached(default_lm):
    """On the real model (a tiny random one cannot put most tokens on top): with MPES the v*
    optimisation stops early, on the same trajectory, with the target the most probable token at
    every target position of every rewriting prompt."""
    from crome.editing.compute_key import compute_keys

    lm, layer = default_lm, 6
    hp = Hparams(layer=layer, early_stop_loss=1e-9)     # no loss stop: only MPES ends it early
    request = REQUESTS[1]
    v0 = [compute_keys(lm, request, layer, TEMPLATES).v_bare]
    full = compute_v_stars(lm, [request], layer, TEMPLATES, v0, hp, FastRunner)[0]
    early = compute_v_stars(lm, [request], layer, TEMPLATES, v0, replace(hp, mpes=True), FastRunner)[0]
    assert early.steps < full.steps == hp.v_steps
    assert early.losses == full.losses[:early.steps]
    assert _on_top(lm, request, early.delta, hp, layer)
    # one step earlier it was not: MPES stopped at the first step where it was
    previous = compute_v_stars(lm, [request], layer, TEMPLATES, v0, replace(hp, v_steps=early.steps - 1), FastRunner)
    assert not _on_top(lm, request, previous[0].delta, hp, layer)


def test_batch_runners_report_the_top_log_prob_at_each_target_position(tokenizer):
    lm = tiny_model("gpt2", tokenizer)
    batch = Batch.stack([build_batch(lm, r, TEMPLATES, ("{} is a",)) for r in REQUESTS])
    delta = torch.zeros(lm.model.config.hidden_size)
    ref = ReferenceRunner(lm, batch, 1)(delta)
    fast = FastRunner(lm, batch, 1)(delta)
    assert torch.allclose(ref[2], fast[2], atol=1e-4)
    assert bool((ref[2] >= ref[0] - 1e-6).all())


def test_the_norm_weight_shrinks_the_update(tokenizer):
    lm = tiny_model("llama", tokenizer)
    stats = stats_for(lm, HP.memit_layers)
    norms = {}
    for method in ("memit", "alphaedit"):
        for mu in (0.0, 50.0):
            edit, handle = apply_memit(lm, REQUESTS, method, hparams=replace(HP, norm_weight=mu), stats=stats,
                                       templates=TEMPLATES)
            norms[method, mu] = edit.record()["update_norm"]
            handle.restore()
        assert norms[method, 50.0] < 0.9 * norms[method, 0.0]


def test_answer_matches_reads_the_targets_word():
    assert answer_matches(" Paris, France", "Paris")
    assert answer_matches("Paris", " Paris")
    assert not answer_matches(" Parisian", "Paris")
    assert not answer_matches(" London", "Paris")
    assert not answer_matches("anything", " ")


def test_generation_matches_are_greedy_generation_not_teacher_forcing(tokenizer):
    """Batched (left-padded) matches equal HF greedy generation one prompt at a time, with the
    target set to each prompt's own first generated token (a match) and to an unlikely word."""
    from crome.request import target_ids

    lm = tiny_model("llama", tokenizer)
    prompts = ["Paris is the capital of", "The mother tongue of Danielle Darrieux is", "A"]

    def greedy(prompt, n):
        ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = lm.model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    own = [greedy(p, 1) for p in prompts]
    want = [answer_matches(greedy(p, len(target_ids(lm.tokenizer, p, t)) + 1), t) for p, t in zip(prompts, own)]
    assert generation_matches(lm, list(zip(prompts, own))) == want
    assert any(want)
    assert generation_matches(lm, [(p, " zzzqqq") for p in prompts]) == [False] * 3


@pytest.fixture
def folder(tokenizer, tmp_path):
    return save_tiny(tmp_path / "tiny", tokenizer)


def test_cli_eval_runs_alphaedit_with_mpes_and_norm_control(folder, tmp_path, monkeypatch):
    data = write(tmp_path, FLAT)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    out = tmp_path / "ae.jsonl"
    common = ["--model", str(folder), "--layer", "1", "--memit-layers", "0-1", "--mom2-samples", "200",
              "--ppl-data", str(tmp_path / "texts.txt")]
    r = CliRunner().invoke(main, ["eval", "--data", str(data), "--method", "calphaedit", "--out", str(out),
                                  "--sequential", "--gen-em", "--mpes", "--norm-weight", "1", "--null-space-energy",
                                  "0.3", "--gen-tokens", "0", *common])
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 3 and all(x["applied"] for x in records)
    assert records[0]["hparams"]["mpes"] and records[0]["hparams"]["norm_weight"] == 1.0
    assert records[0]["null_space"]["1"]["energy_asked"] == 0.3 and records[-1]["weight_norms"]
    assert records[0]["gen_em"] is True
    table = CliRunner().invoke(main, ["summarize", str(out)])
    assert table.exit_code == 0 and "gen EM paraphrase" in table.output and "final retained gen EM" in table.output
    for bad, message in ((["--method", "crome", "--norm-weight", "1"], "--norm-weight bounds the batch solves"),
                         (["--method", "memit", "--null-space-energy", "0.1"], "is AlphaEdit's"),
                         (["--method", "alphaedit", "--null-space-energy", "1.5"], "must be in (0, 1)")):
        r = CliRunner().invoke(main, ["eval", "--data", str(data), "--out", str(tmp_path / "x.jsonl"), *bad, *common])
        assert r.exit_code != 0 and message in r.output, r.output


def test_the_lifelong_sweep_example_makes_alphaedit_jobs(tmp_path, monkeypatch):
    """Sweeps take the new methods and hyper-parameters like any other option (examples/lifelong.toml)."""
    from pathlib import Path

    (tmp_path / "counterfact").mkdir()
    write(tmp_path / "counterfact", FLAT, "counterfact-train.json")
    (tmp_path / "me-ppl").mkdir()
    (tmp_path / "me-ppl" / "ME-PPL_50.json").write_text(json.dumps([{"Corpus": "x", "Text": t} for t in TEXTS]))
    monkeypatch.setenv("CROME_DATA", str(tmp_path))

    from crome.distribution.sweep import _toml, cells
    from crome.evaluation.jobs import EvalJob

    spec = _toml(Path(__file__).resolve().parents[1] / "examples" / "lifelong.toml")
    got = {c.job.method: c.job for c in cells(spec, tmp_path)}
    assert set(got) == {"memit", "alphaedit", "calphaedit"}
    assert all(j.hparams == {"mpes": True} and j.gen_em and j.sequential for j in got.values())
    with pytest.raises(CromeError, match="is AlphaEdit's"):
        EvalJob(data="x.json", out="o.jsonl", method="cmemit", hparams={"alphaedit_l2": 3.0})


def test_cli_edit_with_alphaedit_reports_its_null_space(folder, tmp_path):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([dict(prompt=r.prompt, subject=r.subject, target_new=r.target_new) for r in REQUESTS]))
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    r = CliRunner().invoke(main, ["edit", "--method", "alphaedit", "--requests", str(requests), "--model", str(folder),
                                  "--layer", "1", "--memit-layers", "0-1", "--mom2-samples", "300", "--guard", "off",
                                  "--null-space-energy", "0.3", "--mpes", "--ppl-data", str(tmp_path / "texts.txt"),
                                  "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert report["applied"] and set(report["null_space"]) == {"0", "1"}
    assert report["null_space"]["1"]["energy"] <= 0.3 and report["null_space"]["1"]["prior_edits"] == 0


def test_v_star_batches_go_in_chunks_with_the_same_values(tokenizer, monkeypatch):
    """More edits than ``V_STAR_CHUNK`` are optimised chunk by chunk (memory), each v* as in one batch."""
    import crome.editing.compute_value as cv
    from crome.editing.compute_key import compute_keys

    lm = tiny_model("llama", tokenizer)
    hp = Hparams(layer=1, v_steps=3, mom2_adjustment=False)
    requests = REQUESTS + [EditRequest.create("{} plays the", "Toko Yasuda", "piano")]
    v0 = [compute_keys(lm, r, 1, TEMPLATES).v_bare for r in requests]
    whole = compute_v_stars(lm, requests, 1, TEMPLATES, v0, hp, FastRunner)
    monkeypatch.setattr(cv, "V_STAR_CHUNK", 2)
    calls = []
    original = cv.optimise_delta
    monkeypatch.setattr(cv, "optimise_delta", lambda runner, batch, v, h: calls.append(batch.edits) or original(runner, batch, v, h))
    chunked = compute_v_stars(lm, requests, 1, TEMPLATES, v0, hp, FastRunner)
    assert calls == [2, 1]
    assert all(torch.allclose(a.delta, b.delta, atol=1e-5) and a.steps == b.steps for a, b in zip(whole, chunked))


# ---------------------------------------------------------------- issue 37: NAS, retained sample

def test_nas_rescales_v_star_to_the_anchor_and_skips_an_outlier():
    from crome.editing.norm_anchor import NormAnchor, trimmed_mean

    anchor = NormAnchor(norm=3.0, layer=1, trials=4, skip=2.0)
    scaled, ratio = anchor.scale(torch.tensor([0.0, 4.0, 3.0]))
    assert float(scaled.norm()) == pytest.approx(3.0) and ratio == pytest.approx(5.0 / 3.0)
    assert torch.allclose(scaled / scaled.norm(), torch.tensor([0.0, 0.8, 0.6]))
    skipped, ratio = anchor.scale(torch.tensor([0.0, 6.5, 0.0]))
    assert skipped is None and ratio > 2.0
    assert trimmed_mean([1.0] * 19 + [100.0]) == 1.0          # the top 5% left out


@pytest.mark.parametrize("method", ["alphaedit", "calphaedit"])
def test_an_alphaedit_edit_with_nas_has_v_star_at_the_anchor_or_skips_it(tokenizer, method):
    """z = h − v0 + v*, ‖v*‖ = m̄; an outlier (‖v*‖ > 2 m̄) is not edited (z = h) and recorded."""
    from crome.editing import memit
    from crome.editing.methods import method as entry
    from crome.editing.norm_anchor import norm_anchor, reads

    lm = tiny_model("llama", tokenizer)
    hp = replace(HP, nas=True, nas_trials=2)
    stats = stats_for(lm, HP.memit_layers)
    consistent = entry(method).consistent
    anchor = norm_anchor(lm, REQUESTS, entry(method), hp, TEMPLATES, use_cache=False)
    assert anchor.layer == 1 and anchor.trials == 2 and anchor.norm > 0
    v0, h = reads(lm, REQUESTS, 1, TEMPLATES, consistent)
    edit, handle = memit.apply_memit(lm, REQUESTS, method, hp, stats, TEMPLATES, anchor=anchor)
    handle.restore()
    for i, r in enumerate(edit.per_request):
        assert not r["nas_skipped"]
        assert float((edit.targets[i] - h[i] + v0[i]).norm()) == pytest.approx(anchor.norm, rel=1e-4)
    tiny_anchor = replace(anchor, norm=anchor.norm / 10)           # every v* is now an outlier
    edit, handle = memit.apply_memit(lm, REQUESTS, method, hp, stats, TEMPLATES, anchor=tiny_anchor)
    handle.restore()
    assert all(r["nas_skipped"] and r["nas_ratio"] > 2 for r in edit.per_request)
    assert torch.allclose(edit.targets, h.cpu(), atol=1e-6)
    with pytest.raises(CromeError, match="needs its norm anchor"):
        memit.apply_memit(lm, REQUESTS, method, hp, stats, TEMPLATES)


def test_cli_eval_with_nas_records_the_anchor_fields_and_refuses_rome(folder, tmp_path):
    data = write(tmp_path, FLAT)
    out = tmp_path / "nas.jsonl"
    common = ["--model", str(folder), "--layer", "1", "--memit-layers", "0-1", "--mom2-samples", "200"]
    r = CliRunner().invoke(main, ["eval", "--data", str(data), "--method", "alphaedit", "--out", str(out), "--nas",
                                  "--sequential", "--gen-tokens", "0", "--retained-sample", "2", *common])
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records[0]["hparams"]["nas"] and all("nas_ratio" in x for x in records)
    assert records[0]["retained_sample"] == 2 and records[-1]["retained_efficacy"] is not None
    r = CliRunner().invoke(main, ["eval", "--data", str(data), "--method", "crome", "--out", str(tmp_path / "x.jsonl"),
                                  "--nas", *common])
    assert r.exit_code != 0 and "--nas rescales the batch step" in r.output


def test_the_retained_sample_is_spread_over_the_run_and_the_same_at_every_count():
    from crome.evaluation.sequential import spread

    items = list(range(10))
    assert spread(items, 0) == items and spread(items, 20) == items
    assert spread(items, 4) == [0, 3, 6, 9] and spread(items, 4) == spread(list(items), 4)
    assert spread(items, 1) == [9]


def test_scores_every_scores_a_sample_of_edits_and_leaves_the_run_unchanged(folder, tmp_path):
    """--scores-every 2: the edits' own ES/PS/NS and generation EM on every 2nd edit (and the last), none on
    the others; the edits themselves (weights, memory) are those of the run that scores every edit."""
    data = write(tmp_path, FLAT + MORE)
    common = ["eval", "--data", str(data), "--method", "memory", "--model", str(folder), "--layer", "1",
              "--mom2-samples", "200", "--sequential", "--gen-tokens", "0", "--gen-em"]
    runs = {}
    for every in (1, 2):
        out = tmp_path / f"every{every}.jsonl"
        r = CliRunner().invoke(main, [*common, "--out", str(out), "--scores-every", str(every)])
        assert r.exit_code == 0, r.output
        runs[every] = [json.loads(x) for x in out.read_text().splitlines()]
    every, sampled = runs[1], runs[2]
    assert len(sampled) == len(every) >= 3 and sampled[0]["scores_every"] == 2
    for n, (a, b) in enumerate(zip(every, sampled), start=1):
        assert a["weights_sha"] == b["weights_sha"]
        scored = n % 2 == 0 or n == len(sampled)
        assert (b["metrics"] is not None) == scored and (b["before"] is not None) == scored
        if scored:
            assert b["metrics"] == a["metrics"] and b["metrics_prefixed"]["gen_em"] == a["metrics_prefixed"]["gen_em"]
    r = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "x.jsonl"), "--scores-every", "0"])
    assert r.exit_code != 0 and "--scores-every must be at least 1" in r.output


def test_cli_templates_and_v_lr_set_the_cheap_v_star(folder, tmp_path):
    data = write(tmp_path, FLAT)
    out = tmp_path / "cheap.jsonl"
    common = ["eval", "--data", str(data), "--method", "memory", "--model", str(folder), "--layer", "1",
              "--mom2-samples", "200", "--gen-tokens", "0", "--n", "1"]
    r = CliRunner().invoke(main, [*common, "--out", str(out), "--templates", "6", "--v-lr", "1.0"])
    assert r.exit_code == 0, r.output
    record = json.loads(out.read_text().splitlines()[0])
    assert record["hparams"]["v_lr"] == 1.0 and record["hparams"]["template_lengths"] == [[5, 5]]
    assert len(record["context_templates"]) == 6 and "{}" in record["context_templates"]
    for bad in ("0", "3"):
        r = CliRunner().invoke(main, [*common, "--out", str(tmp_path / "x.jsonl"), "--templates", bad])
        assert r.exit_code != 0 and "--templates takes 1 + a multiple of 5" in r.output
