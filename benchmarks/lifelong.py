"""Lifelong editing: thousands of sequential edits, the methods side by side (issue 23).

Every run edits the same counterfact-train cases in the same order, one resumable
``crome eval --sequential`` run each (updates checkpointed as factors, AlphaEdit's projections and
keys with them), advancing in rounds so that a stop at any point leaves the runs comparable.
Kill it whenever; the same command continues.

Protocols (``--protocol``):
  A: 100 edits per update (AlphaEdit's protocol; batch methods only);
  B: 1 edit per update, the harder one.

A run name is a method with options joined by "+" (``benchlib.run_spec`` lists them), e.g.
``calphaedit+mpes+norm1``, ``calphaedit+mpes+nas+t6`` or ``memory+mpes+t6+L18``.
A run stops at ``--n`` edits, or earlier at ``--cap`` edits once its perplexity has passed
2× (so that a collapsing method spends no more time than the comparison needs).

Measured, by the run itself: perplexity on ME-PPL_50 and ‖W_l‖ every ``--monitor-every`` edits;
retained efficacy (ES) and generation exact match of every edit so far every ``--retained-every``;
per edit ES/PS/NS, generation EM of the edit and paraphrases, v* steps, seconds.

    OMP_NUM_THREADS=1 python benchmarks/lifelong.py --protocol B --runs calphaedit+mpes --n 3000
    python benchmarks/lifelong.py --report --docs docs/results/lifelong
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

from benchlib import add_run_options, emit, prepared_runs, run_spec

DATA = Path(os.environ.get("CROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
BATCH = {"A": 100, "B": 1}
MARKS = (100, 250, 500, 1000, 2000, 3000, 5000, 10000)


def job_for(name: str, protocol: str, args):
    """The ``EvalJob`` of run ``name`` in ``protocol``."""
    from crome.evaluation.jobs import EvalJob

    method, hparams, layer = run_spec(name)
    from crome.editing.methods import method as entry

    batch = entry(method).batch
    if protocol == "A" and not batch:
        raise SystemExit(f"protocol A edits 100 facts per update: {method} edits one")
    out = Path(args.out_dir) / protocol / f"{name}.jsonl"
    return EvalJob(data=args.data, out=str(out), method=method, model=args.model, ppl_data=args.ppl_data, sequential=True,
                   monitor_every=args.monitor_every or BATCH[protocol] * (1 if protocol == "A" else 10),
                   retained_every=args.retained_every, retained_sample=args.retained_sample,
                   scores_every=args.scores_every, gen_tokens=0,
                   gen_em=True, readings=args.readings, resume=True,
                   batch_size=BATCH[protocol] if batch else 1, seed=args.seed, hparams=hparams, layer=layer).absolute()


def finished(records: list[dict], args) -> str | None:
    """Why a run needs no more edits (None: it goes on)."""
    if len(records) >= args.n:
        return f"{args.n} edits"
    passed = next((r["step"] for r in records if r.get("ppl_ratio") and r["ppl_ratio"] > 2), None)
    if passed is not None and len(records) >= args.cap:
        return f"perplexity past 2x at {passed}, {args.cap} edits"
    return None


def run_all(args) -> None:
    import torch

    from crome.evaluation.evaluate import run
    from crome.evaluation.results import ResultsFile

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    jobs = {name: job_for(name, args.protocol, args) for name in args.runs}
    lm, cases, contexts = prepared_runs(jobs, args.n)
    deadline = time.time() + 3600 * args.hours if args.hours else math.inf
    step = max(args.round, BATCH[args.protocol])
    for upto in range(step, len(cases) + step, step):
        for name, job in jobs.items():
            done = ResultsFile(job.out).read()
            if finished(done, args) or len(done) >= upto:
                continue
            if time.time() > deadline:
                print("time is up: rerun the same command to continue", flush=True)
                return
            start = time.perf_counter()
            records = run(lm, cases[:upto], contexts[name], job.out, resume=True)
            last = next((r for r in reversed(records) if r.get("ppl_ratio") is not None), {})
            print(f"{args.protocol} {name:>24}: {len(records):5d} edits ({len(records) - len(done)} in "
                  f"{time.perf_counter() - start:.0f} s), perplexity x{last.get('ppl_ratio', float('nan')):.3f}, "
                  f"retained ES {last.get('retained_efficacy')}, gen EM {last.get('retained_gen_em')}", flush=True)


# ---------------------------------------------------------------- the report

def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarise(records: list[dict], timing: list[dict]) -> dict:
    """One run's row: where perplexity passed 2×, the curves at fixed edit counts, NS drift, cost."""
    measured = [r for r in records if r.get("ppl_ratio") is not None]
    kept = [r for r in records if r.get("retained_efficacy") is not None]
    normed = [r for r in records if r.get("weight_norms")]
    metrics = [r["metrics"] for r in records if r.get("metrics")]
    ns = [m["ns"] for m in metrics]
    steps = [r.get("opt_steps") for r in records if r.get("opt_steps") is not None]
    seconds = [t["seconds"] for t in timing]
    anchored = [r for r in records if r.get("nas_ratio") is not None]   # NAS: v*'s norm over the anchor
    last = kept[-1] if kept else {}

    def at(rows, key):
        return {m: next((r[key] for r in rows if r["step"] >= m), None) for m in MARKS if m <= len(records)}

    return dict(
        edits=len(records),
        ppl_unedited=next((r["ppl_before"] for r in records if r.get("ppl_before")), None),
        first_2x=next((r["step"] for r in measured if r["ppl_ratio"] > 2), None),
        ppl_ratio_last=measured[-1]["ppl_ratio"] if measured else None,
        max_ppl_ratio=max((r["ppl_ratio"] for r in measured), default=None),
        retained_es=last.get("retained_efficacy"), retained_es_prefixed=last.get("retained_efficacy_prefixed"),
        retained_gen_em=last.get("retained_gen_em"), retained_gen_em_prefixed=last.get("retained_gen_em_prefixed"),
        retained_at=last.get("step"),
        es=_mean(m["es"] for m in metrics), ps=_mean(m["ps"] for m in metrics),
        gen_em=_mean(m.get("gen_em") for m in metrics),
        gen_em_prefixed=_mean(r["metrics_prefixed"].get("gen_em") for r in records if r.get("metrics_prefixed")),
        ns_first_100=_mean(ns[:100]), ns_last_100=_mean(ns[-100:]) if len(ns) >= 200 else None,
        weight_ratio_max=max(v["ratio"] for v in normed[-1]["weight_norms"].values()) if normed else None,
        seconds_per_edit=statistics.median(seconds) if seconds else None,
        v_steps_mean=_mean(steps),
        nas_skipped=sum(bool(r.get("nas_skipped")) for r in anchored) if anchored else None,
        nas_ratio_median=statistics.median(r["nas_ratio"] for r in anchored) if anchored else None,
        ppl_ratio_at=at(measured, "ppl_ratio"), retained_es_at=at(kept, "retained_efficacy"),
        retained_gen_em_at=at(kept, "retained_gen_em"))


