"""Property-based fuzzing (Hypothesis) of every input crome parses (issue 25). The invariant, for
each: a correct parse or a one-line ``CromeError`` (exit 2 at the CLI): never another exception.

Input classes (13): CounterFact flat, CounterFact full schema, zsRE, request files as JSON and as
JSON lines, sweep TOML specs (and the paths their cells write), guard rule files, results files
(``--resume``, ``summarize``), checkpoint factor files, GGUF headers, delta files, and prompt /
subject / target strings. Examples per class: ``FUZZ_EXAMPLES`` (default 60; the doc's figures use
more). ``pytest tests/test_fuzz.py --hypothesis-show-statistics`` prints the count per test."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from conftest import FLAT, FULL, ZSRE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crome.errors import CromeError

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
odd_strings = st.sampled_from(["", " ", "\n", "{}", "{}{}", "é", "名字", "\x00", "a" * 5000, "Paris", "{} x"]) | st.text()


def mutated(record: dict):
    """A valid record with one field deleted, replaced by any JSON value, or one nested field changed."""
    keys = sorted(record)

    def mutate(choice):
        key, action, value = choice
        out = json.loads(json.dumps(record))
        if action == "delete":
            out.pop(key, None)
        elif action == "nested" and isinstance(out.get(key), dict) and out[key]:
            inner = sorted(out[key])[hash(str(value)) % len(out[key])]
            out[key][inner] = value
        else:
            out[key] = value
        return out

    return st.tuples(st.sampled_from(keys), st.sampled_from(["delete", "set", "nested"]), json_values).map(mutate)


REFUSED = object()


def parsed(parse, *args, **kwargs):
    """``parse(*args, **kwargs)``, or ``REFUSED`` when it raised a one-line ``CromeError``: the
    invariant every test here checks (any other exception fails the test)."""
    try:
        return parse(*args, **kwargs)
    except CromeError as e:
        assert str(e).strip() and "\n" not in str(e).strip()
        return REFUSED


# ------------------------------------------------------------------ datasets

@FUZZ
@given(records=st.lists(mutated(FLAT[0]) | mutated(FULL) | mutated(ZSRE) | json_values, min_size=0, max_size=4),
       skip=st.booleans())
def test_datasets(tmp_path_factory, records, skip):
    from crome.evaluation.datasets import load_cases

    path = tmp_path_factory.mktemp("data") / "cases.json"
    path.write_text(json.dumps(records))
    dataset = parsed(load_cases, path, skip_invalid=skip)
    if dataset is REFUSED:
        return
    for case in dataset.cases:
        assert case.request.subject in case.request.text() and case.request.target_new.strip()


@FUZZ
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_dataset_bytes(tmp_path_factory, raw):
    from crome.evaluation.datasets import load_cases

    path = tmp_path_factory.mktemp("data") / "cases.json"
    path.write_bytes(raw)
    parsed(load_cases, path)


# ------------------------------------------------------------------ request files and strings

request = {"prompt": "{} is the capital of", "subject": "Paris", "target_new": "Rome"}


@FUZZ
@given(rows=st.lists(mutated(request) | json_values, max_size=4), lines=st.booleans(), junk=st.text(max_size=30))
def test_request_files(rows, lines, junk):
    from crome.request import parse_requests

    text = "\n".join(json.dumps(r) for r in rows) if lines else json.dumps(rows)
    for candidate in (text, text + junk, junk):
        requests = parsed(parse_requests, candidate, "requests.json")
        assert requests is REFUSED or all(r.subject in r.text() for r in requests)


@FUZZ
@given(prompt=odd_strings, subject=odd_strings, target=odd_strings)
def test_prompt_subject_target(tokenizer, prompt, subject, target):
    from crome.request import EditRequest, locate

    r = parsed(EditRequest.create, prompt, subject, target)
    located = REFUSED if r is REFUSED else parsed(locate, tokenizer, r)
    if located is REFUSED:
        return
    assert r.subject in r.text() and r.target_new.strip()
    assert 0 <= located.subject_first <= located.subject_last < len(located.ids)


# ------------------------------------------------------------------ sweep specs and where cells write

@FUZZ
@given(grid=st.dictionaries(st.sampled_from(["seed", "method", "layer", "model", "test_prefix", "n_cases", "bogus"]),
                            st.lists(json_values | st.sampled_from(["../x", "/etc", "..", "a/../../b", "~/x", "x\\..\\y"]),
                                     max_size=3), max_size=3),
       extra=st.dictionaries(st.text(max_size=6), json_values, max_size=2))
def test_sweep_specs_and_cell_paths(tmp_path_factory, grid, extra):
    from crome.distribution.sweep import cells

    out = tmp_path_factory.mktemp("sweep")
    (out / "data.json").write_text(json.dumps(FLAT))
    spec = {"defaults": {"data": str(out / "data.json"), **extra}, "grid": grid}
    made = parsed(cells, spec, out)
    if made is REFUSED:
        return
    for cell in made:
        assert Path(cell.job.out).resolve().parent == out.resolve(), cell.job.out


@FUZZ
@given(text=st.text(max_size=200))
def test_sweep_toml_text(tmp_path_factory, text):
    from crome.distribution.sweep import _toml

    path = tmp_path_factory.mktemp("toml") / "spec.toml"
    path.write_text(text)
    parsed(_toml, path)


# ------------------------------------------------------------------ guard rules, results, checkpoints, deltas

rule = {"feature": "denominator", "threshold": 0.5, "above": False, "model": "m", "calibration": "c"}


@FUZZ
@given(data=mutated(rule) | json_values)
def test_guard_rule_files(tmp_path_factory, data):
    from crome.editing.records import Diagnostics
    from crome.editing.rules import GuardRule

    path = tmp_path_factory.mktemp("rule") / "rule.json"
    path.write_text(json.dumps(data))
    loaded = parsed(GuardRule.load, path)
    if loaded is REFUSED:
        return
    assert loaded.feature in Diagnostics.__dataclass_fields__ and isinstance(loaded.above, bool)
    assert isinstance(loaded.threshold, float)


record = {"case_id": "1", "step": 1, "applied": True, "collapsed": False, "first_token_subject": True,
          "metrics": {"es": 1.0, "ps": 0.5, "ns": 0.5}, "ppl_ratio": 1.1, "method": "crome", "model": "m",
          "layer": 1, "seed": 0}


@FUZZ
@given(rows=st.lists(mutated(record) | json_values, max_size=4), tail=st.binary(max_size=20))
def test_results_files(tmp_path_factory, rows, tail):
    from conftest import settings as run_settings

    from crome.evaluation.results import ResultsFile, check_resumable
    from crome.evaluation.summary import summarize

    path = tmp_path_factory.mktemp("results") / "r.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + tail)
    records = parsed(ResultsFile(path).read)
    if records is REFUSED:
        return
    assert all(isinstance(r, dict) for r in records)
    summarize(records)
    parsed(check_resumable, records, run_settings(method="crome", model="m"), path, resume=True)


@FUZZ
@given(payload=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
       structured=st.sampled_from([None, {}, {"layers": 3}, {"layers": {"x": 1}}, {"case_ids": [], "layers": {1: (1, 2)}},
                                   {"case_ids": ["1"], "layers": {}, "keys": {}}]))
def test_checkpoint_factor_files(tmp_path_factory, payload, structured):
    import torch

    from crome.evaluation.checkpoint import FactorStore

    store = FactorStore(tmp_path_factory.mktemp("ck") / "run.jsonl")
    store.folder.mkdir(parents=True, exist_ok=True)
    if structured is None:
        store.path(1).write_bytes(payload)
    else:
        torch.save(structured, store.path(1))
    update = parsed(store.read, 1)
    if update is REFUSED:
        return
    assert isinstance(update["layers"], dict)
    assert all(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) for a, b in update["layers"].values())


@FUZZ
@given(magic=st.sampled_from([b"GGUF", b"GGUG", b"", b"GG"]), version=st.integers(0, 5),
       tensors=st.integers(0, 2**64 - 1) | st.integers(0, 100), entries=st.integers(0, 2**64 - 1) | st.integers(0, 100),
       body=st.integers(0, 5000), cut=st.integers(0, 30))
def test_gguf_headers(tmp_path_factory, magic, version, tensors, entries, body, cut):
    from crome.models import check_gguf_header

    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    raw = magic + struct.pack("<IQQ", version, tensors, entries) + b"\0" * body
    path.write_bytes(raw[: len(raw) - cut] if cut < 24 else raw)
    header = parsed(check_gguf_header, path)
    if header is REFUSED:
        return
    v, n, k = header
    assert v in (2, 3) and 28 * n + 12 * k <= path.stat().st_size


@FUZZ
@given(meta=json_values | mutated({"format": "crome-delta", "version": 1, "model": "m",
                                    "fingerprint": {"weights": "x", "dtype": "float32", "layers": {"1": "y"}},
                                    "edits": [{"requests": [], "method": "crome", "layers": [1]}]}))
def test_delta_files(tmp_path_factory, meta):
    import torch
    from safetensors.torch import save_file

    from crome.editing.delta import read_delta

    path = tmp_path_factory.mktemp("delta") / "d.crome"
    save_file({"edit-0000.layer-01.a": torch.zeros(2, 1), "edit-0000.layer-01.b": torch.zeros(3, 1)}, str(path),
              metadata={"crome_delta": json.dumps(meta)})
    delta = parsed(read_delta, path)
    if delta is REFUSED:
        return
    _, edits = delta
    assert all(isinstance(e.factors, dict) for e in edits)


@pytest.mark.parametrize("value", ["../x", "/etc", "..", "a/../../b"])
def test_sweep_grid_values_never_write_outside_out(tmp_path, value):
    from crome.distribution.sweep import cells

    (tmp_path / "d.json").write_text(json.dumps(FLAT))
    spec = {"defaults": {"data": str(tmp_path / "d.json")}, "grid": {"model": [value, "gpt2"]}}
    for cell in cells(spec, tmp_path / "out"):
        assert Path(cell.job.out).resolve().parent == (tmp_path / "out").resolve()
