"""What a v* costs under each speed lever: seconds, optimisation steps, P(target) and ‖δ‖/‖v0‖ per edit.

Keys and v* (``edit.prepare_edits``, the fast runner) of the same counterfact-train edits, one at a time,
for each run name (``benchlib.run_spec``: ``lr<x>`` v*'s step size, ``t<n>`` context templates, ``L<n>``
the layer, ``mpes``), in one process after one warm-up edit; and the first run's edits optimised K at a
time (``--batch``), with the largest relative difference of v* from one at a time. Quality of the levers
that change the arithmetic is ``fast_path_quality.py``'s (100 counterfact-val cases).

    python benchmarks/v_star_levers.py --n 10 --out docs/results/speed/v_star_levers.json
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchlib import DATA, emit, run_spec

RUNS = ("memory+mpes", "memory+mpes+t6", "memory+mpes+t6+lr1", "memory+mpes+t6+lr2", "memory+mpes+t6+L12",
        "memory+mpes+t6+L18")


def contexts(args):
    """(model, requests, {run name: (hparams, templates)})."""
    from crome.evaluation.jobs import EvalJob, cases_of, load, prepare

    out, lm, requests = {}, None, None
    for name in args.runs:
        method, hparams, layer = run_spec(name)
        job = EvalJob(data=args.data, out="", method=method, hparams=hparams, layer=layer, n_cases=args.n + 1,
                      seed=args.seed)
        if lm is None:
            cases, _, _ = cases_of(job)
            requests, lm = [c.request for c in cases], load(job, progress=False)
        ctx = prepare(lm, job)
        out[name] = (ctx.hparams, ctx.templates)
        if ctx.memory is not None:
            ctx.memory.detach()
    return lm, requests, out


def timed(lm, requests, hp, templates, k: int = 1):
    from crome.editing.edit import prepare_edits

    start = time.perf_counter()
    prepared = [p for i in range(0, len(requests), k) for p in prepare_edits(lm, requests[i:i + k], hp, templates)]
    return prepared, (time.perf_counter() - start) / len(requests)


def row(prepared, seconds: float) -> dict:
    values = [p.value for p in prepared]
    return dict(seconds_per_edit=round(seconds, 3), steps=round(statistics.mean(v.steps for v in values), 2),
                p_target=round(statistics.mean(v.p_target for v in values), 3),
                delta_over_v0=round(statistics.mean(float(v.delta.norm() / v.v0.norm()) for v in values), 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=list(RUNS))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--batch", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-train.json"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    lm, requests, runs = contexts(args)
    timed(lm, requests[-1:], *runs[args.runs[0]])                      # warm-up: not timed
    todo, table, first = requests[:args.n], {}, None
    for name, (hp, templates) in runs.items():
        prepared, seconds = timed(lm, todo, hp, templates)
        table[name] = dict(layer=hp.layer, templates=len(templates), **row(prepared, seconds))
        first = first or prepared
    hp, templates = runs[args.runs[0]]
    batched = {}
    for k in args.batch:
        prepared, seconds = timed(lm, todo, hp, templates, k)
        diff = max(float((a.value.v_star - b.value.v_star).norm() / a.value.v_star.norm()) for a, b in zip(first, prepared))
        batched[f"{args.runs[0]} K={k}"] = dict(**row(prepared, seconds), max_rel_diff_v_star=diff)
    emit(dict(n=args.n, threads=torch.get_num_threads(), model=lm.name, runs=table, batched=batched), args.out)


if __name__ == "__main__":
    main()
