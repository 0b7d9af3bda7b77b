"""Where users look (issue 38): an edit read bare, after a natural sentence, after the test prefix and
through the chat template; in eval records and summaries, in ``crome edit``'s report, and in the
guard's check (the bare prompt always)."""

from __future__ import annotations

import json

import pytest
from conftest import FLAT, HP, TEMPLATES, TEXTS, tiny_model

from crome.editing.efficacy import EfficacyCheck
from crome.editing.records import Efficacy
from crome.request import EditRequest
from crome.scoring.readings import (
    NATURAL_LEAD_INS,
    chat_answer_matches,
    chat_text,
    natural_lead_in,
    readings_rows,
)


@pytest.mark.parametrize("answer, new, old, named", [
    ("Windows 10 was developed by Google.", "Google", "Microsoft", True),
    ("It was Microsoft, not Google.", "Google", "Microsoft", False),          # the old target first
    ("Googleplex is in California.", "Google", "Microsoft", False),           # not as a whole word
    ("the mother tongue is english", "English", "French", True),              # case does not matter
    ("I do not know.", "Google", None, False),
    ("Danielle Darrieux spoke New York English", "New York", None, True),     # several words
])
def test_chat_answer_names_the_new_target_first(answer, new, old, named):
    assert chat_answer_matches(answer, new, old) is named


def test_natural_lead_in_is_a_fixed_sentence_drawn_per_case():
    drawn = {natural_lead_in(0, str(i)) for i in range(40)}
    assert drawn <= set(NATURAL_LEAD_INS) and len(drawn) > 1
    assert natural_lead_in(0, "7") == natural_lead_in(0, "7")
    assert all(s.endswith(".") and s[0].isupper() for s in NATURAL_LEAD_INS)     # a sentence before the prompt


def test_chat_text_uses_the_template_or_says_none(tokenizer):
    text = chat_text(tokenizer, "Paris is the capital of")
    assert "Complete the sentence: Paris is the capital of" in text and text.rstrip().endswith("assistant")

    class Plain:
        chat_template = None

    assert chat_text(Plain(), "Paris is the capital of") is None


def test_efficacy_check_reports_the_first_place_where_it_did_not_take(tokenizer, monkeypatch):
    lm = tiny_model("llama", tokenizer)
    req = EditRequest.create("{} is the capital of", "Paris", "Germany", "France")
    check = EfficacyCheck(lm, req, TEMPLATES)
    took = {"bare": False, "prefix": True}

    def at(place):
        return Efficacy("France", check.prefixes[place], 0.1, 0.9 if took[place] else 0.05, 0.2, place=place)

    monkeypatch.setattr(check, "at", at)
    eff = check.after("crome")
    assert eff.place == "bare" and not eff.took and eff.checked == ["bare", "prefix"]
    assert "on the bare prompt" in eff.reason("Germany")
    took["bare"] = True
    eff = check.after("crome")
    assert eff.took and eff.place == "prefix" and eff.checked == ["bare", "prefix"]
    assert check.after("rome").checked == ["bare"] and check.after("crome", ("prefix",)).checked == ["prefix"]


def test_eval_records_and_summary_read_all_four_places(tokenizer, tmp_path):
    from crome.evaluation.jobs import EvalJob, run_job
    from crome.evaluation.summary import summarize

    data, texts = tmp_path / "cases.json", tmp_path / "texts.txt"
    data.write_text(json.dumps(FLAT))
    texts.write_text("\n".join(TEXTS))
    job = EvalJob(data=str(data), out=str(tmp_path / "out.jsonl"), layer=1, seed=0, mom2=False, gen_em=True,
                  ppl_data=str(texts), gen_tokens=0, hparams={"v_steps": 3})
    records, _, _ = run_job(job, lm=tiny_model("llama", tokenizer))
    applied = [r for r in records if r.get("applied")]
    assert applied
    for r in applied:
        assert r["natural_prefix_text"] in NATURAL_LEAD_INS
        natural = r["metrics_natural"]
        assert {"es", "ps", "gen_em", "gen_em_paraphrase"} <= set(natural) and "ns" not in natural
        assert r["before_natural"]["p_new"] != natural["p_new"]          # measured on the edited model
        assert r["metrics"]["gen_em_chat"] in (0.0, 1.0) and "gen_em_chat_paraphrase" in r["metrics"]
    rows = summarize(records)["all"]
    assert {"ES (natural)", "PS (natural)", "chat EM", "chat EM paraphrase", "ES (prefix)"} <= set(rows)
    assert "S (natural)" not in rows and "S" in rows


def test_eval_leaves_out_the_readings_it_is_told_to_and_resumes_only_with_the_same(tokenizer, tmp_path):
    """``--readings none`` (a long run's cheaper measurements): no natural sentence and no chat reading in the
    records, the bare and prefixed metrics as before; a resume with other readings is refused."""
    from crome.errors import CromeError
    from crome.evaluation.jobs import EvalJob, run_job

    data = tmp_path / "cases.json"
    data.write_text(json.dumps(FLAT))
    out = tmp_path / "out.jsonl"
    job = EvalJob(data=str(data), out=str(out), layer=1, seed=0, mom2=False, gen_em=True, gen_tokens=0,
                  n_cases=1, readings="none", hparams={"v_steps": 3})
    lm = tiny_model("llama", tokenizer)
    records, _, _ = run_job(job, lm=lm)
    r = records[0]
    assert r["applied"] and list(r["readings"]) == []
    assert r["metrics_natural"] is None and r["before_natural"] is None and r["natural_prefix_text"] is None
    assert "gen_em_chat" not in r["metrics"] and {"es", "gen_em"} <= set(r["metrics"])
    assert {"es", "gen_em"} <= set(r["metrics_prefixed"])
    with pytest.raises(CromeError, match="readings"):
        run_job(EvalJob(data=str(data), out=str(out), layer=1, seed=0, mom2=False, gen_em=True, gen_tokens=0,
                        n_cases=2, resume=True, hparams={"v_steps": 3}), lm=lm)
    with pytest.raises(CromeError, match="unknown reading 'chta'"):
        EvalJob(data=str(data), out=str(out), readings="natural,chta")


