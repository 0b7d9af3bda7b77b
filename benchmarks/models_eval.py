"""Evidence for docs/MODELS.md: C-ROME on real models, key statistics off and on, two layer rules.

For each model, for the layer of the table (or the 20%-depth rule where the model has no
entry) and the ``auto`` layer (causal trace), and for each source of key statistics:

* ``off``: C = I (the "Fall of ROME" setting);
* ``model``: text sampled from the model itself (crome's default);
* ``passages``: the 50 passages that ship with crome (~2k keys, shrinkage does the rest);
* ``wikipedia``: 20k keys of the Wikipedia summaries in the shared data (the reference source);

the first N counterfact-val cases are edited with C-ROME. Keys and v* do not depend on C, so
they are computed once per case and layer, and each C gives its own update (edit.finish_edit),
which is applied, measured (ES/PS/NS with and without the test-time prefix, perplexity ratio
on ME-PPL_50, cosine of the update direction u with the Wikipedia one) and restored.

Results go to one JSONL per model (resumable); ``--summarize`` writes docs/MODELS.md tables.

    python benchmarks/models_eval.py --model default --n 50
    python benchmarks/models_eval.py --model path/to/gemma-3-270m-q4_k_m.gguf --n 50
    python benchmarks/models_eval.py --summarize docs/results/models/*.jsonl
    python benchmarks/models_eval.py --compare OLD.jsonl NEW.jsonl   # the `model` rows of two runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

DATA = Path(os.environ.get("CROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SOURCES = ("off", "model", "passages", "wikipedia")


def run(args) -> None:
    import torch
    import transformers

    from crome.editing.api import prepare_edit
    from crome.editing.edit import apply_edit, finish_edit
    from crome.editing.hparams import DEFAULTS, defaults_for
    from crome.editing.layer_choice import auto_layer
    from crome.editing.mom2 import key_stats
    from crome.editing.templates import context_templates
    from crome.evaluation import datasets
    from crome.evaluation.scores import case_metrics, case_pairs
    from crome.models import load_model
    from crome.scoring.measure import choose_test_prefix, score_targets
    from crome.scoring.monitor import PerplexityMonitor
    from crome.scoring.texts import default_corpus_path, load_texts

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(None if args.model == "default" else args.model, progress=False)
    out = Path(args.out or f"docs/results/models/{lm.name}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["layer_rule"], r["source"], r["case_id"]))

    base = defaults_for(lm.name, lm.num_layers)
    table_rule = "table" if lm.name in DEFAULTS else "depth 20%"
    t0 = time.perf_counter()
    auto = auto_layer(lm)
    auto_seconds = time.perf_counter() - t0
    layers = {rule: layer for rule, layer in {table_rule: base.layer, "auto": auto.layer}.items()
              if not args.layer_rules or rule.split()[0] in args.layer_rules}
    cases = datasets.load_cases(DATA / "counterfact" / "counterfact-val.json").cases[: args.n]
    texts = load_texts(DATA / "me-ppl" / "ME-PPL_50.json")
    corpora = {"model": None, "passages": default_corpus_path(),
               "wikipedia": DATA / "wikipedia" / "vital_articles_summaries_en.json"}
    templates = context_templates(lm, 0, base.template_lengths, base.template_starts)

    setups = []  # per layer: (rule, layer, hparams, key statistics per source, seconds per source, monitor)
    for rule, layer in dict.fromkeys(layers.items()):
        stats, cost = {}, {}
        for name in args.sources:
            t = time.perf_counter()
            stats[name] = None if name == "off" else key_stats(lm, layer, corpora[name], 20000, progress=False)
            cost[name] = None if name == "off" else time.perf_counter() - t
        setups.append((rule, layer, base.with_(layer=layer), stats, cost, PerplexityMonitor(lm, texts, layer)))
    for case in cases:  # cases outside, layers inside: a cut-short run still compares the layers
        for rule, layer, hp, stats, cost, monitor in setups:
            todo = [s for s in args.sources if (rule, s, case.case_id) not in done]
            if not todo:
                continue
            t = time.perf_counter()
            prepared = prepare_edit(lm, case.request, hparams=hp, templates=templates, seed=0)
            v_seconds = time.perf_counter() - t
            pairs, where = case_pairs(case)
            prefix = choose_test_prefix("fixed", templates, 0, case.case_id)
            before = score_targets(lm, pairs)
            before_px = score_targets(lm, pairs, prefix=prefix)
            u_ref = finish_edit(lm, prepared, "crome", stats["wikipedia"]).vectors.u if "wikipedia" in stats else None
            cos_by_source = None
            if u_ref is not None:  # the update direction of every source against Wikipedia's, same keys and v*
                cos_by_source = {name: float(torch.nn.functional.cosine_similarity(
                    finish_edit(lm, prepared, "crome", st).vectors.u, u_ref, dim=0)) for name, st in stats.items()}
            for name in todo:
                edit = finish_edit(lm, prepared, "crome", stats[name])
                u = edit.vectors.u
                rec = dict(model=lm.name, case_id=case.case_id, layer_rule=rule, layer=layer, source=name,
                           key_stats=edit.key_stats, stats_seconds=cost.get(name), v_seconds=v_seconds,
                           auto_layer=auto.record(), auto_seconds=auto_seconds,
                           first_token_subject=edit.diagnostics.first_token_subject,
                           denominator=edit.diagnostics.denominator, update_ratio=edit.diagnostics.update_ratio,
                           cos_u_wikipedia=float(torch.nn.functional.cosine_similarity(u, u_ref, dim=0))
                           if u_ref is not None else None, cos_u_by_source=cos_by_source, ppl_before=monitor.baseline)
                if edit.diagnostics.finite:
                    with apply_edit(lm, edit):
                        rec["metrics"] = case_metrics(score_targets(lm, pairs), where, before)
                        rec["metrics_prefixed"] = case_metrics(score_targets(lm, pairs, prefix=prefix), where, before_px)
                        ppl = monitor()
                    rec.update(ppl_after=ppl, ppl_ratio=ppl / monitor.baseline)
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            print(f"{lm.name} {rule} L{layer} case {case.case_id}: {time.perf_counter() - t:.1f}s", flush=True)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else float("nan")


def _row(label: str, rs: list[dict], cos: list[float] | None) -> str:
    ok = [r for r in rs if r.get("metrics")]
    ratios = [r["ppl_ratio"] for r in ok]
    m = {k: _mean([r["metrics"][k] for r in ok]) for k in ("es", "ps", "ns")}
    mp = {k: _mean([r["metrics_prefixed"][k] for r in ok]) for k in ("es", "ps", "ns")}
    ks = rs[0]["key_stats"] or {}
    secs = [r["stats_seconds"] for r in rs if r.get("stats_seconds") is not None]
    return (f"| {label} | {len(rs)} | {m['es']:.2f} | {m['ps']:.2f} | {m['ns']:.2f} | "
            f"{mp['es']:.2f} / {mp['ps']:.2f} / {mp['ns']:.2f} | {statistics.median(ratios):.3f} | {max(ratios):.3f} | "
            f"{sum(x > 2 for x in ratios)} | {('%.3f' % statistics.median(cos)) if cos else '-'} | "
            f"{ks.get('n_keys', '-')} | {'%.3g' % ks['shrinkage'] if ks else '-'} | "
            f"{('%.0f' % max(secs)) if secs else '-'} |")


HEADER = ("| ES | PS | NS | ES / PS / NS, test prefix | ppl ratio median | ppl ratio max | > 2× | cos(u, u_wiki) median "
          "| keys | λ | stats s |")


def compare(old_path: str, new_path: str, source: str = "model") -> str:
    """The ``source`` rows of two results files on the cases and layers both have: one table row
    each (as ``summarize``), and how far the cases moved (e.g. C before and after a sampler change)."""
    def rows(path):
        recs = [json.loads(line) for line in Path(path).read_text().splitlines()]
        by_case = {(r["layer"], r["case_id"]): dict(r) for r in recs if r["source"] == source}
        for r in recs:   # cos(u, u_wiki): the Wikipedia row of the same case has every source's
            key = (r["layer"], r["case_id"])
            if key in by_case and by_case[key].get("cos_u_wikipedia") is None and r.get("cos_u_by_source"):
                by_case[key]["cos_u_wikipedia"] = r["cos_u_by_source"].get(source)
        return by_case
    old, new = rows(old_path), rows(new_path)
    common = sorted(set(old) & set(new))
    name = lambda p: "/".join(Path(p).parts[-2:])  # noqa: E731
    lines = [f"**`{source}` key statistics, {name(old_path)} against {name(new_path)}: "
             f"{len(common)} (layer, case) pairs**", "", "| C | n " + HEADER, "|---|" + "---:|" * 4 + "---|" + "---:|" * 7]
    with_cos = [c for c in common if old[c].get("cos_u_wikipedia") is not None
                and new[c].get("cos_u_wikipedia") is not None]
    for label, recs in ((old_path, old), (new_path, new)):
        rs = [recs[c] for c in common]
        cos = [recs[c]["cos_u_wikipedia"] for c in with_cos]
        ks = rs[0]["key_stats"]
        lines.append(_row(f"{ks['source']}, `{ks['hash']}`", rs, cos))
    both = [c for c in common if old[c].get("metrics") and new[c].get("metrics")]
    moved = {k: max(abs(old[c]["metrics"][k] - new[c]["metrics"][k]) for c in both) for k in ("es", "ps", "ns")}
    ratio = max(abs(old[c]["ppl_ratio"] - new[c]["ppl_ratio"]) for c in both)
    lines += ["", f"cos(u, u_wiki) on the {len(with_cos)} cases both runs have it for. Largest change of a case: "
              f"ES {moved['es']:.2f}, PS {moved['ps']:.2f}, NS {moved['ns']:.2f}, perplexity ratio {ratio:.3f}."]
    return "\n".join(lines)


def summarize(paths: list[str]) -> str:
    lines = []
    for path in paths:
        recs = [json.loads(line) for line in Path(path).read_text().splitlines()]
        if not recs:
            continue
        model, auto = recs[0]["model"], recs[0]["auto_layer"]
        groups: dict = {}
        for r in recs:
            groups.setdefault((r["layer_rule"], r["layer"]), {}).setdefault(r["source"], []).append(r)
        lines += [f"### {model}", "",
                  f"C-ROME, seed 0, counterfact-val from its first case; perplexity ratio on ME-PPL_50. Auto layer "
                  f"{auto['layer']} ({auto['rule']}: {auto['detail'].get('n_facts', 0)} of "
                  f"{auto['detail'].get('scanned', '?')} facts known, window {auto['detail'].get('window', '-')}). "
                  f"`stats s`: seconds to compute C (sampling included; 0 when cached).", "",
                  "**Key statistics off vs crome's default, at two layers**", "",
                  "| layer | key statistics | n " + HEADER, "|---|---|" + "---:|" * 4 + "---|" + "---:|" * 7]
        for (rule, layer), by_source in groups.items():
            for source in ("off", "model"):
                if source in by_source:
                    lines.append(_row(f"{layer} ({rule}) | {source}", by_source[source], None))
        lines.append("")
        for (rule, layer), by_source in groups.items():
            if "wikipedia" not in by_source:
                continue
            common = set.intersection(*[{r["case_id"] for r in rs} for rs in by_source.values()])
            cos = {r["case_id"]: r["cos_u_by_source"] for r in by_source["wikipedia"] if r.get("cos_u_by_source")}
            lines += [f"**Sources of C compared on the same {len(common)} cases, layer {layer} ({rule})**", "",
                      "| key statistics | n " + HEADER, "|---|" + "---:|" * 4 + "---|" + "---:|" * 7]
            for source in ("off", "model", "passages", "wikipedia"):
                if source in by_source:
                    rs = [r for r in by_source[source] if r["case_id"] in common]
                    lines.append(_row(source, rs, [cos[c][source] for c in common if c in cos and source in cos[c]]))
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--layer-rules", nargs="+", default=None, choices=("table", "depth", "auto"),
                    help="Only these layers (default: the table's or the depth rule's, and auto).")
    ap.add_argument("--summarize", nargs="+", default=None, help="Results files: print the Markdown tables.")
    ap.add_argument("--doc", default=None, help="With --summarize: put the tables into this Markdown file, "
                                                "between the lines <!-- tables --> and <!-- /tables -->.")
    ap.add_argument("--compare", nargs=2, default=None, metavar=("OLD", "NEW"),
                    help="Two results files: compare their `model` rows on the cases both have.")
    args = ap.parse_args()
    if args.compare:
        print(compare(*args.compare))
    elif args.summarize:
        tables = summarize(args.summarize)
        if args.doc:
            doc = Path(args.doc).read_text()
            head, rest = doc.split("<!-- tables -->\n", 1)
            _, tail = rest.split("<!-- /tables -->", 1)
            Path(args.doc).write_text(head + "<!-- tables -->\n" + tables + "\n<!-- /tables -->" + tail)
        else:
            print(tables)
    else:
        run(args)
