"""Where users look (issue 38): single edits read in four places, the candidates side by side.

Each method edits the same counterfact-val cases with crome's defaults (key statistics, ``--guard
verify``, whose check now includes the bare prompt) and ``--gen-em``; the runs share each case's keys
and v* (computed once: they do not depend on the method), so a case costs one v* optimisation, not one
per method. Every run's results file is a ``crome eval`` results file (``crome summarize`` reads it)
and resumes: kill it whenever, the same command continues. The files live in the repository
(``docs/results/where_users_look/records/<model>/``, committed): a run longer than a session (Gemma 3,
~70 s per case on 2 cores, most of it perplexity through a 262k-token output layer) goes on from them in
the next one, and the table can be recomputed from them (``--report``; a model without records here
keeps its committed table).

The table reads every case where a user would, an edit the guard rolled back counting as the unedited
model (its efficacy before the edit; its generation never names the counterfactual target, scored 0):

* bare: ES and generation EM of the prompt as typed; natural: after a natural sentence
  (``scoring.readings.NATURAL_LEAD_INS``); prefix: after the test-time prefix; chat: the greedy answer
  through the chat template names the new target first;
* paraphrases: PS and generation EM; NS and NM (the neighbours' mean margin P(true) − P(new), which
  shows whether an NS difference is a margin or a tie flipped at 10⁻⁶); the perplexity ratio on ME-PPL_50 (median, max) and the
  collapse rate;
* the first-position check (``--sink``, ``sink.json``): each method's edit of a first-token subject,
  perplexity ratio on ME-PPL texts as they are (other first tokens) and after the subject (the bare
  key itself);
* the chat reading's reference (``chat_reference.json``): how often the unedited model names the true
  target through the chat template, on the same prompts and paraphrases (how often it answers a
  completion asked through the template with the object at all);
* ``crome→rome``: the per-edit fallback baseline, C-ROME's edit where the guard kept it, else ROME's
  (from the two runs; no extra edit).

    python benchmarks/where_users_look.py --methods rome crome dual --n 200
    python benchmarks/where_users_look.py --model $G --methods rome crome dual --n 200
    python benchmarks/where_users_look.py --report --docs docs/results/where_users_look
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from benchlib import DATA, emit

SPLITS = (("all", None), ("first-token subject", True), ("other subjects", False))
# (column, record group, metric): the table's readings, the unedited model's where the edit was rolled back
READINGS = (("bare ES", "metrics", "es"), ("bare gen EM", "metrics", "gen_em"),
            ("natural ES", "metrics_natural", "es"), ("natural gen EM", "metrics_natural", "gen_em"),
            ("prefix ES", "metrics_prefixed", "es"), ("prefix gen EM", "metrics_prefixed", "gen_em"),
            ("chat EM", "metrics", "gen_em_chat"), ("PS", "metrics", "ps"),
            ("paraphrase gen EM", "metrics", "gen_em_paraphrase"),
            ("chat EM paraphrase", "metrics", "gen_em_chat_paraphrase"), ("NS", "metrics", "ns"),
            ("NM", "metrics", "nm"))
BEFORE = {"metrics": "before", "metrics_natural": "before_natural", "metrics_prefixed": "before_prefixed"}
FALLBACK = ("crome", "rome")   # the per-edit baseline: the first method's kept edit, else the second's


def model_tag(model: str | None) -> str:
    return Path(model).stem if model else "default"


def run(args) -> None:
    """Edit the first ``--n`` cases with every method, the keys and v* shared, into one results file each."""
    from crome.evaluation.cases import evaluate_cases, prepare_together
    from crome.evaluation.jobs import EvalJob, cases_of, load, prepare, with_checks
    from crome.evaluation.results import ResultsFile, check_resumable

    folder = Path(args.out_dir) / model_tag(args.model)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = {m: EvalJob(data=args.data, out=str(folder / f"{m}.jsonl"), model=args.model, method=m, seed=args.seed,
                       ppl_data=args.ppl_data, gen_em=True, gen_tokens=0, guard="verify", n_cases=args.n,
                       resume=True) for m in args.methods}
    first = next(iter(jobs.values()))
    cases = cases_of(first)[0][:args.n]
    lm = load(first, progress=False)
    ctxs = {m: with_checks(lm, prepare(lm, job), job).with_monitor(lm) for m, job in jobs.items()}
    files = {m: ResultsFile(job.out) for m, job in jobs.items()}
    done = {}
    for m, f in files.items():
        records = f.read()
        check_resumable(records, ctxs[m].settings, f.path, True)
        done[m] = {r["case_id"] for r in records}
    if args.sink and not (folder / "sink.json").exists():
        sink_check(lm, ctxs, cases, ctxs[first.method].texts[:args.sink_texts], args.sink, folder / "sink.json")
    if args.chat_reference and not (folder / "chat_reference.json").exists():
        chat_reference(lm, cases, folder / "chat_reference.json")
    todo = [c for c in cases if any(c.case_id not in done[m] for m in jobs)]
    print(f"{lm.name}: {len(todo)} of {len(cases)} cases to edit with {', '.join(jobs)}", flush=True)
    for at in range(0, len(todo), args.per_pass):
        chunk, start = todo[at:at + args.per_pass], time.perf_counter()
        shared = prepare_together(lm, chunk, ctxs[first.method])
        for m, ctx in ctxs.items():
            mine = [c for c in chunk if c.case_id not in done[m]]
            for rec, _ in evaluate_cases(lm, mine, ctx, prepared_by_id=shared):
                files[m].append(rec.to_dict())
        print(f"{at + len(chunk)}/{len(todo)} cases, {(time.perf_counter() - start) / len(chunk):.1f} s per case",
              flush=True)


def sink_check(lm, ctxs: dict, cases: list, texts: list[str], n: int, out: Path) -> dict:
    """Does writing the bare key of a first-token subject move every text's first position? For the first
    ``n`` first-token-subject cases, each method's edit is applied and the perplexity ratio measured on
    ``texts`` as they are (other first tokens) and on the same texts after the subject (the same first
    tokens: the bare key itself). {method: {"other first tokens": [...], "the subject first": [...]}}."""
    from crome.editing.edit import apply_edit, finish_edit, prepare_edit
    from crome.editing.mom2 import stats_for
    from crome.scoring.measure import perplexity

    firsts = [c for c in cases if c.request.text().startswith(c.request.subject)][:n]
    base_other = perplexity(lm, texts)
    result = {m: {"other first tokens": [], "the subject first": []} for m in ctxs}
    for case in firsts:
        ctx = next(iter(ctxs.values()))
        prepared = prepare_edit(lm, case.request, ctx.hparams, ctx.templates, ctx.settings.seed)
        same = [f"{case.request.subject} {t}" for t in texts]
        base_same = perplexity(lm, same)
        for m, ctx in ctxs.items():
            edit = finish_edit(lm, prepared, m, stats_for(lm, prepared.hparams, ctx.stats))
            with apply_edit(lm, edit):
                result[m]["other first tokens"].append(round(perplexity(lm, texts) / base_other, 5))
                result[m]["the subject first"].append(round(perplexity(lm, same) / base_same, 5))
    summary = {m: {k: dict(median=statistics.median(v), max=max(v), n=len(v)) for k, v in got.items() if v}
               for m, got in result.items()}
    emit(dict(cases=[c.case_id for c in firsts], texts=len(texts), ratios=result, summary=summary), str(out))
    return summary


def chat_reference(lm, cases: list, out: Path) -> dict:
    """The chat reading's reference: how often the unedited model, asked through its chat template as the
    chat reading asks, names the true target (before the counterfactual one) on the edit prompt and on its
    paraphrases, i.e. how often it answers with the object at all. {"prompt": share, "paraphrase": share,
    "n": cases}; {} without a template."""
    from crome.scoring.measure import greedy_answers
    from crome.scoring.readings import CHAT_TOKENS, chat_answer_matches, chat_text

    rows = [(c, kind, chat_text(lm.tokenizer, p)) for c in cases
            for kind, p in (("prompt", c.request.text()), *(("paraphrase", q) for q in c.paraphrase_prompts))]
    if any(text is None for _, _, text in rows):
        return {}
    answers = greedy_answers(lm, [text for _, _, text in rows], [CHAT_TOKENS] * len(rows))
    hits = {"prompt": [], "paraphrase": []}
    for (case, kind, _), answer in zip(rows, answers):
        hits[kind].append(chat_answer_matches(answer, case.request.target_true, case.request.target_new))
    result = {kind: round(statistics.fmean(v), 3) for kind, v in hits.items() if v} | {"n": len(cases)}
    emit(dict(result, cases=[c.case_id for c in cases], answers=answers[:20]), str(out))
    return result


def reading(rec: dict, group: str, key: str) -> float | None:
    """One reading of a case as the user meets it: the edited model's, or the unedited model's when the
    guard rolled the edit back (a generation of the counterfactual target: 0)."""
    if rec.get("applied"):
        v = (rec.get(group) or {}).get(key)
    elif key.startswith("gen_em"):
        return 0.0
    else:
        v = (rec.get(BEFORE[group]) or {}).get(key)
    return None if v is None else float(v)


def measured(records: list[dict], group: str, key: str) -> bool:
    """Whether a reading exists for these records' model at all (a model without a chat template has no
    chat reading): some kept edit has it. A rolled-back edit counts 0 only for a reading that exists."""
    return any(r.get("applied") and (r.get(group) or {}).get(key) is not None for r in records)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return round(statistics.fmean(values), 3) if values else None


def table_row(records: list[dict]) -> dict:
    """The readings of one method on one split, and its perplexity and collapse numbers."""
    row = {"cases": len(records), "kept": sum(bool(r.get("applied")) for r in records)}
    for column, group, key in READINGS:
        row[column] = _mean([reading(r, group, key) for r in records]) if measured(records, group, key) else None
    ratios = [r["ppl_ratio"] for r in records if r.get("applied") and r.get("ppl_ratio") is not None]
    row["ppl ratio median"] = round(statistics.median(ratios), 4) if ratios else None
    row["ppl ratio max"] = round(max(ratios), 4) if ratios else None
    row["collapsed"] = sum(bool(r.get("collapsed")) for r in records)
    return row


def combined(by_method: dict[str, list[dict]]) -> list[dict] | None:
    """The per-edit fallback baseline: ``FALLBACK[0]``'s record where its edit was kept, else ``FALLBACK[1]``'s."""
    if not all(m in by_method for m in FALLBACK):
        return None
    second = {r["case_id"]: r for r in by_method[FALLBACK[1]]}
    return [r if r.get("applied") or r["case_id"] not in second else second[r["case_id"]]
            for r in by_method[FALLBACK[0]] if r["case_id"] in second]


# the readings whose paired differences the table shows, in this order (each one of ``READINGS``)
PAIRED = tuple(next(r for r in READINGS if r[0] == column)
               for column in ("bare gen EM", "paraphrase gen EM", "chat EM", "bare ES", "NS", "NM"))
BASELINE = "rome"   # the paired differences are against the reference implementation's edits


def paired(by_method: dict[str, list[dict]]) -> dict:
    """Each method's readings minus ``BASELINE``'s on the same cases: mean, 95% interval half-width, cases
    where it is higher and where lower. {method: {column: {...}}}."""
    if BASELINE not in by_method:
        return {}
    base = {r["case_id"]: r for r in by_method[BASELINE]}
    out = {}
    for m, recs in by_method.items():
        if m == BASELINE:
            continue
        out[m] = {}
        for column, group, key in PAIRED:
            if not (measured(recs, group, key) and measured(by_method[BASELINE], group, key)):
                continue
            d = [a - b for r in recs if r["case_id"] in base
                 for a, b in [(reading(r, group, key), reading(base[r["case_id"]], group, key))]
                 if a is not None and b is not None]
            if len(d) > 1:
                out[m][column] = difference(d, 3)
    return out


def difference(d: list[float], digits: int) -> dict:
    """Paired differences summarised: mean, 95% interval half-width, cases higher and lower."""
    return dict(diff=round(statistics.fmean(d), digits), ci95=round(1.96 * statistics.stdev(d) / math.sqrt(len(d)), digits),
                higher=sum(x > 0 for x in d), lower=sum(x < 0 for x in d), n=len(d))


PPL_BASELINE = "crome"   # perplexity is compared with the consistent edit's, the issue's bar (≤ C-ROME's)


def paired_ppl(by_method: dict[str, list[dict]]) -> dict:
    """Each method's ME-PPL_50 ratio minus ``PPL_BASELINE``'s on the cases both kept: mean, 95% interval
    half-width, median, cases higher and lower. {method: {...}}."""
    kept = {m: {r["case_id"]: r["ppl_ratio"] for r in recs if r.get("applied") and r.get("ppl_ratio") is not None}
            for m, recs in by_method.items()}
    base = kept.get(PPL_BASELINE, {})
    out = {}
    for m, ratios in kept.items():
        d = [ratio - base[case] for case, ratio in ratios.items() if case in base]
        if m != PPL_BASELINE and len(d) > 1:
            out[m] = difference(d, 5) | dict(median=round(statistics.median(d), 5))
    return out


def tradeoff_figure(result: dict, path: Path) -> None:
    """Bare efficacy against perplexity, one panel per model: each method's bare generation EM against its
    median ME-PPL_50 ratio, on all cases (o) and on first-token subjects (^); the dotted line is the
    issue's median bound, 1.01."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m, got in result.items() if got["splits"].get("all")]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for split, marker in (("all", "o"), ("first-token subject", "^")):
            points = {}   # methods at the same point share one label
            for i, (m, row) in enumerate(result[model]["splits"].get(split, {}).items()):
                x, y = row.get("ppl ratio median"), row.get("bare gen EM")
                if x is not None and y is not None:
                    ax.scatter(x, y, marker=marker, color=f"C{i}")
                    points.setdefault((x, y), []).append(m)
            for xy, names in points.items():
                ax.annotate(", ".join(names), xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(1.01, ls=":", color="grey")
        ax.set(title=model, xlabel="ME-PPL_50 ratio, median", ylabel="bare generation EM")
    fig.suptitle("bare efficacy against perplexity (o all cases, ^ first-token subjects; dotted: median bound 1.01)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def report(args) -> dict:
    """{model: {split: {method: row}}} from the runs so far (the cases every method has edited, paired),
    written as JSON and Markdown."""
    out = {}
    for folder in sorted(p for p in Path(args.out_dir).iterdir() if p.is_dir()):
        by_method = {f.stem: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                     for f in sorted(folder.glob("*.jsonl")) if not f.name.endswith(".timing.jsonl")}
        if not by_method:
            continue
        common = set.intersection(*({r["case_id"] for r in recs} for recs in by_method.values()))
        by_method = {m: [r for r in recs if r["case_id"] in common] for m, recs in by_method.items()}   # paired
        fallback = combined(by_method)
        if fallback:
            by_method["→".join(FALLBACK)] = fallback
        model = next((recs[0]["model"] for recs in by_method.values() if recs), folder.name)
        splits = {split: {m: table_row([r for r in recs if first is None or r.get("first_token_subject") is first])
                          for m, recs in by_method.items()} for split, first in SPLITS}
        sink = folder / "sink.json"
        first_position = json.loads(sink.read_text())["summary"] if sink.exists() else {}
        for kinds in first_position.values():
            for v in kinds.values():
                v["median"] = round(v["median"], 4)
        reference = folder / "chat_reference.json"
        chat = {k: v for k, v in json.loads(reference.read_text()).items() if k in ("prompt", "paraphrase", "n")} \
            if reference.exists() else {}
        out[model] = dict(splits=splits, first_position=first_position, chat_reference=chat, paired=paired(by_method),
                          paired_ppl=paired_ppl(by_method))
    if args.docs:
        out = {**kept_tables(Path(args.docs) / "where_users_look.json", out), **out}
        emit(out, str(Path(args.docs) / "where_users_look.json"))
        (Path(args.docs) / "where_users_look.md").write_text(markdown(out))
        tradeoff_figure(out, Path(args.docs) / "where_users_look_tradeoff.png")
    print(markdown(out))
    return out


def kept_tables(path: Path, fresh: dict) -> dict:
    """The tables already in ``path`` of models not in ``fresh`` (their runs are not here: another session
    ran them): kept as they are, not dropped, when the report is written again."""
    if not path.exists():
        return {}
    kept = {m: got for m, got in json.loads(path.read_text()).items() if m not in fresh}
    for model in kept:
        print(f"{model}: no runs here, its table is kept from {path}")
    return kept


def markdown(result: dict) -> str:
    lines = []
    for model, got in result.items():
        for split, rows in got["splits"].items():
            if not rows:
                continue
            columns = list(next(iter(rows.values())))
            lines += [f"**{model}, {split}**", "", "| method | " + " | ".join(columns) + " |",
                      "|---|" + "---:|" * len(columns)]
            lines += [f"| {m} | " + " | ".join("-" if row[c] is None else str(row[c]) for c in columns) + " |"
                      for m, row in rows.items()]
            lines.append("")
        if got.get("paired"):
            lines += [f"**{model}, paired differences against {BASELINE}** (mean ± 95% interval; cases higher / lower)",
                      "", "| method | " + " | ".join(c for c, _, _ in PAIRED) + " |", "|---|" + "---:|" * len(PAIRED)]
            lines += [f"| {m} | " + " | ".join(f"{v['diff']:+.3f} ± {v['ci95']:.3f} ({v['higher']} / {v['lower']})"
                                             if (v := cols.get(c)) else "-" for c, _, _ in PAIRED) + " |"
                      for m, cols in got["paired"].items()]
            lines.append("")
        if got.get("paired_ppl"):
            lines += [f"**{model}, ME-PPL_50 ratio minus {PPL_BASELINE}'s** (paired, cases both kept): " + "; ".join(
                f"{m} {v['diff']:+.5f} ± {v['ci95']:.5f}, median {v['median']:+.5f} ({v['higher']} / {v['lower']})"
                for m, v in got["paired_ppl"].items()), ""]
        if got.get("chat_reference"):
            c = got["chat_reference"]
            lines += [f"**{model}, the chat reading's reference**: the unedited model, asked through the template, names "
                      f"the true target in {c.get('prompt')} of the edit prompts and {c.get('paraphrase')} of the "
                      f"paraphrases ({c['n']} cases)", ""]
        if got["first_position"]:
            lines += [f"**{model}, first-position check: perplexity ratio after a first-token subject's edit**", "",
                      "| method | texts | median | max | edits |", "|---|---|---:|---:|---:|"]
            lines += [f"| {m} | {kind} | {v['median']} | {v['max']} | {v['n']} |"
                      for m, kinds in got["first_position"].items() for kind, v in kinds.items()]
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="A model id, folder or GGUF file (default: crome's default model).")
    ap.add_argument("--methods", nargs="+", default=["rome", "crome", "dual"])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--per-pass", type=int, default=2, help="Cases whose keys and v* are computed together.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sink", type=int, default=20, help="First-token cases of the first-position check (0: none).")
    ap.add_argument("--chat-reference", action=argparse.BooleanOptionalAction, default=True,
                    help="How often the unedited model names the true target through the chat template (once per model).")
    ap.add_argument("--sink-texts", type=int, default=20, help="ME-PPL texts of the first-position check.")
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-val.json"))
    ap.add_argument("--ppl-data", default=str(DATA / "me-ppl" / "ME-PPL_50.json"))
    ap.add_argument("--out-dir", default="docs/results/where_users_look/records",
                    help="The per-case records (committed: a run that outlasts a session resumes from them).")
    ap.add_argument("--report", action="store_true", help="Write the table from the runs so far.")
    ap.add_argument("--docs", default=None)
    args = ap.parse_args()
    report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
