"""``crome serve``'s handlers (``serving.session``), the delta file and ``crome apply`` (issue 24),
on a tiny random model: edit, undo any edit, export and re-apply, refusals, bad input, two clients."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import TEXTS, tiny_model

from crome.editing.delta import apply_delta, read_delta
from crome.errors import CromeError
from crome.evaluation.jobs import EvalJob
from crome.scoring.readings import chat_text
from crome.serving.app import numbers_table
from crome.serving.session import EditSession

FACTS = [("{} is the capital of", "Paris", "Germany"), ("{} plays the", "Toko Yasuda", "piano"),
         ("The mother tongue of {} is", "Danielle Darrieux", "English")]
HP = dict(v_steps=3, template_lengths=((2, 2),), template_starts=("The", "I"), memit_layers=(0, 1))


def job(**kw):
    return EvalJob(data="serve", out="", mom2=True, mom2_samples=300, layer=1, gen_tokens=4, hparams=HP, **kw)


@pytest.fixture
def session(tokenizer):
    return EditSession(tiny_model("llama", tokenizer), job(), texts=TEXTS, gen_tokens=4)


def weights(lm) -> list[torch.Tensor]:
    return [lm.mlp_out(x).weight.detach().clone() for x in range(lm.num_layers)]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def replayed(tokenizer, applied) -> list[torch.Tensor]:
    """The weights of a fresh tiny model with the applied edits' factors added in order."""
    from crome.editing.weights import add_factors

    fresh = tiny_model("llama", tokenizer)
    for e in applied:
        for layer, (a, b) in e.delta.factors.items():
            add_factors(fresh, layer, a, b)
    return weights(fresh)


def test_edit_applies_and_reports(session):
    base = weights(session.lm)
    out = session.edit(*FACTS[0], method="crome", guard="off")
    assert out.applied and out.number == 1
    assert out.report["denominator"] and out.report["p_target_after"] > out.report["p_target_before"]
    assert any(line.startswith("denominator") for line in out.diagnostics)
    assert len(out.generations) == 1 and out.generations[0][0] == "Paris is the capital of"
    assert out.ppl_before == pytest.approx(session.ppl_base) and out.ppl_after is not None
    assert not same(base, weights(session.lm))
    assert [h["number"] for h in session.history()] == [1]
    readings = out.report["readings"]                  # where users look, before and after
    assert list(readings) == ["bare", "natural", "prefix", "chat"]
    assert readings["bare"]["after"]["p_target"] == pytest.approx(out.report["p_target_after"], rel=1e-4)
    assert readings["prefix"]["after"]["p_target"] == pytest.approx(out.report["p_target_after_prefixed"], rel=1e-4)
    assert readings["chat"]["before"]["answer"] != readings["chat"]["after"]["answer"] or not out.applied
    rows = numbers_table(out)
    assert any(r[0].startswith("answer through the chat template") for r in rows)


def test_undo_the_middle_edit_equals_the_other_two_applied_fresh(session, tokenizer, tmp_path):
    base = weights(session.lm)
    for fact in FACTS:
        assert session.edit(*fact, method="crome", guard="off").applied
    kept = [e for e in session.applied if e.number != 2]
    session.undo(2)
    assert [h["number"] for h in session.history()] == [1, 3]
    assert same(base, replayed(tokenizer, []))
    assert same(replayed(tokenizer, kept), weights(session.lm))
    session.undo(1)
    session.undo(3)
    assert same(base, weights(session.lm)) and session.history() == []
    assert [e["event"] for e in session.events] == ["edit 1", "edit 2", "edit 3", "undo 2", "undo 1", "undo 3"]
    with pytest.raises(CromeError, match="no edit number 3"):
        session.undo(3)


def test_export_then_apply_gives_the_same_bits_and_refuses_another_model(session, tokenizer, tmp_path):
    session.edit(*FACTS[0], method="crome", guard="off")
    session.edit(*FACTS[1], method="memit", guard="off")
    path = session.export_delta(tmp_path / "edits.crome")
    meta, edits = read_delta(path)
    assert [e.method for e in edits] == ["crome", "memit"] and edits[0].requests[0]["subject"] == "Paris"
    assert meta["fingerprint"]["layers"]
    assert path.endswith("edits.crome") and (tmp_path / "edits.crome").stat().st_size < 200_000
    fresh = tiny_model("llama", tokenizer)
    apply_delta(fresh, path)
    assert same(weights(fresh), weights(session.lm))
    other = tiny_model("llama", tokenizer, seed=1)
    before = weights(other)
    with pytest.raises(CromeError, match="another model"):
        apply_delta(other, path)
    assert same(before, weights(other))


