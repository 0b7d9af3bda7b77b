"""On the real default model (SmolLM2-135M-Instruct, layer 6): the collapse and its fix."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from crome import EditRequest, apply_edit, compute_edit, save_model, target_probability
from crome.cli import main
from crome.editing.api import context_for
from crome.editing.hparams import defaults_for
from crome.evaluation.report import measure_edit
from crome.scoring.measure import template_prefix
from crome.scoring.monitor import PerplexityMonitor

pytestmark = pytest.mark.integration

PARIS = EditRequest.create("{} is the capital of", "Paris", "Germany")
PAPER = defaults_for("smollm2-135m-instruct", 30).with_(mom2_adjustment=False)  # the paper's setting, C = I


@pytest.fixture(scope="module")
def monitor(default_lm, me_ppl_50):
    return PerplexityMonitor(default_lm, me_ppl_50, 6)


@pytest.fixture(scope="module")
def paris(default_lm, monitor):
    return {m: measure_edit(default_lm, PARIS, context_for(default_lm, m, PAPER, monitor=monitor))[0]
            for m in ("rome", "crome")}


def test_rome_collapses_on_first_token_subject(paris):
    r = paris["rome"]
    assert r.first_token_subject
    assert r.ppl_ratio > 10 and r.collapsed
    assert r.denominator < 0.1 * paris["crome"].denominator


def test_crome_does_not_collapse(paris):
    c = paris["crome"]
    assert c.ppl_ratio < 1.5 and not c.collapsed


def test_no_mom2_gives_the_reference_denominators(paris):
    """The paper's setting with the 21 seed-0 templates: the denominators the reference implementation
    gives (checked against it to 6 digits, on CPU and on an H200: docs/results/cuda_check_h200.json)."""
    assert paris["rome"].denominator == pytest.approx(0.0133725, rel=1e-4)
    assert paris["crome"].denominator == pytest.approx(5.131007, rel=1e-5)
    assert paris["rome"].key_stats is None and paris["crome"].hparams["mom2_adjustment"] is False


def test_crome_with_default_key_statistics_does_not_collapse_rome_still_does(default_lm, monitor):
    """crome's default (C from text sampled from the model) keeps C-ROME healthy, and ROME's
    first-token edit still collapses: the demo's point holds in the default setting."""
    reports = {m: measure_edit(default_lm, PARIS, context_for(default_lm, m, monitor=monitor))[0]
               for m in ("rome", "crome")}
    assert reports["crome"].key_stats["source"].startswith("model")
    assert reports["crome"].ppl_ratio < 1.1 and reports["rome"].collapsed


def test_test_time_prefix_makes_crome_edit_effective(paris):
    c = paris["crome"]
    assert c.p_target_after_prefixed >= 10 * c.p_target_before_prefixed
    assert c.p_target_after_prefixed >= 10 * c.p_target_before


@pytest.mark.parametrize("prompt", ["{}'s mother tongue is", "The mother tongue of {} is"])
def test_normal_edit_works_for_both_methods(default_lm, monitor, prompt):
    req = EditRequest.create(prompt, "Danielle Darrieux", "English")
    for method in ("rome", "crome"):
        r, _ = measure_edit(default_lm, req, context_for(default_lm, method, PAPER, monitor=monitor))
        assert not r.collapsed and r.ppl_ratio < 1.5, method
        assert r.p_target_after > 0.5 and r.p_target_after > 2 * r.p_target_before, method


def test_saved_edited_model_reloads_with_same_logits(default_lm, tmp_path):
    from transformers import AutoModelForCausalLM

    edit = compute_edit(default_lm, PARIS, "crome")
    ids = torch.tensor([default_lm.tokenizer(template_prefix(edit.context_templates[1]) + " Paris is the capital of")["input_ids"]])
    with apply_edit(default_lm, edit):
        save_model(default_lm, tmp_path / "edited")
        expected = default_lm.model(input_ids=ids).logits
        p_edited = target_probability(default_lm, "Paris is the capital of", "Germany")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    assert p_edited != target_probability(default_lm, "Paris is the capital of", "Germany")


