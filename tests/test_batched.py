"""Several edits' v* optimised in one batched forward equal the same edits made one at a time."""

from __future__ import annotations

import pytest
from conftest import TEMPLATES, approx_equal, assert_same, tiny_model

from crome import EditRequest, compute_edit, compute_edits
from crome.editing.compute_value import Batch, ReferenceRunner, build_batch
from crome.editing.hparams import Hparams

REQUESTS = [
    EditRequest.create("{} is the capital of", "Paris", "Germany"),                      # first-token subject
    EditRequest.create("The mother tongue of {} is", "Danielle Darrieux", "English"),
    EditRequest.create("{} plays the", "Toko Yasuda", "piano"),
    EditRequest.create("{}, developed by", "Porsche 911", "Honda Motor Company"),        # multi-token target
]


@pytest.mark.parametrize("model_type, runner", [
    *[(m, None) for m in ("gpt2", "llama", "gptj", "gpt_neox", "qwen2", "mistral", "gemma3_text")],
    ("gpt2", ReferenceRunner), ("llama", ReferenceRunner)])
def test_batched_edits_equal_single_edits(tokenizer, model_type, runner):
    lm = tiny_model(model_type, tokenizer)
    hp = Hparams(mom2_adjustment=False, layer=1, v_steps=6)
    many = compute_edits(lm, REQUESTS, "crome", hparams=hp, templates=TEMPLATES, runner_cls=runner)
    for req, edit in zip(REQUESTS, many):
        alone = compute_edit(lm, req, "crome", hparams=hp, templates=TEMPLATES, runner_cls=runner)
        assert edit.request == req
        assert_same(alone, edit)


def test_each_edit_stops_on_its_own(tokenizer):
    """Early stop, per edit: an edit that has stopped keeps its δ while the others go on."""
    lm = tiny_model("llama", tokenizer)
    hp = Hparams(mom2_adjustment=False, layer=1, v_lr=5.0, early_stop_loss=9.65)
    alone = [compute_edit(lm, r, "rome", hparams=hp, templates=TEMPLATES) for r in REQUESTS]
    steps = [e.diagnostics.opt_steps for e in alone]
    assert len(set(steps)) > 1 and min(steps) < hp.v_steps   # the case this test is about
    for a, b in zip(alone, compute_edits(lm, REQUESTS, "rome", hparams=hp, templates=TEMPLATES)):
        assert_same(a, b)


def test_stacked_batch_keeps_each_edits_rows(tokenizer):
    lm = tiny_model("gpt2", tokenizer)
    parts = [build_batch(lm, r, TEMPLATES, ("{} is a",)) for r in REQUESTS[:2]]
    both = Batch.stack(parts)
    n = len(TEMPLATES)
    assert both.rewrite == [n, n] and both.kl == [1, 1] and both.n_rewrite == 2 * n
    assert both.owners() == [0] * n + [1] * n + [0, 1]
    assert both.sequences[:n] == parts[0].sequences[:n] and both.sequences[n:2 * n] == parts[1].sequences[:n]
    assert both.sequences[2 * n:] == [parts[0].sequences[n], parts[1].sequences[n]]
    rows, _, ids = both.target_reads()
    first = len(parts[0].targets[0]) * n
    assert rows[:first] == parts[0].target_reads()[0] and ids[first:] == parts[1].target_reads()[2]


@pytest.mark.integration
def test_batched_edits_on_the_default_model(default_lm):
    hp = Hparams(mom2_adjustment=False, layer=6)
    reqs = REQUESTS[:3]
    for method in ("rome",):
        many = compute_edits(default_lm, reqs, method, hparams=hp)
        for req, edit in zip(reqs, many):
            assert_same(compute_edit(default_lm, req, method, hparams=hp), edit)


# ---------------------------------------------------------------- crome eval --edits-per-pass



