"""Golden records: what every orchestration path writes, frozen before the run code was refactored.

Each scenario runs a real path end to end on a tiny random GPT-2 (independent ROME/C-ROME edits
with one or two per pass, the guard's actions, a sequential run, MEMIT batches, ``crome edit``)
and compares every field of every record with ``tests/golden/<scenario>.json``: strings, flags and
counts exactly, floats to 1e-5 relative. Timings and weight hashes are left out. A change of behaviour fails here;
a deliberate one regenerates the files with ``CROME_GOLDEN_UPDATE=1 pytest tests/test_golden.py``
and says why in its commit.

Float rounding must not move them. In float32 it did: CPUs with other vector units round differently
(torch's random normal draws too), and on a random model (P(target) ~ 1e-5) a 3-step v* turned
those last bits into 1% moves and flipped the guard's "did the edit take" on margins of 0.1%. So
the tiny model is drawn and run in float64 (``--dtype float64`` for ``crome edit``), and it is a
GPT-2, whose forward stays in float64 (Llama's RMSNorm and rotary embedding compute in float32).
The fallback scenarios start at layer 0, so their neighbour is layer 1: at the last layer, δ at
the subject's token has no path to the target's positions, v*'s gradient is rounding noise, and
Adam with the reference's ‖δ‖ weight decay scales that noise to whole steps.
Checked by rerunning every scenario with torch's vector kernels forced to AVX2 and to scalar
(``ATEN_CPU_CAPABILITY``), MKL pinned to AVX2 (``MKL_CBWR``) and one thread: no field moved by 1e-5.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FLAT, FULL, save_tiny, tiny_model

GOLDEN = Path(__file__).parent / "golden"
# left out: timings, and the hash of the edited weights' bits, which moves with the summation order of the
# thread count (a resumed run checks it against its own weights: test_sequential.py)
VOLATILE = {"edit_seconds", "seconds", "v_seconds", "stats_seconds", "weights_sha"}
# CounterFact's three flat records and a full-schema one (one paraphrase, no attribute prompts)
CASES = [*FLAT, dict(FULL, paraphrase_prompts=FULL["paraphrase_prompts"][:1], attribute_prompts=[])]
TEXTS = "The cat sat on the mat.\nRivers run to the sea and the sea is wide.\nA short one about the weather.\n"
CORPUS = " ".join(["Some ordinary text about cities, rivers, people and the things they make."] * 40)

ARCH, DTYPE = "gpt2", torch.float64      # the tiny model (see the docstring)
# scenario: options of EvalJob (on top of: the four cases, layer 1, seed 0, 3 v* steps, 4 tokens of fluency)
SCENARIOS = {
    "crome-verify": dict(method="crome", guard="verify"),
    "rome-two-per-pass": dict(method="rome", edits_per_pass=2, test_prefix="random"),
    "crome-fallback-corpus": dict(method="crome", guard="fallback", mom2=True, layer=0),
    "rome-refuse": dict(method="rome", guard="refuse", guard_rule="RULE"),
    "crome-sequential": dict(method="crome", sequential=True, guard="verify", retained_every=2),
    "memit-batch": dict(method="memit", mom2=True, batch_size=2, guard="verify"),
    "cmemit-sequential": dict(method="cmemit", mom2=True, batch_size=2, sequential=True),
    # issue 23: AlphaEdit one edit per update, with MPES, a norm bound and generation exact match
    "calphaedit-sequential": dict(method="calphaedit", mom2=True, sequential=True, gen_em=True,
                                  hparams=dict(mpes=True, norm_weight=1.0, null_space_energy=0.3)),
}


def _strip(x, tmp: str):
    """Without timings, and with the test's temporary folder written as <tmp>."""
    if isinstance(x, dict):
        return {k: _strip(v, tmp) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, (list, tuple)):
        return [_strip(v, tmp) for v in x]
    return x.replace(tmp, "<tmp>") if isinstance(x, str) else x


def _same(a, b, where="") -> None:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
            assert a == b, f"{where}: {a!r} != {b!r}"
        elif not (math.isnan(a) and math.isnan(b)):
            assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{where}: keys {sorted(set(a) ^ set(b))} differ"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} items != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def environment() -> dict:
    """What float rounding depends on besides crome: the numeric libraries and the CPU's vector units."""
    import platform

    import transformers

    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    return dict(torch=torch.__version__, transformers=transformers.__version__, machine=platform.machine(),
                vector_units=sorted({f for f in flags.split() if f.startswith(("avx", "amx", "fma"))}))