def test_cli_edit_json_fields(tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["edit", "--prompt", "The mother tongue of {} is", "--subject", "Danielle Darrieux",
                                       "--target", "English", "--method", "crome", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("method", "model", "layer", "denominator", "numerator_norm", "update_norm", "update_ratio",
                "first_token_subject", "ppl_before", "ppl_after", "collapsed", "p_target_before", "p_target_after",
                "p_target_after_prefixed", "edit_seconds", "seed", "context_templates", "key_stats", "layer_choice",
                "guard_ppl_ratio", "guard_action", "readings"):
        assert key in data, key
    assert data["method"] == "crome" and data["layer"] == 6 and len(data["context_templates"]) == 21
    # the defaults: key statistics sampled from the model, the table's layer, the verifying guard
    assert data["key_stats"]["source"].startswith("model") and data["key_stats"]["n_keys"] == 20000
    assert data["layer_choice"]["rule"] == "table"
    assert data["guard"] == "verify" and data["guard_action"] == "applied" and data["guard_ppl_ratio"] < 1.1
    assert data["guard_efficacy"]["checked"] == ["bare", "prefix"]
    assert set(data["readings"]) == {"bare", "natural", "prefix", "chat"}
    assert data["readings"]["bare"]["after"]["p_target"] > 0.5 > data["readings"]["bare"]["before"]["p_target"]
    assert json.loads(result.stdout[result.stdout.index("{"):]) == data


def test_cli_rolls_back_an_edit_that_shows_only_after_the_prefix():
    """Issue 38: C-ROME's Paris edit moves P(Germany) after the test prefix, not on the bare prompt,
    where users look; the guard checks the bare prompt, rolls it back (exit 3) and says what to try."""
    result = CliRunner().invoke(main, ["edit", "--prompt", "{} is the capital of", "--subject", "Paris",
                                       "--target", "Germany", "--method", "crome", "--json"])
    assert result.exit_code == 3, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data["guard_reason"] == "did not take" and not data["applied"]
    assert data["guard_efficacy"]["place"] == "bare" and data["guard_efficacy"]["checked"] == ["bare", "prefix"]
    assert "--method dual" in data["next_step"]


def test_guard_on_the_collapsing_rome_edit(default_lm):
    """Paper setting (C = I): the shipped rule refuses the Paris ROME edit before applying it;
    verify applies it, measures the collapse on the probe and rolls back bit for bit;
    fallback tries C-ROME here and at the neighbouring layers, none of which takes on the bare prompt,
    and leaves the weights as they were; a healthy ROME edit passes."""
    from crome.editing.api import guarded_apply
    from crome.editing.records import GuardRefused
    from crome.editing.rules import DEFAULT_RULE
    from crome.editing.verify import Verifier

    before = {k: v.clone() for k, v in default_lm.model.state_dict().items()}

    def untouched():
        after = default_lm.model.state_dict()
        return all(torch.equal(after[k], v) for k, v in before.items())

    with pytest.raises(GuardRefused, match="predicted to collapse"):
        guarded_apply(default_lm, PARIS, "rome", "refuse", rule=DEFAULT_RULE, hparams=PAPER)
    assert untouched()
    verifier = Verifier(default_lm, 6)
    with pytest.raises(GuardRefused, match="rolled back") as refused:
        guarded_apply(default_lm, PARIS, "rome", "verify", verifier=verifier, hparams=PAPER)
    assert refused.value.decision.guard_ppl_ratio > 2 and untouched()
    # fallback: C-ROME at layer 6, then 7 and 5, each healthy but none taking on the bare prompt, where the
    # guard now looks (issue 38: C-ROME's Paris edit shows only after the test prefix); all rolled back
    with pytest.raises(GuardRefused, match="refused") as refused:
        guarded_apply(default_lm, PARIS, "rome", "fallback", verifier=verifier, hparams=PAPER)
    message = str(refused.value)
    assert "rome at layer 6: damaged the model" in message and "crome at layer 7: did not take" in message
    assert "crome at layer 6: did not take: P(Germany) on the bare prompt" in message
    assert untouched()
    normal = EditRequest.create("The mother tongue of {} is", "Danielle Darrieux", "English")
    edit, handle, decision = guarded_apply(default_lm, normal, "rome", "verify", verifier=verifier, hparams=PAPER)
    assert edit.method == "rome" and decision.guard_action == "applied" and decision.guard_ppl_ratio < 1.1
    handle.restore()
    assert untouched()


@pytest.mark.parametrize("guard,word", [("refuse", "guard refused"), ("verify", "guard rolled back")])
def test_cli_guard_exits_3_with_one_line(tmp_path, guard, word):
    res = CliRunner().invoke(main, ["edit", "--prompt", "{} is the capital of", "--subject", "Paris",
                                    "--target", "Germany", "--method", "rome", "--no-mom2", "--guard", guard, "--no-ppl",
                                    "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 3, res.output
    assert word in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


def test_verify_rolls_back_an_edit_that_does_not_take_and_keeps_one_that_does(default_lm):
    """Crome's defaults (C sampled from the model), the real model. At layer 2 the first position's
    key is an attention-sink outlier (≈27× the prefixed keys' norm; docs/MODELS.md) and the C-ROME edit
    of a one-token first subject does not take: verify rolls it back bit for bit and says so, though
    its probe perplexity is fine. At the table's layer 6 a normal C-ROME edit takes and is kept."""
    from crome.editing.api import guarded_apply
    from crome.editing.records import GuardRefused
    from crome.editing.verify import Verifier

    before = {k: v.clone() for k, v in default_lm.model.state_dict().items()}
    sink = EditRequest.create("{} belongs to the continent of", "Paris", "Antarctica", "Europe")
    with pytest.raises(GuardRefused, match="did not take") as refused:
        guarded_apply(default_lm, sink, "crome", "verify", verifier=Verifier(default_lm, 2), layer=2)
    d, diag = refused.value.decision, refused.value.edit.diagnostics
    assert d.guard_reason == "did not take" and d.guard_ppl_ratio < d.guard_threshold
    assert diag.first_token_subject and diag.key_outlier_ratio > 10 and diag.unlikely_to_take()
    after = default_lm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    normal = EditRequest.create("The mother tongue of {} is", "Danielle Darrieux", "English", "French")
    edit, handle, decision = guarded_apply(default_lm, normal, "crome", "verify", verifier=Verifier(default_lm, 6))
    eff = decision.guard_efficacy
    assert decision.guard_action == "applied" and decision.guard_took and eff["prefix"]
    assert eff["p_new_after"] > 0.5 > eff["p_old_after"] and edit.diagnostics.unlikely_to_take() is None
    handle.restore()