def test_edits_per_pass_gives_the_records_of_one_edit_per_pass(tokenizer, tmp_path):
    import json

    from conftest import FLAT, FULL, HP, TEXTS, settings, write

    from crome import CromeError
    from crome.editing.context import RunContext
    from crome.evaluation.datasets import load_cases
    from crome.evaluation.evaluate import run
    from crome.evaluation.results import ResultsFile, timing_path

    lm = tiny_model("llama", tokenizer)
    cases = load_cases(write(tmp_path, [*FLAT, FULL])).cases
    one, three, resumed = tmp_path / "one.jsonl", tmp_path / "three.jsonl", tmp_path / "resumed.jsonl"
    run(lm, cases, RunContext(settings(), HP, TEMPLATES, TEXTS), one)
    run(lm, cases, RunContext(settings(), HP, TEMPLATES, TEXTS), three, edits_per_pass=3)
    run(lm, cases[:1], RunContext(settings(), HP, TEMPLATES, TEXTS), resumed, edits_per_pass=2)   # interrupted, then
    run(lm, cases, RunContext(settings(), HP, TEMPLATES, TEXTS), resumed, resume=True, edits_per_pass=3)  # resumed with another K
    reference = ResultsFile(one).read()
    for out in (three, resumed):
        records = ResultsFile(out).read()
        assert [r["case_id"] for r in records] == [r["case_id"] for r in reference]
        for a, b in zip(reference, records):
            approx_equal(a, b)
    assert [t["edits_per_pass"] for t in ResultsFile(timing_path(three)).read()] == [3] * 4
    assert json.loads(three.read_text().splitlines()[0])["applied"]
    with pytest.raises(CromeError, match="sequential"):
        run(lm, cases, RunContext(settings(sequential=True), HP, TEMPLATES, TEXTS), tmp_path / "s.jsonl", edits_per_pass=2)


# ---------------------------------------------------------------- measuring K edited models in one pass

@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gptj", "gpt_neox", "qwen2", "mistral", "gemma3_text"])
def test_overlay_scores_equal_edits_written_into_the_weights(tokenizer, model_type):
    """Each edit as an activation hook on its own rows (one forward for K edited models) gives the
    numbers of writing its ΔW into W; rows owned by no edit are the unedited model; W is untouched."""
    import torch
    from conftest import TEXTS

    from crome.editing.edit import apply_edit
    from crome.editing.weights import Overlay
    from crome.scoring.measure import sample, score_targets
    from crome.scoring.monitor import PerplexityMonitor

    lm = tiny_model(model_type, tokenizer)
    hp = Hparams(mom2_adjustment=False, layer=1, v_steps=4)
    edits = compute_edits(lm, REQUESTS[:3], "rome", hparams=hp, templates=TEMPLATES)
    pairs = [(r.text(), t) for r in REQUESTS for t in (r.target_new, " France")]
    weights = lm.mlp_out(1).weight.detach().clone()
    monitor = PerplexityMonitor(lm, TEXTS * 3, 1, batch_size=4)
    overlay = Overlay(edits)
    owners = [e for e in range(3) for _ in pairs] + [None] * len(pairs)
    together = score_targets(lm, pairs * 4, overlay=overlay, owners=owners, batch_size=7)
    ppls = monitor.each(overlay, max_rows=8)   # edits spread over several passes
    texts = [sample(lm, ["The city of"], 6, seed=3, overlay=overlay, owner=e) for e in range(3)]
    assert torch.equal(lm.mlp_out(1).weight, weights)

    unedited = score_targets(lm, pairs)
    lp = [x for s in unedited for x in s.logprobs]
    assert [x for s in together[3 * len(pairs):] for x in s.logprobs] == pytest.approx(lp, rel=1e-5)
    moved = 0.0
    for e, edit in enumerate(edits):
        with apply_edit(lm, edit):
            written = score_targets(lm, pairs)
            ppl = monitor()
            text = sample(lm, ["The city of"], 6, seed=3)
        hooked = together[e * len(pairs):(e + 1) * len(pairs)]
        for a, b in zip(written, hooked):
            assert b.logprobs == pytest.approx(a.logprobs, rel=1e-4, abs=1e-5)
            assert b.predicted == a.predicted
        assert ppls[e] == pytest.approx(ppl, rel=1e-4)
        assert texts[e] == text
        moved = max(moved, max(abs(x - y) for s, u in zip(written, unedited) for x, y in zip(s.logprobs, u.logprobs)))
    assert moved > 1e-2   # the edits change the scores: the comparison above is not between unedited models
    assert torch.equal(lm.mlp_out(1).weight, weights)