def test_refused_edit_leaves_the_weights(session):
    session.edit(*FACTS[0], method="crome", guard="off")
    before = weights(session.lm)
    ctx = session.context("crome", "verify")
    ctx.verifier.threshold = 1e-6          # every edit now counts as damage: rolled back
    out = session.edit(*FACTS[1], method="crome", guard="verify")
    assert not out.applied and "Rolled back" in out.message and "unchanged" in out.message
    assert same(before, weights(session.lm)) and [h["number"] for h in session.history()] == [1]


@pytest.mark.parametrize("fields, message", [
    (("{} is in", "Rome", ""), "empty target"),
    (("Paris is nice", "Rome", "Italy"), "subject"),
    (("", "Rome", "Italy"), "empty prompt"),
    (("{} is" + "x" * 600, "Rome", "Italy"), "at most 500"),
])
def test_bad_input_is_one_line_and_changes_nothing(session, fields, message):
    before = weights(session.lm)
    with pytest.raises(CromeError, match=message) as exc:
        session.edit(*fields, method="crome", guard="off")
    assert "\n" not in str(exc.value)
    assert same(before, weights(session.lm)) and session.history() == []


def test_bad_method_list_and_question(session):
    with pytest.raises(CromeError, match="unknown method"):
        session.edit(*FACTS[0], method="grace")
    with pytest.raises(CromeError, match="not JSON"):
        session.edit(method="memit", guard="off", batch="{not json")
    with pytest.raises(CromeError, match="question is empty"):
        list(session.ask("  "))
    with pytest.raises(CromeError, match="choose one of typed, chat"):
        list(session.ask("Paris is", 2, through="email"))


def test_ask_streams_the_unedited_and_the_edited_answers(session):
    session.edit(*FACTS[0], method="crome", guard="off")
    steps = list(session.ask("Paris is the capital of", 3))
    assert 1 <= len(steps) <= 3
    base, edited = steps[-1]
    assert all(len(b) >= len(a) for a, b in zip(steps, steps[1:]) for a, b in zip(a, b))
    with session.unedited():
        from crome.scoring.measure import generate

        assert base == generate(session.lm, "Paris is the capital of", len(steps))
    assert edited == generate(session.lm, "Paris is the capital of", len(steps))
    # through the chat template: the question as the user's message, answered after the assistant's tag
    chat_steps = list(session.ask("Paris is the capital of", 3, through="chat"))
    text = chat_text(session.lm.tokenizer, "Paris is the capital of", instruction="{}")
    assert text.rstrip().endswith("<|im_start|>assistant")
    assert chat_steps[-1][1] == generate(session.lm, text, len(chat_steps))


def test_two_clients_editing_at_once_lose_nothing(session, tokenizer):
    errors = []

    def client(facts):
        try:
            for fact in facts:
                session.edit(*fact, method="crome", guard="off")
        except Exception as e:    # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=client, args=(FACTS[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(h["number"] for h in session.history()) == [1, 2, 3]
    assert sorted(h["facts"].split(" → ")[1] for h in session.history()) == sorted(f[2] for f in FACTS)
    assert same(replayed(tokenizer, session.applied), weights(session.lm))   # the history, replayed in order


def test_not_a_delta_file(tmp_path):
    bad = tmp_path / "x.crome"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CromeError, match="not a crome delta file"):
        read_delta(bad)
    with pytest.raises(CromeError, match="no delta file"):
        read_delta(tmp_path / "missing.crome")