def at_edits(records: list[dict], m: int) -> dict:
    """A run after its first ``m`` edits: the curves' last points at or before edit ``m``, and the
    per-edit metrics of those ``m`` edits (what a side-by-side comparison at a common count reads)."""
    upto = [r for r in records if r["step"] <= m]
    measured = [r for r in upto if r.get("ppl_ratio") is not None]
    kept = [r for r in upto if r.get("retained_efficacy") is not None]
    normed = [r for r in upto if r.get("weight_norms")]
    last = kept[-1] if kept else {}
    metrics = [r["metrics"] for r in upto if r.get("metrics")]
    prefixed = [r["metrics_prefixed"] for r in upto if r.get("metrics_prefixed")]

    def split(first: bool):
        return _mean(r["metrics"]["ps"] for r in upto if r.get("metrics") and r.get("first_token_subject") is first)

    return dict(edits=m, ppl_ratio=measured[-1]["ppl_ratio"] if measured else None,
                retained_at=last.get("step"), retained_es=last.get("retained_efficacy"),
                retained_es_prefixed=last.get("retained_efficacy_prefixed"),
                retained_gen_em=last.get("retained_gen_em"),
                retained_gen_em_prefixed=last.get("retained_gen_em_prefixed"),
                weight_ratio=max(v["ratio"] for v in normed[-1]["weight_norms"].values()) if normed else None,
                es=_mean(x["es"] for x in metrics), ps=_mean(x["ps"] for x in metrics),
                ns=_mean(x["ns"] for x in metrics), ns_unedited=_mean(r["before"]["ns"] for r in upto if r.get("before")),
                ps_first_token=split(True), ps_other=split(False),
                gen_em=_mean(x.get("gen_em") for x in metrics),
                gen_em_prefixed=_mean(x.get("gen_em") for x in prefixed),
                gen_em_paraphrase=_mean(x.get("gen_em_paraphrase") for x in metrics),
                gen_em_paraphrase_prefixed=_mean(x.get("gen_em_paraphrase") for x in prefixed))


