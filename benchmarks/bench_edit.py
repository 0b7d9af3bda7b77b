"""Reference vs fast path on the default model, in one process.

    python benchmarks/bench_edit.py [--n 3] [--layer 6] [--cases 3] \
        [--ppl-data ../shared/data/me-ppl/ME-PPL_50.json] [--data ../shared/data/counterfact/counterfact-val.json]

Prints, for the same requests and context templates:
* seconds per edit on the reference and the fast v* path, the speed-up, and the
  largest relative difference of v* and ΔW between them;
* seconds per post-edit perplexity check (plain vs monitor) and their difference;
* seconds per full CounterFact case (edit, every metric, perplexity, restore), as
  ``crome eval`` runs it;
* a cold model load (GGUF conversion into an empty cache) vs a cached one;
* peak resident memory of this process.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import torch

from crome import EditRequest, apply_edit, compute_edit, load_model
from crome.editing.compute_value import ReferenceRunner
from crome.editing.context import RunContext, RunSettings
from crome.editing.fast import FastRunner
from crome.editing.hparams import defaults_for
from crome.editing.templates import context_templates
from crome.evaluation.cases import evaluate_case
from crome.evaluation.datasets import load_cases
from crome.scoring.measure import perplexity
from crome.scoring.monitor import PerplexityMonitor
from crome.scoring.texts import load_texts

REQUESTS = [
    ("{} is the capital of", "Paris", "Germany"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{}, which is located in", "Eiffel Tower", "Rome"),
]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def cold_load() -> float:
    """Load the default model into an empty cache: the GGUF is dequantized and converted."""
    old = os.environ.get("CROME_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CROME_CACHE_DIR"] = tmp
        try:
            _, seconds = timed(lambda: load_model(progress=False))
        finally:
            if old is None:
                del os.environ["CROME_CACHE_DIR"]
            else:
                os.environ["CROME_CACHE_DIR"] = old
    return seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=len(REQUESTS), help="requests (each edited with rome and crome)")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--ppl-data", default=None, help="perplexity texts (default: the bundled corpus)")
    ap.add_argument("--data", default=None, help="CounterFact file for the full-case timing")
    ap.add_argument("--cases", type=int, default=3)
    args = ap.parse_args()

    cold = cold_load()
    lm, cached = timed(lambda: load_model(progress=False))
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, device: {lm.device}")
    print(f"model load: cold (GGUF conversion) {cold:.1f} s, cached {cached:.2f} s")
    hp = defaults_for(lm.name, lm.num_layers).with_(layer=args.layer, mom2_adjustment=False)  # as in docs/SPEED.md
    templates = context_templates(lm, 0, hp.template_lengths, hp.template_starts)

    times = {"reference": [], "fast": []}
    worst_v = worst_w = 0.0
    for prompt, subject, target in REQUESTS[: args.n]:
        req = EditRequest.create(prompt, subject, target)
        for method in ("rome", "crome"):
            edits = {}
            for name, runner in (("reference", ReferenceRunner), ("fast", FastRunner)):
                edits[name], s = timed(lambda: compute_edit(lm, req, method, hparams=hp, templates=templates,
                                                            runner_cls=runner))
                times[name].append(s)
            a, b = edits["reference"], edits["fast"]
            dv = float((a.vectors.v_star - b.vectors.v_star).norm() / a.vectors.v_star.norm())
            dw = float((a.delta_w - b.delta_w).norm() / a.delta_w.norm())
            worst_v, worst_w = max(worst_v, dv), max(worst_w, dw)
            print(f"{method:5} {req.text()!r:45} reference {times['reference'][-1]:5.1f} s  fast "
                  f"{times['fast'][-1]:5.1f} s  rel.diff v* {dv:.1e}  ΔW {dw:.1e}", flush=True)
    ref, fast = statistics.median(times["reference"]), statistics.median(times["fast"])
    print(f"edit, median seconds: reference {ref:.1f}, fast {fast:.1f}, speed-up {ref / fast:.1f}x")
    print(f"max relative difference: v* {worst_v:.1e}, ΔW {worst_w:.1e}")

    texts = load_texts(args.ppl_data)
    monitor, setup = timed(lambda: PerplexityMonitor(lm, texts, hp.layer))
    edit = compute_edit(lm, EditRequest.create(*REQUESTS[0]), "rome", hparams=hp, templates=templates)
    with apply_edit(lm, edit):
        plain, t_plain = timed(lambda: perplexity(lm, texts))
        quick, t_quick = timed(monitor)
    print(f"perplexity after an edit ({len(texts)} texts): plain {t_plain:.2f} s, monitor {t_quick:.2f} s "
          f"(set-up once per run {setup:.2f} s), speed-up {t_plain / t_quick:.1f}x, rel.diff {abs(plain - quick) / plain:.1e}")

    if args.data:
        cases = load_cases(args.data).cases[: args.cases]
        secs = []
        for method in ("rome", "crome"):
            ctx = RunContext(RunSettings(method=method, model=lm.name, layer=hp.layer, seed=0), hp, templates,
                             monitor=monitor)
            for case in cases:
                _, s = timed(lambda: evaluate_case(lm, case, ctx))
                secs.append(s)
        print(f"full CounterFact case (edit, metrics with and without prefix, perplexity, restore): "
              f"median {statistics.median(secs):.1f} s over {len(secs)} cases")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
