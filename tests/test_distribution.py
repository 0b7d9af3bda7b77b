"""crome on Ray: eval over workers, a killed worker, sweeps; dtype, placement and safe loading."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch
from click.testing import CliRunner
from conftest import TEMPLATES, save_tiny, tiny_model

from crome import CromeError
from crome.cli import main
from crome.evaluation.jobs import EvalJob, run_job
from crome.evaluation.results import ResultsFile, timing_path

ray = pytest.importorskip("ray")

FLAT = [
    {"case_id": i, "prompt": p, "subject": s, "target_new": t, "ground_truth": g, "rephrase_prompt": r,
     "locality_prompt": lp, "locality_ground_truth": lg}
    for i, (p, s, t, g, r, lp, lg) in enumerate([
        ("Paris is the capital of", "Paris", "Germany", "France", "The city of Paris is the capital of",
         "Berlin is the capital of", "Germany"),
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French",
         "Danielle Darrieux speaks", "The mother tongue of Jean Gabin is", "French"),
        ("Toko Yasuda plays the", "Toko Yasuda", "piano", "guitar", "Toko Yasuda is known for playing the",
         "Jimi Hendrix plays the", "guitar"),
        ("Apple A5 was created by", "Apple A5", "Google", "Apple", "Apple A5 is made by",
         "iPod was created by", "Apple"),
        ("Rome is the capital of", "Rome", "Spain", "Italy", "The city of Rome is the capital of",
         "Madrid is the capital of", "Spain"),
    ], start=1)
]


@pytest.fixture(scope="module")
def ray_local():
    from crome.distribution.cluster import connect

    connect(num_cpus=2)   # as CI has: two cores
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as a model folder, five cases and a few texts."""
    root = tmp_path_factory.mktemp("dist")
    save_tiny(root / "tiny", tokenizer)
    (root / "data.json").write_text(json.dumps(FLAT))
    (root / "texts.txt").write_text("The cat sat on the mat.\nRivers run to the sea and the sea is wide.\nA short one.\n")
    return root


def job(files, out, **changes):
    base = EvalJob(data=str(files / "data.json"), out=str(out), model=str(files / "tiny"), layer=1, mom2=False,
                   ppl_data=str(files / "texts.txt"), gen_tokens=4, hparams={"v_steps": 3})
    return dataclasses.replace(base, **changes).absolute()


def by_case(out):
    """The records of a results file as written, in case order."""
    return sorted(ResultsFile(out).read(), key=lambda r: int(r["case_id"]))


@pytest.fixture(scope="module")
def one_worker(ray_local, files, tmp_path_factory):
    from crome.distribution.workers import run_workers

    out = tmp_path_factory.mktemp("one") / "r.jsonl"
    run_workers(job(files, out), 1, threads=1)
    return by_case(out)


def test_two_workers_give_the_records_of_one_and_of_no_ray(files, one_worker, tmp_path):
    from crome.distribution.workers import run_workers

    records, setup = run_workers(job(files, tmp_path / "two.jsonl"), 2, threads=1)
    assert len(records) == len(FLAT) and by_case(tmp_path / "two.jsonl") == one_worker
    assert [r["case_id"] for r in ResultsFile(tmp_path / "two.jsonl").read()].count("3") == 1
    workers = {t["worker"] for t in ResultsFile(timing_path(tmp_path / "two.jsonl")).read()}
    assert len(workers) == 2 and os.getpid() not in workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the same arithmetic as a one-thread worker
    try:
        run_job(job(files, tmp_path / "local.jsonl"))
    finally:
        torch.set_num_threads(threads)
    assert by_case(tmp_path / "local.jsonl") == one_worker
    assert setup.settings.dtype == "float32" and one_worker[0]["dtype"] == "float32"