def test_a_case_measured_with_hooks_equals_it_measured_in_the_weights(tokenizer, tmp_path):
    """evaluate_cases: K cases measured together under an overlay give the records of each case
    with its edit written into W (keep=True, the sequential path)."""
    from conftest import FLAT, FULL, HP, TEXTS, settings, write

    from crome.editing.context import RunContext
    from crome.evaluation.cases import evaluate_cases, prepare_together
    from crome.evaluation.datasets import load_cases
    from crome.scoring.monitor import PerplexityMonitor

    lm = tiny_model("gpt2", tokenizer)
    cases = load_cases(write(tmp_path, [*FLAT, FULL])).cases
    ctx = RunContext(settings(test_prefix="random"), HP, TEMPLATES, monitor=PerplexityMonitor(lm, TEXTS, HP.layer))
    prepared = prepare_together(lm, cases, ctx)
    hooked = evaluate_cases(lm, cases, ctx, prepared_by_id=prepared)
    assert all(h is None for _, h in hooked)
    for case, (rec, _) in zip(cases, hooked):
        [(written, handle)] = evaluate_cases(lm, [case], ctx, keep=True,
                                             prepared_by_id={case.case_id: prepared[case.case_id]})
        handle.restore()
        assert rec.applied and rec.ppl_after is not None
        approx_equal(written.to_dict(), rec.to_dict())
    assert any(rec.fluency for rec, _ in hooked)


def test_overlay_of_edits_at_two_layers_scores_each_as_written_into_w(tokenizer):
    """A guard fallback may move one case's edit to a neighbouring layer: the overlay then hooks both
    layers (zero factors where an edit is not), and the monitor measures from the lowest one."""
    from conftest import TEXTS

    from crome.editing.edit import apply_edit
    from crome.editing.weights import Overlay
    from crome.scoring.measure import score_targets
    from crome.scoring.monitor import PerplexityMonitor

    lm = tiny_model("llama", tokenizer)
    edits = [compute_edits(lm, [r], "crome", hparams=Hparams(mom2_adjustment=False, layer=layer, v_steps=4),
                           templates=TEMPLATES)[0] for r, layer in zip(REQUESTS[:2], (2, 1))]
    pairs = [(r.text(), r.target_new) for r in REQUESTS]
    monitor = PerplexityMonitor(lm, TEXTS, 2)
    overlay = Overlay(edits)
    assert overlay.layers == [1, 2] and overlay.layer == 1
    together = score_targets(lm, pairs * 2, overlay=overlay, owners=[0] * len(pairs) + [1] * len(pairs))
    ppls = monitor.each(overlay)      # layer 1 is below the monitor's: it measures from layer 1 up
    for e, edit in enumerate(edits):
        with apply_edit(lm, edit):
            written, ppl = score_targets(lm, pairs), monitor.at(1)()
        hooked = together[e * len(pairs):(e + 1) * len(pairs)]
        for a, b in zip(written, hooked):
            assert b.logprobs == pytest.approx(a.logprobs, rel=1e-4, abs=1e-5)
        assert ppls[e] == pytest.approx(ppl, rel=1e-4)
    assert monitor.at(1) is monitor.at(1) and monitor.at(1).layer == 1 and monitor.at(2) is monitor
