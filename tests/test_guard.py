"""The verifying guard: verify rolls back bit for bit or keeps the edit, fallback and refuse, the
efficacy rule, the diagnostics that say an edit is unlikely to take, and what `crome edit` and
`crome eval` say and record."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import HP, REQ, TEMPLATES, tiny_model

from crome import EditRequest, compute_edit
from crome.errors import CromeError

TEXTS = ["The weather was mild and the market was busy all morning.", "She wrote a letter to her brother.",
         "Trains left the station every ten minutes."]


@pytest.mark.parametrize("factor", [0.999, 1.001])
def test_guard_verify_rolls_back_bit_exactly_or_keeps_the_edit(tiny, factor):
    """The threshold is set just under (rollback) or just over (kept) the edit's measured probe ratio."""
    from crome.editing.api import guarded_apply
    from crome.editing.records import GuardRefused
    from crome.editing.verify import Verifier

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
    from crome.editing.api import guarded_apply
    from crome.editing.records import GuardRefused
    from crome.editing.rules import GuardRule
    from crome.editing.verify import Verifier

    w = tiny.mlp_out(1).weight.detach().clone()
    always = GuardRule("update_ratio", -1.0, True)
    verifier = Verifier(tiny, 1, TEXTS, threshold=1e9)
    with pytest.raises(GuardRefused, match="guard refused the rome edit: rome at layer 1: .*; crome at layer 1: ") as refused:
        guarded_apply(tiny, REQ, "rome", "fallback", rule=always, verifier=verifier, hparams=HP, templates=TEMPLATES)
    assert refused.value.decision.guard_action == "refused" and refused.value.edit.method == "crome"
    assert torch.equal(tiny.mlp_out(1).weight, w)


def test_guard_fallback_applies_crome_when_rome_fails_the_probe(tiny, monkeypatch):
    from crome.editing.api import guarded_apply
    from crome.editing.records import GuardRefused
    from crome.editing.verify import Verifier

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
    from crome.editing.records import Efficacy

    assert Efficacy("France", None, 0.01, 0.6, 0.2).took
    assert not Efficacy("France", None, 0.01, 0.3, 0.5).took          # rose, still below the old target
    assert not Efficacy("France", "A day.", 0.011, 0.00007, 0.5).took  # fell (the held-out model's layer 3)
    assert Efficacy(None, None, 0.5, 0.9).took and not Efficacy(None, None, 0.5, 0.4).took  # already the answer
    assert "did not take" in Efficacy("France", "A day.", 0.011, 0.00007, 0.5).reason("Germany")


def test_guard_verify_rolls_back_an_edit_that_did_not_take(tokenizer):
    """On a random tiny model an edit does not take (P(new target) falls): verify rolls it back bit for
    bit and says "did not take", even with a probe threshold that never fires."""
    from crome.editing.api import guarded_apply
    from crome.editing.records import GuardRefused
    from crome.editing.verify import Verifier

    lm = tiny_model("llama", tokenizer)
    req = EditRequest.create("{} is the capital of", "Paris", "Germany", "France")
    w = lm.mlp_out(1).weight.detach().clone()
    verifier = Verifier(lm, 1, TEXTS, threshold=1e9)
    with pytest.raises(GuardRefused, match=r"crome at layer 1: did not take: P\(Germany\)") as refused:
        guarded_apply(lm, req, "crome", "verify", verifier=verifier, hparams=HP, templates=TEMPLATES)
    d = refused.value.decision
    assert d.guard_action == "rolled back" and d.guard_reason == "did not take" and d.guard_took is False
    eff = d.guard_efficacy
    assert eff["target_old"] == "France" and eff["checked"] == ["bare", "prefix"]   # C-ROME: bare and prefixed
    assert eff["prefix"] == ("The day was long." if eff["place"] == "prefix" else None)
    assert not (eff["p_new_after"] > eff["p_new_before"] and eff["p_new_after"] > eff["p_old_after"])
    assert torch.equal(lm.mlp_out(1).weight, w)
    # without a known old target, the model's own answer is the one to beat
    with pytest.raises(GuardRefused, match="did not take") as refused:
        guarded_apply(lm, REQ, "rome", "verify", verifier=verifier, hparams=HP, templates=TEMPLATES)
    assert refused.value.decision.guard_efficacy["prefix"] is None                # ROME: the bare prompt
    assert refused.value.decision.guard_efficacy["checked"] == ["bare"]
    assert refused.value.decision.guard_efficacy["target_old"]
    assert torch.equal(lm.mlp_out(1).weight, w)


def test_guard_fallback_moves_to_a_neighbouring_layer(tokenizer, monkeypatch):
    """When ROME and C-ROME at the layer both fail, fallback tries C-ROME one layer up, and keeps it."""
    from crome.editing.api import guarded_apply
    from crome.editing.records import GuardRefused
    from crome.editing.verify import Verifier

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
    from crome.editing.api import guarded_apply
    from crome.editing.verify import Verifier
    from crome.scoring.measure import perplexity

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
    res = CliRunner().invoke(main, base + ["--guard-threshold", "1e9", "--json"])   # the record of a rolled-back edit
    record = json.loads(res.stdout)
    assert res.exit_code == 3 and not record["applied"] and record["guard_took"] is False
    assert record["guard_action"] == "rolled back" and "did not take" in record["error"]
    assert record["guard_efficacy"] and "--method" in record["next_step"] and "denominator" in record["diagnostics"]


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
    from crome.editing.api import guarded_apply
    from crome.editing.rules import DEFAULT_RULE, GuardRule, rule_for

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
    from crome.editing.context import RunContext, RunSettings
    from crome.editing.verify import Verifier
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
    from crome.editing.context import RunContext, RunSettings
    from crome.editing.verify import Verifier
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


@pytest.mark.parametrize("method, took, expect, not_expect", [
    ("crome", False, "--method dual", None), ("dual", False, "--layer auto", "--method"),
    ("dual", None, "--method crome", "dual"), ("crome", None, "--method dual", "crome"),
    ("rome", None, "--method crome or dual", None)])
def test_next_step_names_methods_other_than_the_one_stopped(method, took, expect, not_expect):
    """A rolled-back edit says what to try next, and never the method that was just stopped."""
    from crome.editing.records import GuardDecision

    decision = GuardDecision(guard="verify", edited_with=method, guard_took=took, guard_action="rolled back")
    step = decision.next_step()
    assert expect in step and (not_expect is None or not_expect not in step.split("try", 1)[1])
    assert GuardDecision(guard="verify", edited_with=method).next_step() is None
