"""The reference table of docs/EVAL.md: ROME vs C-ROME on CounterFact, one case at a
time and sequentially, on the default model.

    python benchmarks/reference_table.py --data ../shared/data/counterfact/counterfact-val.json \
        --ppl-data ../shared/data/me-ppl/ME-PPL_50.json --n 200 --seq 100 --monitor-every 1,5 --out-dir docs/results

Writes, into --out-dir: eval-rome.jsonl, eval-crome.jsonl (one case at a time, each
restored), seq-rome.jsonl, seq-crome.jsonl (edits accumulate), their timing files,
reference-table.md, sequential-table.md, sequential.png and run.json (device, versions,
cases per minute). Every run resumes where it stopped when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from crome.editing.context import RunContext, RunSettings
from crome.editing.hparams import defaults_for
from crome.editing.templates import context_templates
from crome.evaluation import datasets, evaluate, summary
from crome.evaluation.results import ResultsFile, timing_path
from crome.models import load_model
from crome.scoring.texts import load_texts


def plot_sequential(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"rome": "tab:red", "crome": "tab:blue"}
    for method, recs in runs.items():
        steps = [r["step"] for r in recs if r.get("collapsed") is not None]
        ppl = [r["ppl_after"] if r.get("ppl_after") is not None else float("inf") for r in recs
               if r.get("collapsed") is not None]
        ax1.plot(steps, ppl, color=colours.get(method), label=method.upper().replace("CROME", "C-ROME"))
        for key, style in (("retained_efficacy", "-"), ("retained_efficacy_prefixed", "--")):
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                ax2.plot(*zip(*pts), style, color=colours.get(method), label=f"{method.upper().replace('CROME', 'C-ROME')}"
                         + (" (test prefix)" if "prefixed" in key else ""))
    bases = [recs[0]["ppl_before"] for recs in runs.values() if recs]
    if bases:
        base = bases[0]
        ax1.axhline(base, color="grey", lw=0.8, ls=":", label="unedited")
    ax1.set(yscale="log", xlabel="edits so far", ylabel="perplexity (ME-PPL_50)", title="Perplexity during sequential editing")
    ax2.set(xlabel="edits so far", ylabel="share of edits still effective (ES)", ylim=(-0.02, 1.02),
            title="Retained efficacy of earlier edits")
    ax1.legend()
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--ppl-data", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seq", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-prefix", default="fixed")
    ap.add_argument("--out-dir", default="docs/results")
    ap.add_argument("--methods", default="rome,crome")
    ap.add_argument("--monitor-every", default="1",
                    help="sequential runs: perplexity and retained efficacy every k-th edit; one k, or one per method (1,5)")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    lm = load_model(progress=False)
    hp = defaults_for(lm.name, lm.num_layers).with_(mom2_adjustment=False)  # the paper's setting, C = I
    # templates sampled on the CPU, so that a GPU run uses the ones a CPU run would
    cpu_lm = lm if lm.device.type == "cpu" else load_model(device="cpu", progress=False)
    templates = context_templates(cpu_lm, args.seed, hp.template_lengths, hp.template_starts)
    del cpu_lm
    texts = load_texts(args.ppl_data)
    cases = datasets.load_cases(args.data).cases
    methods = args.methods.split(",")
    info = {"device": torch.cuda.get_device_name() if lm.device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "data": Path(args.data).name,
            "n": args.n, "seq": args.seq, "seed": args.seed, "test_prefix": args.test_prefix, "runs": {}}

    every = [int(k) for k in args.monitor_every.split(",")]
    every = dict(zip(methods, every if len(every) == len(methods) else every * len(methods)))

    def settings(method, sequential):
        return RunSettings(method=method, model=lm.name, layer=hp.layer, seed=args.seed,
                                 test_prefix=args.test_prefix, data=Path(args.data).name,
                                 ppl_data=Path(args.ppl_data).name, sequential=sequential,
                                 monitor_every=every[method] if sequential else 1)

    runs = {}
    for kind, n, sequential in (("eval", args.n, False), ("seq", args.seq, True)):
        for method in methods:
            path = out / f"{kind}-{method}.jsonl"
            if sequential and path.exists():  # a sequential run can't resume: start it anew
                path.unlink()
                timing_path(path).unlink(missing_ok=True)
            t = time.perf_counter()
            records = evaluate.run(lm, cases[:n], RunContext(settings(method, sequential), hp, templates, texts), path,
                                   resume=True)
            runs[(kind, method)] = records
            info["runs"][f"{kind}-{method}"] = {"seconds": time.perf_counter() - t,
                                                "cases_per_minute": summary.cases_per_minute(path)}
            print(f"{kind}-{method}: {len(records)} records, {info['runs'][f'{kind}-{method}']}", flush=True)

    # tables and plot from every run in the folder (a method may have run in an earlier invocation)
    for kind, name in (("eval", "reference-table.md"), ("seq", "sequential-table.md")):
        found = {m: ResultsFile(out / f"{kind}-{m}.jsonl").read() for m in ("rome", "crome")}
        found = {m: recs for m, recs in found.items() if recs}
        if not found:
            continue
        header, rows = summary.side_by_side([(m.upper().replace("CROME", "C-ROME"), recs) for m, recs in found.items()])
        (out / name).write_text(summary.to_markdown(header, rows))
        print(summary.to_markdown(header, rows))
        if kind == "seq":
            plot_sequential(found, out / "sequential.png")
    (out / "run.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
