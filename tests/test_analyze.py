"""crome analyze / trace / report and the collapse guard."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TEMPLATES, tiny_model

from crome import EditRequest, compute_edit
from crome.analysis.calibrate import calibrate, precision_recall
from crome.analysis.first_token import first_token_experiment
from crome.analysis.guard_analysis import guard_analysis
from crome.analysis.html_report import SECTIONS, build_report
from crome.analysis.key_geometry import key_geometry
from crome.analysis.prefix_effect import prefix_effect
from crome.analysis.trace_plot import causal_trace
from crome.analysis.update_anatomy import update_anatomy
from crome.cli import main
from crome.editing.api import context_for, guarded_apply
from crome.editing.context import RunContext, RunSettings
from crome.editing.hparams import Hparams
from crome.editing.locate import GROUPS, trace_fact
from crome.editing.records import GuardRefused
from crome.editing.rules import GuardRule
from crome.editing.verify import Verifier
from crome.evaluation.datasets import Case, KnownFact
from crome.evaluation.evaluate import run
from crome.scoring.monitor import PerplexityMonitor

HP = Hparams(mom2_adjustment=False, layer=1, v_steps=3)
TEXTS = ["The cat sat on the mat.", "Rivers run to the sea and the sea is wide."]
CASES = [
    Case("1", EditRequest.create("{} is the capital of", "Paris", "Germany", "France"),
         paraphrase_prompts=["The city of Paris is the capital of"], neighborhood_prompts=["Berlin is the capital of"],
         neighborhood_target="Germany"),
    Case("2", EditRequest.create("The mother tongue of {} is", "Danielle Darrieux", "English", "French"),
         paraphrase_prompts=["Danielle Darrieux speaks"], neighborhood_prompts=["Jean Gabin speaks"],
         neighborhood_target="French"),
    Case("3", EditRequest.create("{} plays the", "Toko Yasuda", "piano", "guitar")),
]


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_model("llama", tokenizer)


@pytest.fixture(scope="module")
def runs(lm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("rome", "crome"):
        s = RunSettings(method=method, model="tiny", layer=1, seed=0, gen_tokens=0)
        out[method] = run(lm, CASES, RunContext(s, HP, TEMPLATES, TEXTS), tmp / f"{method}.jsonl")
    return out


def test_update_anatomy_files_and_numbers(runs, tmp_path):
    data = update_anatomy([("rome", runs["rome"]), ("crome", runs["crome"])], tmp_path)
    for f in ("update_anatomy.json", "update_anatomy.md", "update_scatter.png", "denominator_hist.png"):
        assert (tmp_path / f).exists(), f
    saved = json.loads((tmp_path / "update_anatomy.json").read_text())
    by = {(p["method"], p["case_id"]): p for p in saved["points"]}
    for method, recs in runs.items():
        for r in recs:
            assert by[(method, r["case_id"])]["denominator"] == r["denominator"]
    assert saved["medians"]["rome / normal"]["n"] + saved["medians"]["rome / collapsed"]["n"] == 3
    assert data["plots"] == ["update_scatter.png", "denominator_hist.png"]


def test_key_geometry_consistent_with_saved_keys_and_edits(lm, tmp_path):
    data = key_geometry(lm, CASES, context_for(lm, "rome", HP, templates=TEMPLATES), tmp_path)
    for f in ("key_geometry.json", "key_geometry.md", "keys_pca.png", "keys_tsne.png", "keys.npz"):
        assert (tmp_path / f).exists(), f
    npz = np.load(tmp_path / "keys.npz")
    kinds, owners, x = list(npz["kinds"]), list(npz["owners"]), npz["vectors"]
    for case, stats in zip(CASES, data["cases"]):
        rows = [i for i, o in enumerate(owners) if o == case.case_id]
        bare = next(x[i] for i in rows if kinds[i].startswith("k^u"))
        mean = next(x[i] for i in rows if kinds[i].startswith("k̄"))
        prefixed = [x[i] for i in rows if kinds[i] == "prefixed key"]
        assert len(prefixed) == len(TEMPLATES) - 1
        assert np.allclose(mean, np.mean(prefixed, 0) * (len(TEMPLATES) - 1) / len(TEMPLATES)
                           + bare / len(TEMPLATES), atol=1e-5)  # k̄ averages over all templates, "{}" included
        u = mean / np.linalg.norm(mean)
        assert stats["denominator_rome"] == pytest.approx(float(bare @ u), rel=1e-4)
        edit = compute_edit(lm, case.request, "rome", hparams=HP, templates=TEMPLATES)
        assert stats["denominator_rome"] == pytest.approx(edit.diagnostics.denominator, rel=1e-4)
        assert stats["first_token_subject"] == (case.case_id in ("1", "3"))


def test_first_token_experiment(lm, runs, tmp_path):
    records = [dict(r) for r in runs["rome"]]
    records[0]["collapsed"] = True  # pretend case 1 collapsed
    monitor = PerplexityMonitor(lm, TEXTS, 1)
    ctx = context_for(lm, "rome", HP, templates=TEMPLATES, monitor=monitor)
    data = first_token_experiment(lm, records, {c.case_id: c for c in CASES}, ctx, tmp_path, k=2)
    assert (tmp_path / "first_token.png").exists() and (tmp_path / "first_token.md").exists()
    assert [c["case_id"] for c in data["cases"]][0] == "1" and len(data["cases"]) == 2
    for c in data["cases"]:
        assert c["bare prompt"]["first_token_subject"] and not c["random text first"]["first_token_subject"]
        assert c["prefix"] in [t.replace("{}", "").strip() for t in TEMPLATES]
        assert c["bare prompt"]["denominator"] == pytest.approx(
            next(r["denominator"] for r in records if r["case_id"] == c["case_id"]), rel=1e-5)


def test_prefix_effect_means(runs, tmp_path):
    data = prefix_effect(runs["crome"], tmp_path)
    first = [r for r in runs["crome"] if r["first_token_subject"]]
    t = data["table"]["first-token subject"]["es"]
    assert t["n"] == len(first)
    assert t["without"] == pytest.approx(np.mean([r["metrics"]["es"] for r in first]))
    assert t["with_prefix"] == pytest.approx(np.mean([r["metrics_prefixed"]["es"] for r in first]))
    assert (tmp_path / "prefix_effect.png").exists()


def test_trace_fact_restorations(lm):
    t = trace_fact(lm, "The Eiffel Tower is located in", "Eiffel Tower", "Paris", seed=0)
    n, L = len(t.groups), lm.num_layers
    assert t.groups[-1] == "last token" and "last subject token" in t.groups
    # restoring the last block's output at the last position restores the clean prediction
    assert t.effects["hidden"][L - 1][n - 1] == pytest.approx(t.p_clean - t.p_corrupted, abs=1e-6)
    # positions before the subject are never corrupted: restoring them changes nothing
    first = t.groups.index("first subject token")
    for layer in range(L):
        for pos in range(first):
            assert t.effects["hidden"][layer][pos] == pytest.approx(0.0, abs=1e-6)
    assert set(t.effects) == {"hidden", "mlp", "attn"}


def test_causal_trace_files(lm, tmp_path, monkeypatch):
    facts = [KnownFact("The Eiffel Tower is located in", "Eiffel Tower", "Paris"),
             KnownFact("Toko Yasuda plays the", "Toko Yasuda", "guitar")]
    with pytest.raises(ValueError, match="predicts none"):
        causal_trace(lm, facts, tmp_path, n=2)
    import crome.scoring.measure as measure

    real = measure.score_targets

    def all_known(*a, **k):  # the random tiny model knows nothing: pretend it knows both facts
        scores = real(*a, **k)
        for s in scores:
            s.predicted = list(s.target)
        return scores

    monkeypatch.setattr(measure, "score_targets", all_known)
    data = causal_trace(lm, facts, tmp_path, n=2)
    assert data["n_facts"] == 2 and 0 <= data["mlp_peak_layer_last_subject"] < lm.num_layers
    assert len(data["mean_effect"]["mlp"]) == len(GROUPS)
    assert (tmp_path / "trace_heatmap.png").exists() and (tmp_path / "trace_last_subject.png").exists()


def _g(case_id, ratio, collapsed, data="train.json"):
    return dict(case_id=str(case_id), method="rome", update_ratio=ratio, denominator=1 / ratio, cos_bare_mean=0.5,
                finite=True, collapsed=collapsed, ppl_ratio=100.0 if collapsed else 1.0, data=data)


def test_guard_calibration_and_held_out_scores(tmp_path):
    calib = [_g(i, r, c) for i, (r, c) in enumerate([(0.1, False), (0.2, False), (0.5, False), (2.0, True), (4.0, True)])]
    rule = calibrate(calib)
    assert rule.above and 0.5 < rule.threshold < 2.0
    test = [_g(10 + i, r, c, "val.json") for i, (r, c) in enumerate([(0.3, False), (0.9, False), (3.0, True),
                                                                       (0.8, True)])]
    pr = precision_recall(rule, test)
    expected_tp = sum(r["update_ratio"] > rule.threshold and r["collapsed"] for r in test)
    assert pr["tp"] == expected_tp and pr["recall"] == pytest.approx(expected_tp / 2)
    data = guard_analysis(calib, test, tmp_path)
    assert data["test"]["n"] == 4 and (tmp_path / "guard.png").exists()
    saved = GuardRule.load(tmp_path / "guard_rule.json")  # the rule file --guard-rule reads
    assert (saved.feature, saved.threshold, saved.above) == (rule.feature, rule.threshold, rule.above)
    assert saved.model == calib[0].get("model") and "edits" in saved.calibration
    with pytest.raises(ValueError, match="share"):
        guard_analysis(calib, calib, tmp_path)


def test_guard_refuse_and_fallback(lm):
    req = CASES[0].request
    before = lm.mlp_out(1).weight.detach().clone()
    always = GuardRule("update_ratio", 0.0, above=True)
    with pytest.raises(GuardRefused) as e:
        guarded_apply(lm, req, "rome", "refuse", rule=always, hparams=HP, templates=TEMPLATES)
    assert e.value.exit_code == 3 and "update_ratio" in str(e.value)
    assert torch.equal(lm.mlp_out(1).weight, before)
    never = GuardRule("update_ratio", 1e9, above=True)
    verifier = Verifier(lm, 1, ["A short text.", "Another short text here."], threshold=1e9, efficacy=False)
    edit, handle, decision = guarded_apply(lm, req, "rome", "fallback", rule=never, verifier=verifier, hparams=HP,
                                           templates=TEMPLATES)
    assert edit.method == "rome" and decision.guard_predicted_collapse is False and handle is not None
    handle.restore()
    edit, handle, decision = guarded_apply(lm, req, "rome", "refuse", rule=never, hparams=HP, templates=TEMPLATES)
    assert edit.method == "rome" and decision.guard_predicted_collapse is False
    handle.restore()
    assert torch.equal(lm.mlp_out(1).weight, before)


def test_report_has_every_section_and_image(runs, lm, tmp_path):
    update_anatomy([("rome", runs["rome"]), ("crome", runs["crome"])], tmp_path)
    key_geometry(lm, CASES, context_for(lm, "rome", HP, templates=TEMPLATES), tmp_path)
    prefix_effect(runs["crome"], tmp_path)
    calib = [_g(i, r, c) for i, (r, c) in enumerate([(0.1, False), (3.0, True)])]
    guard_analysis(calib, [_g(9, 5.0, True, "val.json")], tmp_path)
    out = tmp_path / "report.html"
    res = CliRunner().invoke(main, ["report", str(tmp_path), "-o", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    present = ["update_anatomy", "key_geometry", "prefix_effect", "guard"]
    for name, title, _ in SECTIONS:
        if name in present:
            assert f"id='{name}'" in page and title in page
    assert "Not in this folder" in page and "First-token experiment" in page  # the sections not run are named
    plots = [p for n in present for p in json.loads((tmp_path / f"{n}.json").read_text())["plots"]]
    images = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([^']+)'", page)
    assert sorted(a for a, _ in images) == sorted(plots)
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for _, b in images)
    assert "http://" not in page and "https://" not in page  # opens offline
    (tmp_path / "keys_pca.png").unlink()
    with pytest.raises(FileNotFoundError, match="keys_pca.png"):
        build_report(tmp_path, out)


def test_analyze_cli_rejects_non_results(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"a": 1}\n')
    res = CliRunner().invoke(main, ["analyze", "update", str(bad), "--out-dir", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not a crome eval results file" in res.output
