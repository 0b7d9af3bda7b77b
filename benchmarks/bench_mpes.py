"""How much MPES (ENCORE's most-probable early stopping) cuts the v* optimisation, in one run.

For each case, the same keys and v0, the value step twice: the reference stopping rule (20 Adam
steps or loss < 0.05) and the same with MPES (also stop once the target is the most probable
token at every target position of every rewriting prompt). Both at ROME's layer (δ on W's output)
and at MEMIT's last layer (δ on the residual stream, clamp 0.75‖h‖), one case at a time as in
a protocol-B run. Reports steps, seconds and P(target) at the stop.

    OMP_NUM_THREADS=1 python benchmarks/bench_mpes.py --n 20 --out docs/results/lifelong/mpes.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from benchlib import emit

DATA = Path(os.environ.get("CROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-train.json"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import transformers

    from crome.editing.compute_key import compute_keys, key_and_output
    from crome.editing.compute_value import compute_v_stars
    from crome.editing.fast import FastRunner
    from crome.editing.hparams import memit_layers
    from crome.editing.layer_choice import resolve
    from crome.editing.templates import context_templates
    from crome.evaluation.datasets import load_cases
    from crome.models import load_model
    from crome.request import SLOT

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    lm = load_model(args.model, progress=False)
    hp, _ = resolve(lm, None, None, 0)
    templates = context_templates(lm, 0, hp.template_lengths, hp.template_starts)
    cases = load_cases(args.data).cases[:args.n]
    result = dict(model=lm.name, cases=len(cases), threads=torch.get_num_threads())
    last = memit_layers(hp, lm.num_layers)[-1]
    sites = {"rome": (hp.layer, None, hp), "memit": (last, lm.module(lm.arch.layer_name(last)),
                                                    replace(hp, clamp_norm_factor=hp.memit_clamp_norm_factor))}
    for name, (layer, site, base) in sites.items():
        rows = {False: [], True: []}
        for case in cases:
            r = case.request
            if site is None:        # ROME: v0 is W's output at the bare prompt
                v0 = [compute_keys(lm, r, layer, templates).v_bare]
            else:                   # MEMIT: h after the last layer at the bare prompt
                v0 = [key_and_output(lm, r, layer, layer, [SLOT])[1][0]]
            for mpes in (False, True):
                start = time.perf_counter()
                value = compute_v_stars(lm, [r], layer, templates, v0, replace(base, mpes=mpes), FastRunner, site=site)[0]
                rows[mpes].append(dict(seconds=time.perf_counter() - start, steps=value.steps, p_target=value.p_target))
        summary = {}
        for mpes, got in rows.items():
            summary["mpes" if mpes else "reference"] = dict(
                seconds_median=statistics.median(x["seconds"] for x in got),
                seconds_total=sum(x["seconds"] for x in got),
                steps_mean=statistics.mean(x["steps"] for x in got),
                p_target_mean=statistics.mean(x["p_target"] for x in got))
        summary["time_saved"] = 1 - summary["mpes"]["seconds_total"] / summary["reference"]["seconds_total"]
        result[f"{name} (layer {layer})"] = summary
    emit(result, args.out)


if __name__ == "__main__":
    main()
