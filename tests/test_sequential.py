"""Sequential runs that last: checkpointed factors, a resume after a kill, MEMIT batches, the guard."""

from __future__ import annotations

import pytest
import torch
from conftest import FLAT, HP, TEMPLATES, TEXTS, settings, stats_for, tiny_model, write

from crome import CromeError
from crome.editing.context import RunContext
from crome.editing.hparams import Hparams
from crome.editing.verify import Verifier
from crome.editing.weights import weights_sha
from crome.evaluation.checkpoint import FactorStore
from crome.evaluation.datasets import load_cases
from crome.evaluation.evaluate import run
from crome.evaluation.results import ResultsFile

MORE = [dict(FLAT[i % len(FLAT)], case_id=10 + i) for i in range(6)]
MEMIT_HP = Hparams(layer=1, v_steps=3, memit_layers=(0, 1), mom2_update_weight=3.0)


class Killed(Exception):
    pass


def killing_after(n):
    """A progress wrapper that stops the run when case n + 1 is about to be worked on."""
    def progress(items, total, description):
        for i, item in enumerate(items):
            if i == n:
                raise Killed
            yield item
    return progress


def killed_and_resumed(lm, cases, ctx, tmp_path, kill_at=3):
    """An uninterrupted run and one killed before case ``kill_at + 1`` and resumed, each with a fresh
    context ``ctx()``: (the uninterrupted run's records, its results file, the resumed one's). The two
    results files are checked byte for byte."""
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    reference = run(lm, cases, ctx(), whole)
    with pytest.raises(Killed):
        run(lm, cases, ctx(), part, progress=killing_after(kill_at))
    assert 0 < len(ResultsFile(part).read()) < len(cases)
    run(lm, cases, ctx(), part, resume=True)
    assert part.read_bytes() == whole.read_bytes()
    return reference, whole, part


def final_weights(lm, out, layers):
    """The weights after the last update of a finished run: replayed from its checkpoint."""
    from crome.evaluation.checkpoint import replay

    store = FactorStore(out)
    before = {x: lm.mlp_out(x).weight.detach().clone() for x in layers}
    replay(lm, [store.read(n) for n in store.updates()])
    after = {x: lm.mlp_out(x).weight.detach().clone() for x in layers}
    with torch.no_grad():
        for x in layers:
            lm.mlp_out(x).weight.copy_(before[x])
    return after


@pytest.mark.parametrize("model_type, method, hp, kill_at", [
    ("llama", "rome", HP, 2), ("gpt2", "crome", HP, 4), ("llama", "cmemit", MEMIT_HP, 3)])
def test_a_killed_sequential_run_resumes_to_the_same_weights_and_records(tokenizer, tmp_path, model_type, method,
                                                                         hp, kill_at):
    lm = tiny_model(model_type, tokenizer)
    batch = method.endswith("memit")
    layers = hp.memit_layers if batch else (hp.layer,)
    stats = stats_for(lm, layers) if batch else None
    s = settings(method=method, sequential=True, monitor_every=2, batch_size=2 if batch else 1)
    cases = load_cases(write(tmp_path, MORE)).cases
    w0 = {x: lm.mlp_out(x).weight.detach().clone() for x in layers}
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    reference = run(lm, cases, RunContext(s, hp, TEMPLATES, TEXTS, stats=stats), whole)
    with pytest.raises(Killed):
        run(lm, cases, RunContext(s, hp, TEMPLATES, TEXTS, stats=stats), part, progress=killing_after(kill_at))
    assert all(torch.equal(lm.mlp_out(x).weight, w0[x]) for x in layers)     # the kill left W as it was
    assert 0 < len(ResultsFile(part).read()) < len(cases)
    run(lm, cases, RunContext(s, hp, TEMPLATES, TEXTS, stats=stats), part, resume=True)
    assert part.read_bytes() == whole.read_bytes()                             # every record, every field, exactly
    a, b = final_weights(lm, whole, layers), final_weights(lm, part, layers)
    assert all(torch.equal(a[x], b[x]) and not torch.equal(a[x], w0[x]) for x in layers)
    assert len({r["weights_sha"] for r in reference}) == len(FactorStore(whole).updates())
    if batch:
        assert [r["update"] for r in reference] == [1, 1, 2, 2, 3, 3] and reference[0]["batch_size"] == 2


