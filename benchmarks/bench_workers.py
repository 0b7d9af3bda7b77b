"""``crome eval`` on Ray workers against one worker, on the same cases, in one run.

Three runs of the same job (default model and settings, the first N CounterFact val cases,
ME-PPL_50 for perplexity), each into its own results file:

* ``1x1``: one worker, one torch thread;
* ``2x1``: two workers, one thread each (the issue's setting on a 2-core machine);
* ``1xC``: one worker with all the machine's threads (the best one process can do).

It checks that ``2x1`` writes exactly the records of ``1x1`` (timings live in another file), says
how far ``1xC`` moves from them (thread count changes float summation order), and gives cases
per minute by wall clock (starting Ray workers, loading the model and preparing the run
included) and each worker's median seconds per case.

    python benchmarks/bench_workers.py --n 20 --out docs/results/scale/workers-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchlib import emit

DATA = Path(os.environ.get("CROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _numbers(x, path=""):
    """Every number of a record, by its path."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return {}
    if isinstance(x, (int, float)):
        return {path: float(x)}
    items = x.items() if isinstance(x, dict) else enumerate(x)
    out = {}
    for k, v in items:
        out.update(_numbers(v, f"{path}.{k}"))
    return out


def max_relative_difference(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for ra, rb in zip(a, b):
        na, nb = _numbers(ra), _numbers(rb)
        for k in na:
            x, y = na[k], nb.get(k, math.nan)
            if x != y:
                worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-12))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-val.json"))
    ap.add_argument("--ppl-data", default=str(DATA / "me-ppl" / "ME-PPL_50.json"))
    ap.add_argument("--out", default=None, help="Write the measurements here (JSON; no dataset text).")
    ap.add_argument("--keep", default=None, help="Keep the three results files in this folder.")
    args = ap.parse_args()

    from crome.distribution.cluster import connect
    from crome.distribution.workers import run_workers
    from crome.evaluation.jobs import EvalJob
    from crome.evaluation.results import ResultsFile, timing_path

    cores = os.cpu_count() or 1
    ray = connect(num_cpus=cores)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="bench-workers-"))
    folder.mkdir(parents=True, exist_ok=True)
    runs = {"1x1": (1, 1), "2x1": (2, 1), f"1x{cores}": (1, cores)}
    result = dict(n=args.n, model=args.model or "default", cores=cores, ray=ray.__version__, runs={})
    records = {}
    for name, (workers, threads) in runs.items():
        out = folder / f"{name}.jsonl"
        out.unlink(missing_ok=True)
        timing_path(out).unlink(missing_ok=True)
        job = EvalJob(data=args.data, out=str(out), model=args.model, ppl_data=args.ppl_data, n_cases=args.n).absolute()
        start = time.perf_counter()
        run_workers(job, workers, threads=threads)
        wall = time.perf_counter() - start
        recs = sorted(ResultsFile(out).read(), key=lambda r: r["case_id"])
        records[name] = recs
        case_seconds = [t["seconds"] for t in ResultsFile(timing_path(out)).read()]
        result["runs"][name] = dict(workers=workers, threads=threads, cases=len(recs), wall_seconds=round(wall, 1),
                                    cases_per_minute=round(60 * len(recs) / wall, 2),
                                    seconds_per_case_median=round(sorted(case_seconds)[len(case_seconds) // 2], 2),
                                    errors=sum(r["error"] is not None for r in recs))
        print(name, json.dumps(result["runs"][name]), flush=True)
    base = records["1x1"]
    result["identical_2x1_vs_1x1"] = records["2x1"] == base
    result[f"max_relative_difference_1x{cores}_vs_1x1"] = max_relative_difference(records[f"1x{cores}"], base)
    result["speedup_2x1_vs_1x1"] = round(result["runs"]["2x1"]["cases_per_minute"]
                                         / result["runs"]["1x1"]["cases_per_minute"], 2)
    result[f"speedup_2x1_vs_1x{cores}"] = round(result["runs"]["2x1"]["cases_per_minute"]
                                                / result["runs"][f"1x{cores}"]["cases_per_minute"], 2)
    emit(result, args.out)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
