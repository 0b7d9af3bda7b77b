"""The gated edit memory (issue 37): silent on unrelated text, fires on the edit's own key, undo and
resume bit for bit, one more entry in the method table through the same guard and runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FLAT, TEMPLATES, TEXTS, settings, stats_for, tiny_model, write
from test_sequential import MORE, killed_and_resumed

from crome import CromeError, EditRequest
from crome.editing.api import context_for, prepare_edit
from crome.editing.context import RunContext
from crome.editing.guard import guarded
from crome.editing.hparams import Hparams
from crome.editing.memory import MEMORY_FILE, EditMemory, memory_edit, store
from crome.editing.methods import method
from crome.evaluation.checkpoint import FactorStore
from crome.evaluation.datasets import load_cases
from crome.evaluation.options import check_options
from crome.hooks import add_at
from crome.request import locate

HP = Hparams(layer=1, v_steps=3, memory_threshold=0.95)
PARIS = EditRequest.create("{} is the capital of", "Paris", "Germany")
DARRIEUX = EditRequest.create("The mother tongue of {} is", "Danielle Darrieux", "English")


@pytest.fixture
def lm(tokenizer):
    return tiny_model("gpt2", tokenizer, dtype=torch.float64)


def memory_for(lm) -> EditMemory:
    return EditMemory.from_stats(stats_for(lm, [HP.layer])[HP.layer], HP.memory_threshold)


def edit_of(lm, request):
    prepared = prepare_edit(lm, request, hparams=HP, templates=TEMPLATES)
    return memory_edit(lm, prepared, "memory", None)


def logits(lm, text):
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
    return lm.model(input_ids=ids).logits


def test_the_memory_is_silent_on_text_far_from_its_keys(lm):
    memory = memory_for(lm)
    text = "Rivers run to the sea and the sea is wide."
    before = logits(lm, text)
    with memory.attached(lm):
        store(memory, edit_of(lm, PARIS), memory.next_number())
        store(memory, edit_of(lm, DARRIEUX), memory.next_number())
        from crome.hooks import record

        with record(lm.mlp_out(HP.layer)) as rec:
            after = logits(lm, text)
        fire, _ = memory.gate(rec.input)
        assert not bool(fire.any())              # nothing near any key ...
        assert torch.equal(after, before)        # ... so the outputs are the unedited model's, bit for bit


def test_the_memory_fires_at_the_subjects_last_token_with_the_edits_value(lm):
    """On the bare prompt the stored k^u matches itself: W's output there gains δ, as the v*
    optimisation added it, and nowhere else."""
    memory = memory_for(lm)
    edit = edit_of(lm, PARIS)
    text, loc = PARIS.text(), locate(lm.tokenizer, PARIS)
    ids = torch.tensor([loc.ids])
    rows, pos = torch.tensor([0]), torch.tensor([loc.subject_last])
    with add_at(lm.mlp_out(HP.layer), rows, pos, edit.delta):
        want = lm.model(input_ids=ids).logits
    with memory.attached(lm):
        store(memory, edit, memory.next_number())
        got = lm.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-10) and not torch.equal(got, logits(lm, text))


def test_undoing_an_edit_gives_the_model_without_it_bit_for_bit(lm):
    texts = [PARIS.text(), DARRIEUX.text(), "Paris and Danielle Darrieux."]
    a, b = edit_of(lm, PARIS), edit_of(lm, DARRIEUX)
    only_b = memory_for(lm)
    with only_b.attached(lm):
        store(only_b, b, only_b.next_number())
        want = [logits(lm, t) for t in texts]
    both = memory_for(lm)
    with both.attached(lm):
        first = store(both, a, both.next_number())
        store(both, b, both.next_number())
        first.restore()
        got = [logits(lm, t) for t in texts]
        assert len(both) == 1
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_a_non_finite_entry_is_refused_and_the_memory_unchanged(lm):
    memory, edit = memory_for(lm), edit_of(lm, PARIS)
    edit.delta = edit.delta * float("nan")
    with pytest.raises(CromeError, match="non-finite memory entry"):
        store(memory, edit, memory.next_number())
    assert len(memory) == 0


def test_the_memory_method_goes_through_the_guard_and_rolls_back(lm):
    """One entry of the method table, through ``guard.guarded``: verify rolls a refused edit back out
    of the memory."""
    from crome.editing.records import GuardRefused
    from crome.editing.verify import Verifier

    memory = memory_for(lm).attach(lm)
    try:
        ctx = context_for(lm, "memory", HP, templates=TEMPLATES, memory=memory)
        edit, handle, decision = guarded(lm, [PARIS], ctx)
        assert len(memory) == 1 and decision.guard_action == "applied" and edit.record()["memory_keys"] == 2
        handle.restore()
        strict = Verifier(lm, HP.layer, TEXTS, threshold=1e-9)    # any change of perplexity fails it
        ctx = context_for(lm, "memory", HP, templates=TEMPLATES, memory=memory, guard="verify", verifier=strict)
        with pytest.raises(GuardRefused, match="rolled back"):
            guarded(lm, [PARIS], ctx)
        assert len(memory) == 0
    finally:
        memory.detach()
    assert method("memory").in_place and method("memory").test_places == ("bare", "prefix")
    with pytest.raises(CromeError, match="--edits-per-pass"):
        check_options("memory", edits_per_pass=2)


def test_the_api_gives_a_memory_method_its_own_memory(lm):
    """``context_for(lm, "memory")`` without a memory: a new one at the edit layer, on the model, gated with
    that layer's C; without key statistics, one line."""
    from dataclasses import replace

    from crome.scoring.measure import target_probability

    stats = stats_for(lm, [HP.layer])[HP.layer]
    before = target_probability(lm, PARIS.text(), PARIS.target_new)
    ctx = context_for(lm, "memory", HP, templates=TEMPLATES, stats=stats)
    try:
        _, handle, _ = guarded(lm, [PARIS], ctx)
        assert ctx.memory.layer == HP.layer and len(ctx.memory) == 1
        assert target_probability(lm, PARIS.text(), PARIS.target_new) > before
        handle.restore()
        assert len(ctx.memory) == 0 and target_probability(lm, PARIS.text(), PARIS.target_new) == before
    finally:
        ctx.memory.detach()
    with pytest.raises(CromeError, match="needs key statistics"):
        context_for(lm, "memory", replace(HP, mom2_adjustment=False), templates=TEMPLATES)