def test_crome_edit_reports_the_four_places(tokenizer, tmp_path):
    from crome.editing.api import context_for
    from crome.evaluation.report import measure_edit

    lm = tiny_model("llama", tokenizer)
    req = EditRequest.create("{} is the capital of", "Paris", "Germany", "France")
    ctx = context_for(lm, "crome", HP, templates=TEMPLATES)
    report, _ = measure_edit(lm, req, ctx)
    readings = report.readings
    assert list(readings) == ["bare", "natural", "prefix", "chat"]
    assert readings["bare"]["before"]["p_target"] == pytest.approx(report.p_target_before, rel=1e-5)
    assert readings["bare"]["after"]["p_target"] == pytest.approx(report.p_target_after, rel=1e-5)
    assert readings["prefix"]["before"]["text"] == report.test_prefix
    assert readings["natural"]["before"]["text"] in NATURAL_LEAD_INS
    rows = readings_rows(readings)
    assert [r[0].split(" ")[0] for r in rows] == ["P(target)", "P(target)", "P(target)", "answer"]
    assert all(len(r) == 3 for r in rows)


def test_the_where_users_look_table_counts_a_rolled_back_edit_only_in_readings_the_model_has(monkeypatch):
    """A rolled-back edit reads as the unedited model: 0 for a generation reading the model has, nothing
    for one it has not (Gemma 3 has no chat template, so no chat column, whatever ROME rolled back)."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    table_row = importlib.import_module("where_users_look").table_row
    back = {"applied": False, "before": {"es": 0.0}}
    row = table_row([{"applied": True, "metrics": {"es": 1.0, "gen_em": 1.0}}, back])
    assert row["bare gen EM"] == 0.5 and row["bare ES"] == 0.5 and row["chat EM"] is None and row["kept"] == 1
    chat = table_row([{"applied": True, "metrics": {"es": 1.0, "gen_em": 1.0, "gen_em_chat": 1.0}}, back])
    assert chat["chat EM"] == 0.5


def test_the_where_users_look_report_keeps_the_table_of_a_model_whose_records_are_elsewhere(monkeypatch, tmp_path):
    """Writing the report again from one model's records keeps the committed table of a model whose
    records are not here, and replaces the table of the model whose records are."""
    import importlib
    from argparse import Namespace
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    report = importlib.import_module("where_users_look").report
    docs, records = tmp_path / "docs", tmp_path / "records" / "small"
    docs.mkdir()
    records.mkdir(parents=True)
    other = {"splits": {"all": {"rome": {"cases": 200}}}, "first_position": {}, "chat_reference": {}, "paired": {}}
    stale = {**other, "splits": {"all": {"rome": {"cases": 3}}}}
    (docs / "where_users_look.json").write_text(json.dumps({"elsewhere": other, "small": stale}))
    rows = [{"case_id": str(i), "model": "small", "applied": True, "first_token_subject": i == 0,
             "metrics": {"es": 1.0, "gen_em": float(i)}, "ppl_ratio": 1.0} for i in range(2)]
    (records / "rome.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = report(Namespace(out_dir=str(tmp_path / "records"), docs=str(docs)))
    written = json.loads((docs / "where_users_look.json").read_text())
    assert written["elsewhere"] == other and set(written) == {"elsewhere", "small"}
    assert written["small"]["splits"]["all"]["rome"]["cases"] == 2 == out["small"]["splits"]["all"]["rome"]["cases"]
    assert "elsewhere" in (docs / "where_users_look.md").read_text()


def test_the_where_users_look_report_pairs_perplexity_with_crome_s_and_draws_the_trade_off(monkeypatch, tmp_path):
    """The report pairs each method's perplexity ratio with C-ROME's on the cases both kept (a rolled-back
    edit is left out) and draws bare efficacy against perplexity."""
    import importlib
    from argparse import Namespace
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    report = importlib.import_module("where_users_look").report
    docs, records = tmp_path / "docs", tmp_path / "records" / "small"
    docs.mkdir()
    records.mkdir(parents=True)
    ratios = {"crome": [1.0, 1.01, 1.02], "dual": [1.01, 1.03, 9.0]}
    for method, values in ratios.items():
        rows = [{"case_id": str(i), "model": "small", "applied": i < 2 or method == "crome", "ppl_ratio": v,
                 "first_token_subject": True, "metrics": {"es": 1.0, "gen_em": 1.0}} for i, v in enumerate(values)]
        (records / f"{method}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = report(Namespace(out_dir=str(tmp_path / "records"), docs=str(docs)))
    dual = out["small"]["paired_ppl"]["dual"]
    assert dual["n"] == 2 and dual["diff"] == pytest.approx(0.015) and (dual["higher"], dual["lower"]) == (2, 0)
    assert "crome" not in out["small"]["paired_ppl"]
    assert (docs / "where_users_look_tradeoff.png").stat().st_size > 0
    assert "minus crome's" in (docs / "where_users_look.md").read_text()