def test_an_update_cut_off_before_its_records_runs_again(tokenizer, tmp_path, monkeypatch):
    """Killed between writing update 3's factors and its record: the resume drops update 3 and redoes it."""
    lm = tiny_model("llama", tokenizer)
    s = settings(sequential=True)
    cases = load_cases(write(tmp_path, MORE)).cases
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    reference = run(lm, cases, RunContext(s, HP, TEMPLATES, TEXTS), whole)
    real_append, calls = ResultsFile.append, []

    def append(self, record):
        if self.path == part and "weights_sha" in record:
            calls.append(record)
            if len(calls) == 3:
                raise Killed
        real_append(self, record)

    monkeypatch.setattr(ResultsFile, "append", append)
    with pytest.raises(Killed):
        run(lm, cases, RunContext(s, HP, TEMPLATES, TEXTS), part)
    assert FactorStore(part).updates() == [1, 2, 3] and len(ResultsFile(part).read()) == 2
    monkeypatch.setattr(ResultsFile, "append", real_append)
    run(lm, cases, RunContext(s, HP, TEMPLATES, TEXTS), part, resume=True)
    assert part.read_bytes() == whole.read_bytes() and len(reference) == len(cases)


def test_a_checkpoint_that_does_not_give_the_recorded_weights_is_refused(tokenizer, tmp_path):
    lm = tiny_model("llama", tokenizer)
    s = settings(sequential=True)
    cases = load_cases(write(tmp_path, MORE)).cases
    out = tmp_path / "seq.jsonl"
    with pytest.raises(Killed):
        run(lm, cases, RunContext(s, HP, TEMPLATES, TEXTS), out, progress=killing_after(3))
    store = FactorStore(out)
    saved = store.read(2)
    a, b = saved["layers"][1]
    store.write(2, saved["case_ids"], {1: (a * 1.001, b)})
    w0 = lm.mlp_out(1).weight.detach().clone()
    with pytest.raises(CromeError, match="checkpoint does not give the weights"):
        run(lm, cases, RunContext(s, HP, TEMPLATES, TEXTS), out, resume=True)
    assert torch.equal(lm.mlp_out(1).weight, w0)


def test_the_guard_keeps_a_sequential_run_under_its_threshold(tokenizer, tmp_path):
    """verify in a sequential run: edits that would push probe perplexity past the threshold are
    rolled back and recorded as such; the kept edits keep it under, at every step."""
    lm = tiny_model("llama", tokenizer)
    hp = Hparams(mom2_adjustment=False, layer=1, v_steps=6, v_lr=2.0, clamp_norm_factor=40.0)
    cases = load_cases(write(tmp_path, MORE)).cases
    free = run(lm, cases, RunContext(settings(sequential=True), hp, TEMPLATES, TEXTS), tmp_path / "free.jsonl")
    worst = max(r["ppl_ratio"] for r in free)
    threshold = 1 + (worst - 1) / 3          # a threshold the unguarded run crosses
    assert worst > threshold
    verifier = Verifier(lm, 1, TEXTS, threshold)
    guarded = run(lm, cases, RunContext(settings(sequential=True, guard="verify", guard_threshold=threshold), hp, TEMPLATES, TEXTS, verifier=verifier), tmp_path / "guarded.jsonl")
    refused = [r for r in guarded if not r["applied"]]
    assert refused and all(r["guard_action"] == "rolled back" and "rolled back" in r["error"] for r in refused)
    assert all(r["guard_ppl_ratio"] <= threshold for r in guarded if r["applied"])
    # every step is measured, a rolled-back one too: it keeps the perplexity of the step before, bit for bit
    assert all(r["ppl_ratio"] <= threshold * 1.0001 for r in guarded)
    for before, r in zip([None, *guarded], guarded):
        if not r["applied"]:
            assert r["ppl_after"] == (before["ppl_after"] if before else r["ppl_before"])
    assert guarded[-1]["n_applied"] == len(cases) - len(refused)


def test_retained_efficacy_has_its_own_cadence_which_a_resume_may_change(tokenizer, tmp_path):
    """--retained-every: retained efficacy (whose cost grows with the edits) at its own steps, the
    perplexity at --monitor-every's; a resumed run may change either (each record says which), not
    the method."""
    lm = tiny_model("llama", tokenizer)
    cases = load_cases(write(tmp_path, MORE)).cases
    out = tmp_path / "seq.jsonl"
    with pytest.raises(Killed):
        run(lm, cases, RunContext(settings(sequential=True, retained_every=3), HP, TEMPLATES, TEXTS), out, progress=killing_after(4))
    first = ResultsFile(out).read()
    assert [r["ppl_after"] is not None for r in first] == [True] * 4
    assert [r["retained_efficacy"] is not None for r in first] == [False, False, True, False]
    with pytest.raises(CromeError, match="holds a run with method='rome'"):
        run(lm, cases, RunContext(settings(method="crome", sequential=True), HP, TEMPLATES, TEXTS), out, resume=True)
    records = run(lm, cases, RunContext(settings(sequential=True, monitor_every=2), HP, TEMPLATES, TEXTS), out, resume=True)
    assert records[:4] == first
    assert [r["ppl_after"] is not None for r in records[4:]] == [False, True]   # edit 6: every 2nd and the last
    assert [r["retained_efficacy"] is not None for r in records[4:]] == [False, True]
    assert [(r["monitor_every"], r["retained_every"]) for r in records] == [(1, 3)] * 4 + [(2, 0)] * 2
    assert all(0 <= r["retained_efficacy"] <= 1 for r in records if r["retained_efficacy"] is not None)


