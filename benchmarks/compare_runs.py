"""Two eval runs of the same cases, compared case by case: how often ES/PS/NS agree, how far the
denominator moves, perplexity ratios and seconds per case (docs/SPEED.md's bfloat16 comparison).

    python benchmarks/compare_runs.py runs/bf16/dtype-float32.jsonl runs/bf16/dtype-bfloat16.jsonl \\
        --out docs/results/speed/bf16-vs-fp32-cpu.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchlib import emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from crome.evaluation.results import ResultsFile, timing_path

    runs = {p: {r["case_id"]: r for r in ResultsFile(p).read()} for p in (args.a, args.b)}
    a, b = runs[args.a], runs[args.b]
    ids = [i for i in a if i in b and a[i]["metrics"] and b[i]["metrics"]]
    out = {"cases": len(ids)}
    for k in ("es", "ps", "ns"):
        out[f"{k}_agree"] = sum(a[i]["metrics"][k] == b[i]["metrics"][k] for i in ids) / len(ids)
    moved = [abs(b[i]["denominator"] - a[i]["denominator"]) / abs(a[i]["denominator"]) for i in ids]
    out["denominator_rel_change_median"], out["denominator_rel_change_max"] = statistics.median(moved), max(moved)
    for path, run in runs.items():
        seconds = [t["seconds"] for t in ResultsFile(timing_path(path)).read()]
        out[Path(path).stem] = dict(
            dtype=run[ids[0]].get("dtype"), ppl_before=run[ids[0]]["ppl_before"],
            ppl_ratio_median=statistics.median(run[i]["ppl_ratio"] for i in ids),
            ppl_ratio_max=max(run[i]["ppl_ratio"] for i in ids),
            denominator_median=statistics.median(run[i]["denominator"] for i in ids),
            seconds_median=statistics.median(seconds) if seconds else None,
            key_stats_hash=(run[ids[0]]["key_stats"] or {}).get("hash"))
    out["same_context_templates"] = a[ids[0]]["context_templates"] == b[ids[0]]["context_templates"]
    emit(out, args.out)


if __name__ == "__main__":
    main()
