"""``crome eval --edits-per-pass K``: cases per minute for several K on the same cases, in one run.

The default model and crome eval's default settings (key statistics, fixed test prefix), the first
N CounterFact val cases, ME-PPL_50. Each K runs in its own process (load, prepare, then
``evaluate.run`` into its own results file), so each has its own peak memory. It reports the
wall clock per K (loading and preparation excluded), the process's peak resident memory, and how
far each K's records are from K = 1's: the largest relative difference over every number of
every record, and how many non-numbers differ.

    python benchmarks/bench_eval.py --n 16 --k 1 4 8 16 --out docs/results/speed/eval-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import emit

DATA = Path(os.environ.get("CROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def differences(a: dict, b: dict, path: str = "") -> tuple[float, list[str]]:
    """(largest relative difference of the numbers, paths of differing non-numbers)."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        return 0.0, ([] if a == b else [path])
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return (0.0 if a == b else abs(a - b) / max(abs(a), abs(b), 1e-12)), []
    if isinstance(a, dict):
        keys = set(a) | set(b)
        parts = [differences(a.get(k), b.get(k), f"{path}.{k}") for k in keys]
    else:
        if len(a) != len(b):
            return 0.0, [path]
        parts = [differences(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    return max([p[0] for p in parts], default=0.0), [q for p in parts for q in p[1]]


def one_run(args) -> dict:
    """One K in this process: load, prepare, run; the run's wall clock and this process's peak memory."""
    import torch
    import transformers

    from crome.evaluation.evaluate import run
    from crome.evaluation.jobs import EvalJob, cases_of, load, prepare, with_checks

    transformers.utils.logging.set_verbosity_error()
    job = EvalJob(data=args.data, out="", model=args.model, ppl_data=args.ppl_data, n_cases=args.n).absolute()
    cases, _, _ = cases_of(job)
    lm = load(job, progress=False)
    ctx = with_checks(lm, prepare(lm, job), job)
    start = time.perf_counter()
    run(lm, cases, ctx, args.results, edits_per_pass=args.one)
    seconds = time.perf_counter() - start
    return dict(n=len(cases), model=lm.name, device=str(lm.device), threads=torch.get_num_threads(),
                layer=ctx.hparams.layer, key_stats=ctx.settings.key_stats_source, seconds=round(seconds, 1),
                cases_per_minute=round(60 * len(cases) / seconds, 2),
                peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-val.json"))
    ap.add_argument("--ppl-data", default=str(DATA / "me-ppl" / "ME-PPL_50.json"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)       # child: run this K
    ap.add_argument("--results", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_run(args)))
        return

    from crome.evaluation.results import ResultsFile

    result, records = dict(runs={}), {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.k:   # each K in its own process: its own peak memory
            out = Path(tmp) / f"k{k}.jsonl"
            child = subprocess.run([sys.executable, __file__, "--one", str(k), "--results", str(out), "--n",
                                    str(args.n), "--data", args.data, "--ppl-data", args.ppl_data]
                                   + (["--model", args.model] if args.model else []),
                                   check=True, capture_output=True, text=True)
            run = json.loads(child.stdout.strip().splitlines()[-1])
            result.update({key: run.pop(key) for key in ("n", "model", "device", "threads", "layer", "key_stats")})
            result["runs"][k] = run
            records[k] = ResultsFile(out).read()
            print(k, json.dumps(run), flush=True)
    base = records[args.k[0]]
    for k in args.k[1:]:
        worst, other = 0.0, []
        for a, b in zip(base, records[k]):
            d, o = differences(a, b)
            worst, other = max(worst, d), other + [f"case {a['case_id']}{p}" for p in o]
        result["runs"][k].update(max_relative_difference=worst, differing_non_numbers=other[:10],
                                 speedup=round(result["runs"][k]["cases_per_minute"]
                                               / result["runs"][args.k[0]]["cases_per_minute"], 2))
    emit(result, args.out)


if __name__ == "__main__":
    main()