def test_memit_needs_batch_methods_for_batch_size(tokenizer, tmp_path):
    lm = tiny_model("llama", tokenizer)
    cases = load_cases(write(tmp_path, MORE)).cases
    with pytest.raises(CromeError, match="batch-size is MEMIT's"):
        run(lm, cases, RunContext(settings(batch_size=2), HP, TEMPLATES, TEXTS), tmp_path / "x.jsonl")
    with pytest.raises(CromeError, match="edits-per-pass"):
        run(lm, cases, RunContext(settings(method="memit"), MEMIT_HP, TEMPLATES, TEXTS), tmp_path / "y.jsonl", edits_per_pass=2)
    assert weights_sha(lm, (0, 1)) == weights_sha(lm, (1, 0))


@pytest.mark.parametrize("where", ["results", "checkpoint"])
def test_a_full_disk_stops_with_one_line_and_a_resume_continues(tokenizer, tmp_path, monkeypatch, where):
    """ENOSPC on the results file (after a short write of half the line) or on a checkpoint: one
    line, no partial JSON line, the weights as they were; with room again, --resume finishes the
    run with the records of an uninterrupted one."""
    import errno
    import os
    import types
    from pathlib import Path

    from crome.evaluation import checkpoint, results

    lm = tiny_model("llama", tokenizer)
    s = settings(sequential=True)
    cases = load_cases(write(tmp_path, MORE)).cases
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    run(lm, cases, RunContext(s, HP, TEMPLATES, TEXTS), whole)
    w0 = lm.mlp_out(HP.layer).weight.detach().clone()
    writes = []

    def full_disk_write(fd, data):
        writes.append(len(data))
        if len(writes) == 3:
            return os.write(fd, bytes(data[: len(data) // 2]))        # a short write ...
        if len(writes) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")    # ... then the disk is full
        return os.write(fd, data)

    def full_disk_save(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "results":
        monkeypatch.setattr(results, "os", types.SimpleNamespace(**{**vars(os), "write": full_disk_write}))
    else:
        real_save, saves = torch.save, []

        def save(obj, f):
            saves.append(f)
            if len(saves) == 3:
                Path(f).write_bytes(b"partial")
                full_disk_save(obj, f)
            real_save(obj, f)

        monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(CromeError) as exc:
        run(lm, cases, RunContext(s, HP, TEMPLATES, TEXTS), part)
    assert "No space left on device" in str(exc.value) and "--resume" in str(exc.value) and "\n" not in str(exc.value)
    assert part.read_bytes().endswith(b"\n") and 0 < len(ResultsFile(part).read()) < len(cases)
    assert not list(FactorStore(part).folder.glob("*.tmp"))
    assert torch.equal(lm.mlp_out(HP.layer).weight, w0)
    monkeypatch.undo()
    run(lm, cases, RunContext(s, HP, TEMPLATES, TEXTS), part, resume=True)
    assert part.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("method, hp", [("crome", HP), ("calphaedit", MEMIT_HP)])
def test_a_long_sequential_run_leaks_no_hooks_and_no_tensors(tokenizer, tmp_path, method, hp):
    """Between edits no hook is left on any module, and the tensors alive after edit 4 are as many
    as after edit 11: what an edit, its measures and its monitor allocate is freed (issue 25)."""
    import gc
    import warnings

    lm = tiny_model("llama", tokenizer)
    batch = method.endswith("alphaedit")
    stats = stats_for(lm, hp.memit_layers) if batch else None
    cases = load_cases(write(tmp_path, [dict(FLAT[i % len(FLAT)], case_id=10 + i) for i in range(12)])).cases
    seen = {}

    def watching(items, total, description):
        for i, item in enumerate(items):
            gc.collect()
            hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                        for m in lm.model.modules())
            with warnings.catch_warnings():   # isinstance on torch's deprecated aliases warns
                warnings.simplefilter("ignore", FutureWarning)
                seen[i] = (hooks, sum(torch.is_tensor(o) for o in gc.get_objects()))
            yield item

    s = settings(method=method, sequential=True, monitor_every=1, gen_tokens=0)
    run(lm, cases, RunContext(s, hp, TEMPLATES, TEXTS, stats=stats), tmp_path / "r.jsonl", progress=watching)
    assert len(seen) == 12 and all(hooks == 0 for hooks, _ in seen.values())
    assert seen[11][1] == seen[4][1], {i: n for i, (_, n) in seen.items()}
