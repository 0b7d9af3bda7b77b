"""Does a cheaper v* edit as well? The full path and the fast levers side by side, on the same cases.

The levers that change the arithmetic of an edit (MPES's early stop, 6 context templates instead of
21) are run next to the full path (C-ROME) on the same counterfact-val cases, in one process, each
an independent ``crome eval`` run (resumable), and the gated memory with both levers beside them: ES/PS/NS on the bare prompt and after the test prefix,
generation exact match of the edit and its paraphrases, the perplexity ratio on ME-PPL_50, v* steps
and seconds per edit. Differences are paired (the same cases), with a 95% interval.

    python benchmarks/fast_path_quality.py --n 100 --out docs/results/speed/fast_path_quality.json
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from benchlib import DATA, emit, run_spec

# run names (benchlib.run_spec); the first is the full path, crome's default
RUNS = ("crome", "crome+mpes", "crome+mpes+t6", "memory+mpes+t6")
METRICS = ("es", "ps", "ns", "gen_em", "gen_em_paraphrase")


def run_one(name: str, args):
    from crome.evaluation.jobs import EvalJob, run_job
    from crome.evaluation.results import ResultsFile, timing_path

    method, hparams, layer = run_spec(name)
    out = Path(args.out_dir) / f"{name}.jsonl"
    job = EvalJob(data=args.data, out=str(out), method=method, ppl_data=args.ppl_data, n_cases=args.n,
                  gen_em=True, gen_tokens=0, resume=True, seed=args.seed, hparams=hparams, layer=layer)
    records, _, _ = run_job(job)
    return records[:args.n], ResultsFile(timing_path(out)).read()[:args.n]   # a longer earlier run: its first n


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of b − a over the cases both have, with a 95% normal interval."""
    d = [y - x for x, y in zip(a, b) if x is not None and y is not None and not math.isnan(x) and not math.isnan(y)]
    if len(d) < 2:
        return dict(diff=None, ci95=None, n=len(d))
    half = 1.96 * statistics.stdev(d) / math.sqrt(len(d))
    return dict(diff=round(statistics.mean(d), 4), ci95=round(half, 4), n=len(d))


def column(records: list[dict], group: str, metric: str) -> list[float | None]:
    return [(r.get(group) or {}).get(metric) for r in records]


def summary(records: list[dict], timing: list[dict]) -> dict:
    out = {}
    for group in ("metrics", "metrics_prefixed"):
        for metric in METRICS:
            values = [v for v in column(records, group, metric) if v is not None and not math.isnan(v)]
            out[f"{metric}{'_prefixed' if group.endswith('prefixed') else ''}"] = (
                round(statistics.mean(values), 4) if values else None)
    ratios = [r["ppl_ratio"] for r in records if r.get("ppl_ratio") is not None]
    out["ppl_ratio_median"] = round(statistics.median(ratios), 5) if ratios else None
    out["ppl_ratio_max"] = round(max(ratios), 4) if ratios else None
    out["opt_steps"] = round(statistics.mean(r["opt_steps"] for r in records if r.get("opt_steps")), 2)
    out["seconds_per_edit"] = round(statistics.median(t["seconds"] for t in timing), 2) if timing else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--runs", nargs="+", default=list(RUNS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-val.json"))
    ap.add_argument("--ppl-data", default=str(DATA / "me-ppl" / "ME-PPL_50.json"))
    ap.add_argument("--out-dir", default="runs/fast_path")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = {name: run_one(name, args) for name in args.runs}
    base, _ = results[args.runs[0]]
    table = {name: summary(records, timing) for name, (records, timing) in results.items()}
    diffs = {name: {f"{m}{suffix}": paired(column(base, group, m), column(records, group, m))
                    for group, suffix in (("metrics", ""), ("metrics_prefixed", "_prefixed")) for m in METRICS}
             for name, (records, _) in results.items() if name != args.runs[0]}
    for name, (records, _) in results.items():
        if name != args.runs[0]:
            diffs[name]["ppl_ratio"] = paired([r.get("ppl_ratio") for r in base], [r.get("ppl_ratio") for r in records])
    emit(dict(n=args.n, data=Path(args.data).name, runs={name: run_spec(name) for name in args.runs}, table=table,
              against_full=diffs), args.out)


if __name__ == "__main__":
    main()
