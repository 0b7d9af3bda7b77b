"""crome eval: datasets, malformed records, resumable runs, sequential editing, summaries."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import DATA, FLAT, FULL, HP, ME_PPL_50, TEMPLATES, TEXTS, ZSRE, settings, tiny_model, write

from crome import CromeError
from crome.cli import main
from crome.editing.context import RunContext
from crome.evaluation.datasets import load_cases, select
from crome.evaluation.evaluate import run
from crome.evaluation.results import ResultsFile, timing_path
from crome.evaluation.summary import side_by_side, summarize, to_csv, to_markdown
from crome.scoring.measure import choose_test_prefix


def test_the_three_formats_load(tmp_path):
    cases = load_cases(write(tmp_path, [FLAT[0], FULL, ZSRE])).cases
    flat, full, zsre = cases
    assert flat.request.prompt == "{} is the capital of" and flat.request.target_true == "France"
    assert flat.paraphrase_prompts == [FLAT[0]["rephrase_prompt"]] and flat.neighborhood_target == "Germany"
    assert full.case_id == "18" and full.request.target_new == "Honda" and full.request.target_true == "Porsche"
    assert full.neighborhood_target == "Porsche" and full.generation_prompts == ["Porsche 911 is sold by"]
    assert zsre.case_id == "2" and zsre.request.target_new == "unmanned aircraft"
    assert zsre.request.target_true == "uniform" and zsre.neighborhood_target == "Shakespeare"


@pytest.mark.skipif(not DATA.exists(), reason="shared data not found")
@pytest.mark.parametrize("name", ["counterfact/counterfact-val.json", "counterfact/counterfact_full_schema.json",
                                  "zsre/zsre_mend_train-1k.json"])
def test_published_files_load(name):
    ds = load_cases(DATA / name, skip_invalid=True)
    assert len(ds.cases) > 0.9 * (len(ds.cases) + len(ds.skipped))


@pytest.mark.parametrize("bad, field", [
    ({"prompt": "Paris is the capital of", "subject": "Paris", "ground_truth": "France"}, "target_new"),
    ({"prompt": "Paris is the capital of", "subject": "Rome", "target_new": "x", "ground_truth": "y"}, "not in prompt"),
    ({"requested_rewrite": {"prompt": "{} is", "subject": "A", "target_new": {"str": ""}, "target_true": "b"}},
     "target_new"),
    ({"foo": 1}, "unknown record format"),
])
def test_malformed_record_names_file_index_and_field(tmp_path, bad, field):
    path = write(tmp_path, [FLAT[0], bad])
    with pytest.raises(CromeError) as e:
        load_cases(path)
    assert str(path) in str(e.value) and "record 1" in str(e.value) and field in str(e.value)
    ds = load_cases(path, skip_invalid=True)
    assert [c.case_id for c in ds.cases] == ["1"] and len(ds.skipped) == 1 and "record 1" in ds.skipped[0]


def test_malformed_file_and_cli_error(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    res = CliRunner().invoke(main, ["eval", "--data", str(tmp_path / "x.json"), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "not a readable JSON file" in res.output
    path = write(tmp_path, [FLAT[0], {"prompt": "a b", "subject": "z", "target_new": "q", "ground_truth": "r"}])
    res = CliRunner().invoke(main, ["eval", "--data", str(path), "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code == 2 and "record 1" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_data_path_from_env(tmp_path, monkeypatch):
    write(tmp_path, FLAT, "cf.json")
    monkeypatch.setenv("CROME_DATA", str(tmp_path))
    assert len(load_cases("cf.json").cases) == 3
    with pytest.raises(CromeError, match="not found"):
        load_cases("missing.json")
    assert [c.case_id for c in select(load_cases("cf.json"), case_ids=["3", "1"])] == ["3", "1"]


def test_test_prefix_modes():
    templates = ["{}", "It rained. {}", "The day was long. {}"]
    assert choose_test_prefix("none", templates, 0, "1") is None
    assert choose_test_prefix("fixed", templates, 0, "1") == "It rained."
    drawn = {choose_test_prefix("random", templates, 0, str(i)) for i in range(20)}
    assert drawn == {"It rained.", "The day was long."}
    assert choose_test_prefix("random", templates, 0, "5") == choose_test_prefix("random", templates, 0, "5")
    with pytest.raises(CromeError):
        choose_test_prefix("sometimes", templates, 0, "1")


@pytest.fixture
def lm(tokenizer):
    return tiny_model("llama", tokenizer)


def test_run_writes_one_record_per_case_and_restores(lm, tmp_path):
    cases = load_cases(write(tmp_path, [*FLAT, FULL])).cases
    w0 = {k: v.clone() for k, v in lm.model.state_dict().items()}
    out = tmp_path / "r.jsonl"
    records = run(lm, cases, RunContext(settings(), HP, TEMPLATES, TEXTS), out)
    assert all(torch.equal(v, w0[k]) for k, v in lm.model.state_dict().items())
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and [json.loads(x)["case_id"] for x in lines] == ["1", "2", "3", "18"]
    for r in records:
        assert r["applied"] and r["error"] is None
        for key in ("es", "ps", "ns", "em", "rewrite_acc", "rephrase_acc", "locality"):
            assert key in r["metrics"] and key in r["metrics_prefixed"]
        assert r["ppl_after"] > 0 and r["ppl_ratio"] == pytest.approx(r["ppl_after"] / r["ppl_before"])
        assert r["denominator"] is not None and r["context_templates"] == TEMPLATES and r["seed"] == 0
        assert r["test_prefix_text"] == "The day was long."
    assert records[3]["fluency"] is not None and records[0]["fluency"] is None
    assert len(ResultsFile(timing_path(out)).read()) == 4


def test_interrupted_then_resumed_run_gives_the_same_file(lm, tmp_path):
    cases = load_cases(write(tmp_path, FLAT)).cases
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    run(lm, cases, RunContext(settings(), HP, TEMPLATES, TEXTS), whole)
    run(lm, cases[:2], RunContext(settings(), HP, TEMPLATES, TEXTS), part)        # "killed" after 2 cases ...
    with open(part, "ab") as f:
        f.write(b'{"case_id": "3", "meth')                              # ... in the middle of a write
    with pytest.raises(CromeError, match="--resume"):
        run(lm, cases, RunContext(settings(), HP, TEMPLATES, TEXTS), part)
    with pytest.raises(CromeError, match="method"):
        run(lm, cases, RunContext(settings(method="crome"), HP, TEMPLATES, TEXTS), part, resume=True)
    records = run(lm, cases, RunContext(settings(), HP, TEMPLATES, TEXTS), part, resume=True)
    assert len(records) == 3
    assert part.read_bytes() == whole.read_bytes()


def test_sequential_run_accumulates_and_restores(lm, tmp_path):
    cases = load_cases(write(tmp_path, FLAT)).cases
    w0 = lm.mlp_out(1).weight.detach().clone()
    out = tmp_path / "seq.jsonl"
    records = run(lm, cases, RunContext(settings(sequential=True, monitor_every=2), HP, TEMPLATES, TEXTS), out)
    assert torch.equal(lm.mlp_out(1).weight, w0)
    assert [r["step"] for r in records] == [1, 2, 3] and [r["n_applied"] for r in records] == [1, 2, 3]
    assert records[0]["ppl_after"] is None and records[0]["retained_efficacy"] is None   # not a monitor step
    assert records[1]["ppl_after"] is not None and 0 <= records[1]["retained_efficacy"] <= 1
    assert records[2]["ppl_after"] is not None  # the last step is always measured
    # the second edit was computed on the model that already held the first (same keys, other W)
    single = run(lm, cases[1:2], RunContext(settings(), HP, TEMPLATES, TEXTS), tmp_path / "single.jsonl")[0]
    assert single["denominator"] == pytest.approx(records[1]["denominator"], rel=1e-5)
    assert single["numerator_norm"] != pytest.approx(records[1]["numerator_norm"], rel=1e-4)
    again = run(lm, cases, RunContext(settings(sequential=True, monitor_every=2), HP, TEMPLATES, TEXTS), out, resume=True)
    assert [r["case_id"] for r in again] == [r["case_id"] for r in records] and torch.equal(lm.mlp_out(1).weight, w0)   # finished: replayed, nothing to add
    assert "first collapsed at edit" in summarize(records)["all"]


def _rec(case_id, first, collapsed, es, ps, ns, ppl=100.0):
    m = dict(es=es, ps=ps, ns=ns, em=0.5, pm=0.1, nm=0.0, rewrite_acc=1.0, rephrase_acc=0.5, locality=1.0)
    return dict(case_id=str(case_id), method="rome", applied=True, first_token_subject=first, collapsed=collapsed,
                ppl_before=50.0, ppl_after=ppl, denominator=1.0, metrics=m, metrics_prefixed=None, fluency=None)


def test_summary_rates_splits_and_formats(tmp_path):
    recs = [_rec(1, True, True, 1, 1, 0.5, 1e5), _rec(2, True, False, 1, 0.5, 1), _rec(3, False, False, 0, 1, 1),
            _rec(4, False, False, 1, 1, 1)]
    s = summarize(recs)
    assert s["all"]["cases"] == "4" and s["first-token subject"]["cases"] == "2"
    assert s["all"]["collapse rate"].startswith("0.250 ±") and s["other subjects"]["collapse rate"].startswith("0.000")
    assert s["all"]["ES"].startswith("0.750")
    assert s["all"]["S"] == f"{3 / (1 / 0.75 + 1 / 0.875 + 1 / 0.875):.3f}"
    assert s["all"]["perplexity after: median"] == "100.000"
    header, rows = side_by_side([("a", recs), ("b", recs[:2])])
    md, csv_text = to_markdown(header, rows), to_csv(header, rows)
    assert md.startswith("| metric | a | b |") and "| collapse rate |" in md
    assert csv_text.splitlines()[0] == "metric,a,b" and "first-token subject" in csv_text
    paths = []
    for name, part in (("a", recs), ("b", recs[:2])):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(str(p))
    res = CliRunner().invoke(main, ["summarize", *paths, "--markdown", str(tmp_path / "t.md"),
                                    "--csv", str(tmp_path / "t.csv")])
    assert res.exit_code == 0, res.output
    assert "collapse rate" in res.output and (tmp_path / "t.md").read_text().count("\n") == len(rows) + 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n')
    res = CliRunner().invoke(main, ["summarize", str(bad)])
    assert res.exit_code == 2 and "not a crome eval results file" in res.output


@pytest.mark.integration
def test_eval_three_counterfact_cases_on_default_model(tmp_path):
    data = DATA / "counterfact" / "counterfact-val.json"
    if not data.exists():
        pytest.skip("shared data not found")
    for method in ("rome", "crome"):
        out = tmp_path / f"{method}.jsonl"
        res = CliRunner().invoke(main, ["eval", "--data", str(data), "--method", method, "--n", "3",
                                        "--ppl-data", str(ME_PPL_50), "--out", str(out)])
        assert res.exit_code == 0, res.output
        recs = ResultsFile(out).read()
        assert len(recs) == 3 and all(r["applied"] for r in recs)
        assert all(r["metrics"]["es"] in (0.0, 1.0) and 0 <= r["metrics"]["locality"] <= 1 for r in recs)
        assert all(math.isfinite(r["ppl_before"]) for r in recs)
        assert sum(r["metrics_prefixed"]["es"] for r in recs) >= 2  # the edits work
        assert "collapse rate" in res.output