def test_crome_apply_rebuilds_the_edited_model_and_refuses_another(tmp_path, tokenizer):
    from click.testing import CliRunner
    from conftest import save_tiny

    from crome.cli import main
    from crome.models import load_model

    folder = save_tiny(tmp_path / "tiny", tokenizer)
    session = EditSession(load_model(str(folder), progress=False), job(model=str(folder)), texts=TEXTS, gen_tokens=4)
    session.edit(*FACTS[0], method="crome", guard="off")
    session.edit(*FACTS[2], method="rome", guard="off")
    delta = session.export_delta(tmp_path / "edits.crome")
    r = CliRunner().invoke(main, ["apply", delta, "--model", str(folder), "--save", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "applied 2 edits (2 facts)" in r.output
    assert same(weights(load_model(str(tmp_path / "out"), progress=False)), weights(session.lm))
    other = save_tiny(tmp_path / "other", tokenizer, "gpt2")
    r = CliRunner().invoke(main, ["apply", delta, "--model", str(other), "--save", str(tmp_path / "out2")])
    assert r.exit_code == 2 and "another model" in r.output and not (tmp_path / "out2").exists(), r.output
    r = CliRunner().invoke(main, ["apply", str(folder / "config.json"), "--save", str(tmp_path / "out3")])
    assert r.exit_code == 2 and "not a crome delta file" in r.output, r.output


def test_a_mangled_delta_file_is_one_line(session, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    session.edit(*FACTS[0], method="crome", guard="off")
    path = session.export_delta(tmp_path / "edits.crome")
    tensors = load_file(path)
    for meta in ({"format": "crome-delta", "version": 1}, {"format": "crome-delta", "version": 1, "edits": [{}]},
                 {"format": "crome-delta", "version": 2}, {"format": "other"}):
        save_file(tensors, str(tmp_path / "bad.crome"), metadata={"crome_delta": json.dumps(meta)})
        with pytest.raises(CromeError) as exc:
            read_delta(tmp_path / "bad.crome")
        assert "\n" not in str(exc.value) and "bad.crome" in str(exc.value)


def test_serve_warns_off_localhost_and_needs_the_ui_extra(tmp_path, monkeypatch):
    import sys

    from click.testing import CliRunner

    from crome.cli import main

    (tmp_path / "f").write_text("")
    r = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--export-dir", str(tmp_path / "f")])
    assert r.exit_code == 2 and "warning: binding 0.0.0.0" in r.output and "names a file" in r.output, r.output
    monkeypatch.setitem(sys.modules, "gradio", None)
    r = CliRunner().invoke(main, ["serve"])
    assert r.exit_code == 2 and "pip install 'crome[ui]'" in r.output, r.output


def test_memory_edits_undo_export_apply_and_save_with_the_same_bits(tmp_path, tokenizer):
    """The gated memory on the page: its edits sit in the history between in-weights ones, undo gives the
    model without them bit for bit, the delta file carries them, and ``crome apply`` (or Export model)
    writes the memory beside the weights, which crome's loader puts back on: the same logits."""
    from click.testing import CliRunner
    from conftest import save_tiny

    from crome.cli import main
    from crome.editing.memory import MEMORY_FILE
    from crome.evaluation.jobs import load
    from crome.models import load_model

    folder = save_tiny(tmp_path / "tiny", tokenizer)
    session = EditSession(load_model(str(folder), progress=False), job(model=str(folder)), texts=TEXTS, gen_tokens=4)
    probes = [f[0].format(f[1]) for f in FACTS] + ["Rivers run to the sea and the sea is wide."]

    def logits(lm):
        return [lm.model(input_ids=torch.tensor([lm.tokenizer(t)["input_ids"]])).logits for t in probes]

    base = logits(session.lm)
    for fact, m in zip(FACTS, ("memory", "crome", "memory")):
        assert session.edit(*fact, method=m, guard="off").applied
    edited = logits(session.lm)
    assert not torch.equal(edited[0], base[0]) and not torch.equal(edited[2], base[2])
    assert session.memory().numbers == [1, 3] and session.history()[0]["layers"] == [1]
    delta = session.export_delta(tmp_path / "edits.crome")
    meta, edits = read_delta(delta)
    assert [e.entry is not None for e in edits] == [True, False, True] and meta["gate"]["layer"] == 1
    r = CliRunner().invoke(main, ["apply", delta, "--model", str(folder), "--save", str(tmp_path / "out")])
    assert r.exit_code == 0 and "2 of them live in the gated memory" in r.output, r.output
    exported = session.export_model(tmp_path / "exported")
    for saved in (tmp_path / "out", exported):
        assert (tmp_path / saved / MEMORY_FILE).is_file()
        again = load(job(model=str(saved)), progress=False)
        assert all(torch.equal(a, b) for a, b in zip(logits(again), edited))
    other = save_tiny(tmp_path / "other", tokenizer, "gpt2")
    r = CliRunner().invoke(main, ["apply", delta, "--model", str(other), "--save", str(tmp_path / "out2")])
    assert r.exit_code == 2 and "another model" in r.output, r.output
    session.undo(3)
    assert session.memory().numbers == [1]
    for number in (1, 2):
        session.undo(number)
    assert all(torch.equal(a, b) for a, b in zip(logits(session.lm), base)) and len(session.memory()) == 0