def test_a_killed_memory_run_resumes_bit_for_bit(lm, tmp_path):
    """Byte-identical records (each carries the memory's hash) and the same entries."""
    stats = stats_for(lm, [HP.layer])
    s = settings(method="memory", sequential=True, monitor_every=2, gen_em=True)
    cases = load_cases(write(tmp_path, MORE)).cases

    def ctx():
        return RunContext(s, HP, TEMPLATES, TEXTS, stats=stats[HP.layer],
                          memory=EditMemory.from_stats(stats[HP.layer], HP.memory_threshold))

    reference, whole, _ = killed_and_resumed(lm, cases, ctx, tmp_path)
    assert all(r["applied"] and "+" in r["weights_sha"] for r in reference)
    entries = [FactorStore(whole).read(n)["entry"] for n in FactorStore(whole).updates()]
    assert [e["number"] for e in entries] == list(range(1, len(cases) + 1))
    assert reference[-1]["metrics"]["es"] >= 0 and json.dumps(reference[-1])


def test_cli_eval_runs_the_memory_method(tokenizer, tmp_path):
    from click.testing import CliRunner
    from conftest import save_tiny

    from crome.cli import main

    folder = save_tiny(tmp_path / "tiny", tokenizer)
    data = write(tmp_path, FLAT)
    out = tmp_path / "m.jsonl"
    r = CliRunner().invoke(main, ["eval", "--data", str(data), "--method", "memory", "--out", str(out), "--model",
                                  str(folder), "--layer", "1", "--mom2-samples", "200", "--sequential", "--gen-em",
                                  "--gen-tokens", "0"])
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 3 and all(x["applied"] and x["memory_keys"] == 2 for x in records)
    r = CliRunner().invoke(main, ["edit", "--prompt", "{} is the capital of", "--subject", "Paris", "--target",
                                  "Germany", "--method", "memory", "--model", str(folder), "--layer", "1",
                                  "--mom2-samples", "200", "--guard", "off", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert report["method"] == "memory" and report["layers"] == [1] and report["update_norm"] == 0.0
    assert report["requests"][0]["p_target_after"] != report["requests"][0]["p_target_before"]
    saved = tmp_path / "saved"
    r = CliRunner().invoke(main, ["edit", "--prompt", "{} is the capital of", "--subject", "Paris", "--target",
                                  "Germany", "--method", "memory", "--model", str(folder), "--layer", "1",
                                  "--mom2-samples", "200", "--guard", "off", "--json", "--save", str(saved)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert (saved / MEMORY_FILE).is_file()
    from crome.evaluation.jobs import EvalJob, load
    from crome.scoring.measure import target_probability

    reloaded = load(EvalJob(data="x", out="", model=str(saved)), progress=False)   # the memory comes back on
    p = target_probability(reloaded, "Paris is the capital of", "Germany")
    assert p == pytest.approx(report["requests"][0]["p_target_after"], rel=1e-5)
    assert p != pytest.approx(report["requests"][0]["p_target_before"], rel=1e-3)


def test_a_key_without_context_needs_the_exact_threshold(lm):
    """A one-token subject at the start: its bare key is a function of that token alone (the first
    position's attention-sink key, alike across texts), so it needs ``memory_exact_threshold``; a key
    with context, and k̄, need ``memory_threshold``. The gate takes the most similar key among those
    whose threshold is reached."""
    from crome.editing.memory import key_thresholds

    tok = lm.tokenizer
    one_token = EditRequest.create("{} is the capital of", "Paris", "Germany")
    assert len(tok(" Paris")["input_ids"]) == 1 and len(tok("Paris")["input_ids"]) == 1
    assert key_thresholds(tok, one_token, HP).tolist() == [HP.memory_exact_threshold, HP.memory_threshold]
    assert key_thresholds(tok, DARRIEUX, HP).tolist() == [HP.memory_threshold] * 2
    memory = EditMemory(1, 0.5, torch.ones(4))
    e = torch.eye(4, dtype=torch.float64)
    memory.add(1, e[0:1], torch.ones(3), torch.tensor([0.999]))
    memory.add(2, e[1:2], 2 * torch.ones(3), torch.tensor([0.5]))
    x = torch.stack([e[0] + 0.3 * e[2], e[0], 0.6 * e[0] + 0.8 * e[1], e[0] + 0.01 * e[2], e[3]])
    fire, owner = memory.gate(x)
    assert fire.tolist() == [False, True, True, True, False]
    assert [memory.numbers[i] for i, f in zip(owner.tolist(), fire.tolist()) if f] == [1, 2, 1]


def test_the_gate_compares_in_the_models_working_precision():
    """Keys are stored as computed (float64 after dividing by √diag C from key statistics); a float32
    model's inputs are compared in float32, the same decisions as in float64 away from the thresholds,
    and a float64 model's in float64."""
    torch.manual_seed(0)
    scale = torch.rand(16, dtype=torch.float64) + 0.5
    memory = EditMemory(1, 0.85, scale)
    stored = torch.randn(40, 16, dtype=torch.float64)
    for n in range(20):
        memory.add(n + 1, stored[2 * n:2 * n + 2], torch.randn(3))
    near = stored[::3] + 0.1 * torch.randn(14, 16, dtype=torch.float64)
    x = torch.cat([near, torch.randn(30, 16, dtype=torch.float64)])
    fire64, owner64 = memory.gate(x)
    assert memory.table("cpu", torch.float64)[0].dtype == torch.float64
    fire32, owner32 = memory.gate(x.float())
    assert set(memory._tables) == {(torch.device("cpu"), torch.float64), (torch.device("cpu"), torch.float32)}
    assert memory.keys[1].dtype == torch.float64
    assert fire64[:14].all() and not fire64[14:].any()
    assert torch.equal(fire32, fire64) and torch.equal(owner32[fire32], owner64[fire64])