def test_memit_batches_on_workers_give_the_records_of_no_ray(files, tmp_path):
    """A worker is handed a whole MEMIT batch (--batch-size), not --edits-per-pass cases."""
    from crome.distribution.workers import run_workers

    memit = dict(method="cmemit", batch_size=2, mom2=True, mom2_samples=300,
                 hparams={"v_steps": 3, "memit_layers": [0, 1]})
    run_workers(job(files, tmp_path / "w.jsonl", **memit), 2, threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_job(job(files, tmp_path / "local.jsonl", **memit))
    finally:
        torch.set_num_threads(threads)
    workers, local = by_case(tmp_path / "w.jsonl"), by_case(tmp_path / "local.jsonl")
    assert workers == local and len(local) == len(FLAT)
    assert [r["batch_size"] for r in local] == [2] * len(FLAT) and local[0]["layers"] == [0, 1]
    assert [r["update_cases"] for r in local] == [2, 2, 2, 2, 1][:len(FLAT)]
    assert local[0]["ppl_after"] == local[1]["ppl_after"]   # one update for the batch's two cases


def test_resume_with_another_worker_count(files, one_worker, tmp_path):
    from crome.distribution.workers import run_workers

    out = tmp_path / "r.jsonl"
    run_workers(job(files, out, n_cases=2), 2, threads=1)
    first = out.read_bytes()
    with pytest.raises(CromeError, match="--resume"):
        run_workers(job(files, out), 1, threads=1)
    run_workers(job(files, out, resume=True), 1, threads=1)
    assert out.read_bytes().startswith(first) and by_case(out) == one_worker
    with pytest.raises(CromeError, match="seed"):
        run_workers(job(files, out, resume=True, seed=1), 2, threads=1)


def test_a_killed_worker_loses_no_case(files, one_worker, tmp_path):
    from crome.distribution.workers import run_workers

    killed = []

    def kill_third(case, pid):   # kill -9 the worker the third case was just handed to
        if len(killed) == 0 and case.case_id == "3":
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = tmp_path / "r.jsonl"
    run_workers(job(files, out), 2, threads=1, on_dispatch=kill_third)
    assert killed
    ids = [r["case_id"] for r in ResultsFile(out).read()]
    assert sorted(ids, key=int) == [str(c["case_id"]) for c in FLAT]   # every case exactly once
    timing = ResultsFile(timing_path(out)).read()
    retried = [t for t in timing if t["case_id"] == "3"]
    assert len(retried) == 1 and retried[0]["attempt"] == 2 and retried[0]["worker"] != killed[0]
    assert by_case(out) == one_worker


def test_workers_take_several_cases_per_pass(files, one_worker, tmp_path):
    from conftest import approx_equal

    from crome.distribution.workers import run_workers

    out = tmp_path / "k.jsonl"
    run_workers(job(files, out, edits_per_pass=2), 2, threads=1)
    records = by_case(out)
    assert len(records) == len(one_worker)
    for a, b in zip(one_worker, records):
        approx_equal(a, b)
    assert {t["edits_per_pass"] for t in ResultsFile(timing_path(out)).read()} == {2}


def test_workers_refuse_what_they_cannot_do(ray_local, files, tmp_path):
    from crome.distribution.workers import run_workers

    with pytest.raises(CromeError, match="sequential"):
        run_workers(job(files, tmp_path / "s.jsonl", sequential=True), 2)
    with pytest.raises(CromeError, match="needs 3 CPUs"):
        run_workers(job(files, tmp_path / "c.jsonl"), 3, threads=1)
    with pytest.raises(CromeError, match="cannot load model '/no/such/model': no such folder"):
        run_workers(job(files, tmp_path / "m.jsonl", model="/no/such/model"), 1, threads=1)
    assert not (tmp_path / "m.jsonl").exists()


def test_cli_eval_on_workers(ray_local, files, tmp_path):
    out = tmp_path / "cli.jsonl"
    r = CliRunner().invoke(main, ["eval", "--data", str(files / "data.json"), "--model", str(files / "tiny"),
                                  "--layer", "1", "--no-mom2", "--ppl-data", str(files / "texts.txt"), "--n", "2",
                                  "--gen-tokens", "0", "--out", str(out), "--workers", "2", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert len(ResultsFile(out).read()) == 2 and "on 2 workers" in r.output
    r = CliRunner().invoke(main, ["eval", "--data", str(files / "data.json"), "--out", str(tmp_path / "x.jsonl"),
                                  "--threads", "1"])
    assert r.exit_code == 2 and "--workers" in r.output


SPEC = """
[defaults]
data = "{data}"
model = "{model}"
mom2 = false
ppl_data = "{texts}"
n = 2
gen_tokens = 0
hparams = {{ v_steps = 2 }}

[grid]
method = ["rome", "crome"]
layer = [1, 2]
"""


def test_sweep_writes_a_file_per_cell_and_a_rerun_finishes_only_what_is_left(ray_local, files, tmp_path):
    from crome.distribution.sweep import run_sweep

    spec = tmp_path / "grid.toml"
    spec.write_text(SPEC.format(data=files / "data.json", model=files / "tiny", texts=files / "texts.txt"))
    out = tmp_path / "grid"
    outcomes = run_sweep(spec, out, workers=2, threads=1)
    names = ["method-rome_layer-1", "method-rome_layer-2", "method-crome_layer-1", "method-crome_layer-2"]
    assert sorted(outcomes) == sorted(names)
    for name in names:
        recs = ResultsFile(out / f"{name}.jsonl").read()
        assert len(recs) == 2 and {r["layer"] for r in recs} == {int(name[-1])}
        assert {r["method"] for r in recs} == {name.split("_")[0].split("-")[1]}
    # an interruption: one cell cut after its first case, one never started, two finished
    cut, lost = out / f"{names[0]}.jsonl", out / f"{names[1]}.jsonl"
    first_line = cut.read_bytes().splitlines(keepends=True)[0]
    cut.write_bytes(first_line)
    lost.unlink()
    kept = {n: (out / f"{n}.jsonl").read_bytes() for n in names[2:]}
    for n in names:
        timing_path(out / f"{n}.jsonl").unlink(missing_ok=True)
    outcomes = run_sweep(spec, out, workers=2, threads=1)
    assert outcomes[names[2]].state == outcomes[names[3]].state == "finished before"
    assert all((out / f"{n}.jsonl").read_bytes() == b for n, b in kept.items())
    assert cut.read_bytes().startswith(first_line) and len(ResultsFile(cut).read()) == 2
    assert len(ResultsFile(timing_path(cut)).read()) == 1          # only the missing case ran
    assert len(ResultsFile(timing_path(lost)).read()) == 2
    assert not timing_path(out / f"{names[2]}.jsonl").exists()
    r = CliRunner().invoke(main, ["summarize", str(out), "--markdown", str(tmp_path / "grid.md")])
    header = (tmp_path / "grid.md").read_text().splitlines()[0]
    assert r.exit_code == 0 and all(f"({n})" in header for n in names), r.output
    r = CliRunner().invoke(main, ["report", str(out), "-o", str(tmp_path / "grid.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "grid.html").read_text()
    assert "Eval runs" in page and names[3] in page


def test_a_partial_sequential_cell_is_run_anew(ray_local, files, tmp_path):
    from crome.distribution.sweep import run_sweep

    spec = tmp_path / "seq.toml"
    spec.write_text(SPEC.format(data=files / "data.json", model=files / "tiny", texts=files / "texts.txt")
                    .replace('layer = [1, 2]', 'layer = [1]\nsequential = [true]').replace('method = ["rome", "crome"]',
                                                                                      'method = ["crome"]'))
    out = tmp_path / "seq"
    run_sweep(spec, out, workers=1, threads=1)
    cell = out / "method-crome_layer-1_sequential-on.jsonl"
    full = ResultsFile(cell).read()
    assert [r["step"] for r in full] == [1, 2] and all(r["sequential"] for r in full)
    cell.write_bytes(cell.read_bytes().splitlines(keepends=True)[0])   # killed after its first edit
    run_sweep(spec, out, workers=1, threads=1)
    assert ResultsFile(cell).read() == full
    assert len(ResultsFile(str(cell) + ".partial").read()) == 1


def test_sweep_spec_errors_are_one_line(tmp_path):
    from crome.distribution.sweep import cells

    with pytest.raises(CromeError, match="non-empty list"):
        cells({"defaults": {"data": "x.json"}, "grid": {"method": "rome"}}, tmp_path)
    with pytest.raises(CromeError, match="unknown eval option 'lr'"):
        cells({"defaults": {"data": "x.json", "lr": 1}, "grid": {}}, tmp_path)
    with pytest.raises(CromeError, match="no data"):
        cells({"grid": {"seed": [0, 1]}}, tmp_path)
    spec = tmp_path / "bad.toml"
    spec.write_text("[grid\n")
    r = CliRunner().invoke(main, ["sweep", str(spec), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not valid TOML" in r.output


# ---------------------------------------------------------------- dtype, placement, loading

def test_bfloat16_edit_points_where_float32_does(tokenizer):
    from crome.editing.api import compute_edit
    from crome.editing.hparams import Hparams
    from crome.request import EditRequest

    req = EditRequest(prompt="{} is the capital of", subject="Paris", target_new="Germany")
    hp = Hparams(layer=1, mom2_adjustment=False)
    for model_type in ("llama", "gpt2"):
        lm = tiny_model(model_type, tokenizer)
        full = compute_edit(lm, req, "crome", hparams=hp, templates=TEMPLATES)
        lm.model.to(torch.bfloat16)
        half = compute_edit(lm, req, "crome", hparams=hp, templates=TEMPLATES)
        assert half.delta_w.dtype == torch.bfloat16 and half.vectors.v_star.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(full.delta_w.flatten(), half.delta_w.float().flatten(), dim=0)
        assert cos > 0.99, (model_type, float(cos))


def test_a_float64_model_is_edited_and_measured_in_float64(tokenizer):
    """float64 (for numerical checks, the golden records) is kept, not narrowed to float32: keys,
    v*, the update and the log-probs; the same edit in float32 stays float32 and points the same way."""
    from crome.editing.api import compute_edit
    from crome.editing.hparams import Hparams
    from crome.request import EditRequest

    req = EditRequest(prompt="{} is the capital of", subject="Paris", target_new="Germany")
    hp = Hparams(layer=1, mom2_adjustment=False)
    lm = tiny_model("gpt2", tokenizer)
    single = compute_edit(lm, req, "crome", hparams=hp, templates=TEMPLATES)
    lm.model.to(torch.float64)
    double = compute_edit(lm, req, "crome", hparams=hp, templates=TEMPLATES)
    assert single.delta_w.dtype == single.vectors.v_star.dtype == torch.float32
    assert double.delta_w.dtype == double.vectors.v_star.dtype == double.vectors.u.dtype == torch.float64
    hidden = lm.model.base_model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert lm.logits(hidden).dtype == torch.float64       # what score_targets and the perplexity read
    cos = torch.nn.functional.cosine_similarity(single.delta_w.double().flatten(), double.delta_w.flatten(), dim=0)
    assert cos > 0.999, float(cos)
    # its own caches (templates, key statistics): a float64 copy of a float32 model has another identity
    from crome.models import from_modules

    assert from_modules(lm.model, tokenizer).identity != tiny_model("gpt2", tokenizer).identity
    assert tiny_model("gpt2", tokenizer).identity == tiny_model("gpt2", tokenizer).identity


def test_bfloat16_run_records_its_dtype(files, tmp_path):
    records, setup, lm = run_job(job(files, tmp_path / "bf16.jsonl", dtype="bfloat16", n_cases=1, gen_tokens=0))
    assert lm.model.dtype == torch.bfloat16
    assert records[0]["dtype"] == "bfloat16" and records[0]["applied"]
    with pytest.raises(CromeError, match="dtype"):   # a float32 run is not resumed in bfloat16
        run_job(job(files, tmp_path / "bf16.jsonl", dtype="float32", n_cases=1, gen_tokens=0, resume=True))


def test_auto_dtype_follows_device_and_size():
    from transformers import AutoConfig

    from crome.models import count_parameters, resolve_dtype

    big = AutoConfig.for_model("llama")             # Llama-2-7B's shape, counted on the meta device
    small = AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                 num_attention_heads=2, vocab_size=1000)
    assert 6.5e9 < count_parameters(big) < 7e9
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu, big) == torch.float32
    assert resolve_dtype("auto", gpu, big) == torch.bfloat16
    assert resolve_dtype("auto", gpu, small) == torch.float32
    assert resolve_dtype("float16", cpu, small) == torch.float16
    with pytest.raises(CromeError, match="unknown dtype"):
        resolve_dtype("int8", cpu, small)


def test_placement_shares_cpus_and_gpus():
    from crome.distribution.cluster import placement

    class Fake:
        def __init__(self, **res):
            self.res = res

        def cluster_resources(self):
            return self.res

    assert placement(Fake(CPU=16), 4).options() == dict(num_cpus=4, num_gpus=0)
    assert placement(Fake(CPU=16), 4).threads == 4
    assert placement(Fake(CPU=16, GPU=4), 4).options() == dict(num_cpus=1, num_gpus=1)
    assert placement(Fake(CPU=16, GPU=4), 2, device_map="auto").options() == dict(num_cpus=1, num_gpus=2)
    with pytest.raises(CromeError, match="needs 8 GPUs"):
        placement(Fake(CPU=16, GPU=4), 8)


def test_pickle_weights_need_allow_pickle(files, tmp_path, tokenizer):
    from crome.models import load_model

    folder = tmp_path / "pickled"
    model = tiny_model("llama", tokenizer).model
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")   # the pickle format of older checkpoints
    tokenizer.save_pretrained(folder)
    assert (folder / "pytorch_model.bin").exists() and not list(folder.glob("*.safetensors"))
    with pytest.raises(CromeError, match="--allow-pickle"):
        load_model(str(folder), device="cpu")
    assert load_model(str(folder), device="cpu", allow_pickle=True).num_layers == 3
    r = CliRunner().invoke(main, ["edit", "--model", str(folder), "--prompt", "{} is in", "--subject", "Paris",
                                  "--target", "Rome", "--layer", "1", "--no-mom2"])
    assert r.exit_code == 2 and "--allow-pickle" in r.output and len(r.output.strip().splitlines()) == 1


def test_device_map_auto_loads_and_edits(files):
    from crome.editing.api import compute_edit
    from crome.editing.edit import apply_edit
    from crome.editing.hparams import Hparams
    from crome.models import load_model
    from crome.request import EditRequest

    lm = load_model(str(files / "tiny"), device_map="auto")
    w = lm.weight(1).detach().clone()
    req = EditRequest(prompt="{} is the capital of", subject="Paris", target_new="Germany")
    edit = compute_edit(lm, req, "crome", hparams=Hparams(layer=1, mom2_adjustment=False, v_steps=3),
                        templates=TEMPLATES)
    handle = apply_edit(lm, edit)
    assert not torch.equal(lm.weight(1), w)
    handle.restore()
    assert torch.equal(lm.weight(1), w)