def marks(name: str, records: list[dict], timing: list[dict]) -> list[str]:
    """A Markdown table of one run at 100, 1,000, 3,000 ... edits, with its mean seconds per edit so far
    (every measurement of the run included)."""
    rows = [dict(at_edits(records, m), seconds_per_edit=statistics.fmean(t["seconds"] for t in timing[:m]))
            for m in MARKS if m <= len(records)]
    if not rows:
        return []
    cols = list(rows[0])
    return [f"{name}:", "", "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols),
            *("| " + " | ".join(_cell(row[c]) for c in cols) + " |" for row in rows), ""]


def side_by_side(runs: dict[str, list[dict]], step: int = 100) -> tuple[int, list[str]]:
    """A Markdown table of the runs at the largest multiple of ``step`` edits that all of them reached."""
    m = min(len(records) for records in runs.values()) // step * step
    if m == 0:
        return 0, []
    rows = {name: at_edits(records, m) for name, records in runs.items()}
    cols = [c for c in next(iter(rows.values())) if c != "edits"]
    lines = [f"| run (at {m} edits) | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(_cell(row[c]) for c in cols) + " |" for name, row in rows.items()]
    return m, lines


def result_files(args, protocol: str) -> list[Path]:
    """The runs' results files of ``protocol`` in ``--out-dir`` and the ``--with`` folders, by name."""
    folders = [Path(args.out_dir), *map(Path, args.with_runs)]
    if missing := [str(f) for f in folders if not f.is_dir()]:
        raise SystemExit(f"no runs folder: {', '.join(missing)}")
    return sorted((f for folder in folders for f in (folder / protocol).glob("*.jsonl")
                   if not f.name.endswith(".timing.jsonl")), key=lambda f: f.name)


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crome.evaluation.results import ResultsFile, timing_path

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    table, common, at_marks = {}, [], []
    protocols = [p for p in "AB" if any(f.stat().st_size for f in result_files(args, p))]
    fig, axes = plt.subplots(len(protocols), 4, figsize=(18, 4 * len(protocols)), squeeze=False)
    for row, protocol in zip(axes, protocols):
        runs = {}
        for path in result_files(args, protocol):
            records = ResultsFile(path).read()
            timing = ResultsFile(timing_path(path)).read()
            if not records:
                continue
            name = f"{protocol}: {path.stem}"
            table[name] = summarise(records, timing)
            at_marks += marks(name, records, timing)
            _plot(row, records, path.stem)
            if len(records) >= args.common_from:
                runs[name] = records
        m, lines = side_by_side(runs, args.common_step) if runs else (0, [])
        if lines:
            common += [f"Protocol {protocol}, every run with at least {args.common_from} edits, at {m} edits:", "",
                       *lines, ""]
        for ax, (title, label) in zip(row, [("perplexity (ME-PPL_50) / unedited", "ratio"),
                                            ("retained ES (dashed: prefixed)", "share"),
                                            ("retained generation EM (dashed: prefixed)", "share"),
                                            ("largest ‖W_l‖ / unedited", "ratio")]):
            ax.set(title=f"{protocol}: {title}", xlabel="edits", ylabel=label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        row[0].set_yscale("log")
    if not table:
        raise SystemExit(f"no results in {args.out_dir}")
    fig.tight_layout()
    fig.savefig(docs / "lifelong.png", dpi=110)
    cols = ["edits", "first_2x", "ppl_ratio_last", "retained_es", "retained_es_prefixed", "retained_gen_em",
            "retained_gen_em_prefixed", "es", "ps", "gen_em", "gen_em_prefixed",
            "ns_first_100", "ns_last_100", "weight_ratio_max", "seconds_per_edit", "v_steps_mean"]
    cols += ["nas_skipped", "nas_ratio_median"] if any(row["nas_skipped"] is not None for row in table.values()) else []
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(_cell(row[c]) for c in cols) + " |" for name, row in table.items()]
    lines += ["", *common, "Each run at 100, 1,000, 3,000 ... edits:", "", *at_marks]
    (docs / "lifelong.md").write_text("\n".join(lines) + "\n")
    emit(table, str(docs / "lifelong.json"))
    print("\n".join(lines))


def _plot(row, records: list[dict], label: str) -> None:
    """One run's curves: solid on the bare prompts, dashed after each edit's test prefix."""
    measured = [r for r in records if r.get("ppl_ratio") is not None]
    kept = [r for r in records if r.get("retained_efficacy") is not None]
    normed = [r for r in records if r.get("weight_norms")]
    line = row[0].plot([r["step"] for r in measured], [r["ppl_ratio"] for r in measured], ".-", label=label)[0]
    for ax, key in ((row[1], "retained_efficacy"), (row[2], "retained_gen_em")):
        ax.plot([r["step"] for r in kept], [r.get(key) for r in kept], "o-", color=line.get_color(), label=label)
        ax.plot([r["step"] for r in kept], [r.get(f"{key}_prefixed") for r in kept], "o--", color=line.get_color())
    row[3].plot([r["step"] for r in normed], [max(v["ratio"] for v in r["weight_norms"].values()) for r in normed],
                ".-", color=line.get_color(), label=label)


def _cell(v) -> str:
    return "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=list(BATCH), default="B")
    ap.add_argument("--runs", nargs="+", default=["calphaedit+mpes"])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--model", default=None, help="A model id, folder or GGUF file (default: crome's default model); "
                    "give each model its own --out-dir.")
    ap.add_argument("--readings", default="none",
                    help="Each edit's readings beyond bare and prefixed (crome eval --readings): none, as the runs "
                         "before issue 38 were measured, keeps their cost comparable.")
    ap.add_argument("--cap", type=int, default=1000, help="A run past 2x perplexity stops here.")
    ap.add_argument("--round", type=int, default=100, help="Edits per run per round.")
    ap.add_argument("--common-from", type=int, default=100,
                    help="The report's side-by-side table takes the runs with at least this many edits.")
    ap.add_argument("--common-step", type=int, default=100,
                    help="... at the largest multiple of this that all of them reached.")
    ap.add_argument("--monitor-every", type=int, default=None,
                    help="Perplexity and ||W|| every k-th edit (default: 10 in B, every update in A).")
    ap.add_argument("--retained-every", type=int, default=100,
                    help="Retained ES and generation EM (they re-score the edits so far) every k-th edit.")
    ap.add_argument("--retained-sample", type=int, default=0,
                    help="... on at most this many earlier edits, spread over the run (0: all of them).")
    ap.add_argument("--scores-every", type=int, default=1,
                    help="Score every k-th edit's own ES/PS/NS and generation EM (a sample; 1: every edit).")
    ap.add_argument("--with", dest="with_runs", nargs="+", default=[], metavar="DIR",
                    help="--report: the runs in these --out-dir folders too (another session's runs beside these).")
    add_run_options(ap, str(DATA / "counterfact" / "counterfact-train.json"), str(DATA / "me-ppl" / "ME-PPL_50.json"), "runs/lifelong",
                    "docs/results/lifelong")
    args = ap.parse_args()
    report(args) if args.report else run_all(args)


if __name__ == "__main__":
    main()
