"""Where an edit's time goes in a protocol-B lifelong run (one edit per update), by step.

Runs ``--n`` sequential edits of each run (the names of ``lifelong.py``: ``crome``,
``calphaedit+mpes``, ...) on the default model (or ``--model``) under cProfile, after one edit that warms the
caches up (not profiled), and splits the wall time per edit into the run's steps: the keys, v*,
the solve, writing the update, and each of the run's own measurements (the case's ES/PS/NS before
and after, generation exact match, perplexity, retained efficacy, the checkpoint).

    python benchmarks/profile_step.py --runs crome calphaedit+mpes --n 10 --out docs/results/speed/profile.json
    python benchmarks/profile_step.py --runs crome+mpes+t6 calphaedit+mpes+t6 --n 10
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

from benchlib import DATA, emit
from lifelong import job_for

# step -> the functions whose cumulative time is that step's (they do not nest in one another)
STEPS = {
    "keys": ["compute_keys", "_read"],
    "v*": ["compute_v_stars"],
    "solve": ["memit_solve", "alphaedit_solve", "rank_one_update"],
    "write W": ["add_factors", "add_delta"],
    "guard": ["verify_or_roll_back", "EfficacyCheck.__init__"],
    "scores": ["CaseScorer.__call__"],              # the case's ES/PS/NS before and after the edit
    "generation EM": ["generation_em"],
    "fluency": ["sample"],
    "perplexity": ["PerplexityMonitor.__call__", "PerplexityMonitor.each"],
    "retained": ["SequentialRun._retained"],
    "checkpoint": ["FactorStore.write", "weights_sha", "ResultsFile.append"],
}


def _qualified(func) -> str:
    """'Class.method' or 'function' for a pstats key (file, line, name)."""
    filename, line, name = func
    try:
        source = Path(filename).read_text().splitlines()
    except OSError:
        return name
    if line < 1 or line > len(source) or not source[line - 1][:1].isspace():
        return name                                   # a module-level function
    for text in reversed(source[: line - 1]):
        if text.startswith("class "):
            return f"{text[6:].split('(')[0].split(':')[0]}.{name}"
        if text and not text[0].isspace():
            break
    return name


def breakdown(profile: cProfile.Profile, edits: int, wall: float) -> dict:
    """Seconds per edit of each step, the rest, and the whole."""
    stats = pstats.Stats(profile)
    cumulative = {}
    for func, (_, _, _, cum, _) in stats.stats.items():
        if "crome" in func[0] or "benchmarks" in func[0]:
            name = _qualified(func)
            cumulative[name] = cumulative.get(name, 0.0) + cum
    out = {step: round(sum(cumulative.get(n, 0.0) for n in names) / edits, 3) for step, names in STEPS.items()}
    out["other"] = round(wall / edits - sum(out.values()), 3)
    out["total"] = round(wall / edits, 3)
    return out


def hottest(profile: cProfile.Profile, edits: int, n: int) -> list[tuple[str, float]]:
    """The ``n`` functions with the most time of their own (not their callees'), seconds per edit."""
    own = sorted(pstats.Stats(profile).stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [(f"{Path(f[0]).name}:{f[1]} {_qualified(f)}", round(v[2] / edits, 3)) for f, v in own]


def profile_run(name: str, args) -> dict:
    from benchlib import prepared_runs

    from crome.evaluation.evaluate import run

    with tempfile.TemporaryDirectory() as tmp:
        args.out_dir = tmp
        job = job_for(name, "B", args)
        lm, cases, contexts = prepared_runs({name: job}, args.n + 1)
        run(lm, cases[:1], contexts[name], job.out, resume=True)          # warm-up: not profiled
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        run(lm, cases[: args.n + 1], contexts[name], job.out, resume=True)
        profile.disable()
        wall = time.perf_counter() - start
    return dict(run=name, model=lm.name, edits=args.n, seconds_per_edit=breakdown(profile, args.n, wall),
                hottest=hottest(profile, args.n, args.top))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["crome", "calphaedit+mpes"])
    ap.add_argument("--n", type=int, default=10, help="Profiled edits per run (after one warm-up edit).")
    ap.add_argument("--model", default=None, help="A model id, folder or GGUF file (default: crome's default model).")
    ap.add_argument("--readings", default="none", help="As lifelong.py's --readings.")
    ap.add_argument("--top", type=int, default=15, help="List this many functions with the most time of their own.")
    ap.add_argument("--monitor-every", type=int, default=10)
    ap.add_argument("--retained-every", type=int, default=10)
    ap.add_argument("--retained-sample", type=int, default=0)
    ap.add_argument("--scores-every", type=int, default=1)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-train.json"))
    ap.add_argument("--ppl-data", default=str(DATA / "me-ppl" / "ME-PPL_50.json"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = dict(threads=args.threads, monitor_every=args.monitor_every, retained_every=args.retained_every,
                  retained_sample=args.retained_sample, scores_every=args.scores_every,
                  runs=[profile_run(name, args) for name in args.runs])
    emit(result, args.out)


if __name__ == "__main__":
    main()
