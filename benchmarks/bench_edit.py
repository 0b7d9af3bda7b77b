"""Reference vs fast v* path on the default model, in one process.

    python benchmarks/bench_edit.py [--n 2] [--layer 6]

Prints seconds per edit for each path, the speed-up, the largest relative
difference of v* and ΔW, peak resident memory, and the time of a cached model load.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from crome import EditRequest, compute_edit, load_model
from crome.compute_value import ReferenceRunner
from crome.fast import FastRunner

REQUESTS = [
    ("{} is the capital of", "Paris", "Germany"),
    ("The mother tongue of {} is", "Danielle Darrieux", "English"),
    ("{}, which is located in", "Eiffel Tower", "Rome"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=len(REQUESTS))
    ap.add_argument("--layer", type=int, default=None)
    args = ap.parse_args()
    load_model(progress=False)  # make sure the converted model is cached
    t = time.perf_counter()
    lm = load_model(progress=False)
    load_s = time.perf_counter() - t
    print(f"torch threads: {torch.get_num_threads()}, device: {lm.device}, cached model load: {load_s:.2f} s")
    times = {"reference": [], "fast": []}
    worst_v = worst_w = 0.0
    for prompt, subject, target in REQUESTS[: args.n]:
        req = EditRequest.create(prompt, subject, target)
        for method in ("rome", "crome"):
            edits = {}
            for name, runner in (("reference", ReferenceRunner), ("fast", FastRunner)):
                t = time.perf_counter()
                edits[name] = compute_edit(lm, req, method, layer=args.layer, runner_cls=runner)
                times[name].append(time.perf_counter() - t)
            a, b = edits["reference"], edits["fast"]
            dv = float((a.vectors["v_star"] - b.vectors["v_star"]).norm() / a.vectors["v_star"].norm())
            dw = float((a.delta_w - b.delta_w).norm() / a.delta_w.norm())
            worst_v, worst_w = max(worst_v, dv), max(worst_w, dw)
            print(f"{method:5} {req.text()!r:45} reference {times['reference'][-1]:6.1f} s  fast {times['fast'][-1]:6.1f} s"
                  f"  rel.diff v* {dv:.1e}  ΔW {dw:.1e}")
    ref, fast = statistics.median(times["reference"]), statistics.median(times["fast"])
    print(f"median seconds per edit: reference {ref:.1f}, fast {fast:.1f}, speed-up {ref / fast:.1f}x")
    print(f"max relative difference: v* {worst_v:.1e}, ΔW {worst_w:.1e}")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