def check_golden(name: str, got, tmp) -> None:
    path, env_path = GOLDEN / f"{name}.json", GOLDEN / "ENVIRONMENT.json"
    got = json.loads(json.dumps(_strip(got, str(tmp))))   # as written: tuples become lists, NaN stays NaN
    if os.environ.get("CROME_GOLDEN_UPDATE"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        env_path.write_text(json.dumps(environment(), indent=1) + "\n")
    assert path.exists(), f"no golden file {path}: run with CROME_GOLDEN_UPDATE=1 once"
    try:
        _same(_strip(json.loads(path.read_text()), "<tmp>"), got, name)
    except AssertionError as e:       # say whether the platform moved, which a refactor's diff never explains
        written = json.loads(env_path.read_text()) if env_path.exists() else None
        if written != environment():
            raise AssertionError(f"{e}\n(the golden records were written on {written}; this is {environment()})") from None
        raise


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "cases.json"
    data.write_text(json.dumps(CASES))
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXTS)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    rule = tmp_path / "rule.json"
    rule.write_text(json.dumps({"feature": "update_ratio", "threshold": 0.22, "above": True}))
    return dict(data=data, texts=texts, corpus=corpus, rule=rule)


@pytest.mark.parametrize("name", SCENARIOS)
def test_eval_records_are_unchanged(name, tokenizer, files, tmp_path):
    from crome.evaluation.jobs import EvalJob, run_job

    opts = dict(SCENARIOS[name])
    if opts.pop("mom2", False):
        opts["mom2_corpus"] = str(files["corpus"])
        opts["mom2_samples"] = 400
    else:
        opts["mom2"] = False
    if opts.get("guard_rule") == "RULE":
        opts["guard_rule"] = str(files["rule"])
    batch = opts["method"].endswith(("memit", "alphaedit"))
    hp = {"v_steps": 3, **({"memit_layers": (0, 1)} if batch else {}), **opts.pop("hparams", {})}
    job = EvalJob(data=str(files["data"]), out=str(tmp_path / "out.jsonl"), layer=opts.pop("layer", 1), seed=0,
                  ppl_data=str(files["texts"]), gen_tokens=4, guard_probe=str(files["texts"]), hparams=hp, **opts)
    lm = tiny_model(ARCH, tokenizer, dtype=DTYPE)
    records, _, _ = run_job(job, lm=lm)
    check_golden(name, records, tmp_path)


@pytest.mark.parametrize("method, guard", [("crome", "off"), ("crome", "verify"), ("rome", "fallback"),
                                           ("cmemit", "verify")])
def test_crome_edit_json_is_unchanged(method, guard, tokenizer, files, tmp_path):
    from crome.cli import main
    from crome.models import dtype_name

    folder = save_tiny(tmp_path / "tiny", tokenizer, ARCH, DTYPE)
    layer = "0" if guard == "fallback" else "1"     # see the module's docstring
    args = ["edit", "--model", str(folder), "--dtype", dtype_name(DTYPE), "--layer", layer, "--no-mom2", "--ppl-data", str(files["texts"]),
            "--guard-probe", str(files["texts"]), "--method", method, "--guard", guard, "--json"]
    if method.endswith("memit"):
        requests = tmp_path / "requests.jsonl"
        requests.write_text("".join(json.dumps(dict(prompt=c["prompt"], subject=c["subject"],
                                                    target_new=c["target_new"])) + "\n" for c in CASES[:2]))
        args = [a for a in args if a != "--no-mom2"] + ["--requests", str(requests), "--mom2-corpus",
                                                        str(files["corpus"]), "--mom2-samples", "400",
                                                        "--memit-layers", "0-1"]
    else:
        args += ["--prompt", "{} is the capital of", "--subject", "Paris", "--target", "Germany"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 3), result.output
    check_golden(f"edit-{method}-{guard}", dict(exit_code=result.exit_code, result=json.loads(result.stdout)
                                        if result.exit_code == 0 else result.stderr.strip()), tmp_path)
