"""``crome analyze``: the "Fall of ROME" findings, checked on your own model.

Each analysis writes into one folder: ``<name>.json`` (the numbers behind every plot,
and the settings), ``<name>.md`` (its table) and PNG plots. ``crome report`` turns
such a folder into one HTML page.

* ``update_anatomy``: numerator ‖v* − v_cur‖·‖u‖ against the denominator k_cur·u, per
  case of eval runs; histogram of denominators per method; medians for collapse vs normal.
* ``key_geometry``: k^u, k̄, C⁻¹k̄ and the prefixed keys of each subject, in 2-D (PCA, t-SNE).
* ``first_token_experiment``: collapse cases edited again with random text before the subject.
* ``prefix_effect``: efficacy with and without the test-time prefix, by subject position.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import numpy as np
import torch

from ..evaluation.results import json_safe
from ..evaluation.summary import to_markdown

KIND_COLOURS = {"k^u, first-token subject": "tab:red", "k^u, other subject": "tab:orange",
                "k̄ (mean over prefixes)": "tab:blue", "prefixed key": "tab:grey", "C⁻¹k̄": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write(out_dir: Path, name: str, data: dict, header: list[str], rows: list[list[str]]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(json_safe(data), indent=1, allow_nan=False, default=_jsonable))
    (out_dir / f"{name}.md").write_text(to_markdown(header, rows))
    return data


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def _g(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


# ------------------------------------------------------------------ 1. update anatomy

ANATOMY = ("denominator", "numerator_norm", "update_norm", "update_ratio", "cos_bare_mean")


def update_anatomy(runs: list[tuple[str, list[dict]]], out_dir: Path) -> dict:
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    points = []
    for label, recs in runs:
        for r in recs:
            if r.get("denominator") is None:
                continue
            points.append(dict(run=label, method=r["method"], case_id=r["case_id"],
                               collapsed=bool(r.get("collapsed")), first_token_subject=r.get("first_token_subject"),
                               **{k: r[k] for k in ANATOMY}))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, _ in runs:
        pts = [p for p in points if p["run"] == label]
        ax.scatter([abs(p["denominator"]) for p in pts if not p["collapsed"]],
                   [p["numerator_norm"] for p in pts if not p["collapsed"]], s=12, alpha=0.6, label=f"{label}")
        bad = [p for p in pts if p["collapsed"]]
        if bad:
            ax.scatter([abs(p["denominator"]) for p in bad], [p["numerator_norm"] for p in bad], s=60,
                       marker="x", color="red", label=f"{label}: collapsed")
    ax.set(xscale="log", yscale="log", xlabel="|denominator| k_cur·u", ylabel="numerator ‖v* − v_cur‖",
           title="Update anatomy: collapse comes from the denominator")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "update_scatter.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    dens = [abs(p["denominator"]) for p in points]
    bins = np.logspace(math.log10(max(min(dens), 1e-6)), math.log10(max(dens)) + 1e-9, 30) if dens else 10
    for label, _ in runs:
        ax.hist([abs(p["denominator"]) for p in points if p["run"] == label], bins=bins, alpha=0.6, label=label)
    ax.set(xscale="log", xlabel="|denominator| k_cur·u", ylabel="edits", title="Denominators")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "denominator_hist.png", dpi=110)
    plt.close(fig)

    medians, rows = {}, []
    for label, _ in runs:
        for group, flag in (("collapsed", True), ("normal", False)):
            pts = [p for p in points if p["run"] == label and p["collapsed"] is flag]
            m = {k: statistics.median([p[k] for p in pts]) if pts else math.nan for k in ANATOMY}
            medians[f"{label} / {group}"] = dict(n=len(pts), **m)
            rows.append([label, group, str(len(pts))] + [_g(m[k]) for k in ANATOMY])
    data = dict(points=points, medians=json_safe(medians), plots=["update_scatter.png", "denominator_hist.png"])
    return _write(out_dir, "update_anatomy", data, ["run", "edits", "n"] + [f"median {k}" for k in ANATOMY], rows)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


# ------------------------------------------------------------------ 2. key geometry

def _plot_keys(p, kinds: list[str], title: str, path: Path) -> None:
    """A 2-D projection of the keys, coloured by kind."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for kind, colour in KIND_COLOURS.items():
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            ax.scatter(p[idx, 0], p[idx, 1], s=9 if kind == "prefixed key" else 22, c=colour, label=kind,
                       alpha=0.5 if kind == "prefixed key" else 0.9)
    ax.set(title=title, xticks=[], yticks=[])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def key_geometry(lm, cases, layer: int, templates: list[str], out_dir: Path, mom2: torch.Tensor | None = None,
                 seed: int = 0) -> dict:
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from ..editing.compute_key import compute_keys

    vectors, kinds, owners, per_case = [], [], [], []
    for case in cases:
        keys = compute_keys(lm, case.request, layer, templates)
        first = keys.first_token_subject
        c_inv_k = torch.linalg.solve(mom2.to(keys.k_mean), keys.k_mean) if mom2 is not None else keys.k_mean
        sampled = keys.keys[1:] if len(keys.keys) > 1 else keys.keys  # drop the bare "{}" template
        rows = [(keys.k_bare, "k^u, first-token subject" if first else "k^u, other subject"),
                (keys.k_mean, "k̄ (mean over prefixes)")]
        if mom2 is not None:
            rows.append((c_inv_k, "C⁻¹k̄"))
        rows += [(k, "prefixed key") for k in sampled]
        for v, kind in rows:
            vectors.append(v.cpu().numpy())
            kinds.append(kind)
            owners.append(case.case_id)
        cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
        per_case.append(dict(case_id=case.case_id, first_token_subject=first,
                             cos_bare_mean=cos(keys.k_bare, keys.k_mean),
                             cos_bare_prefixed=float(np.mean([cos(keys.k_bare, k) for k in sampled])),
                             norm_bare=float(keys.k_bare.norm()), norm_mean=float(keys.k_mean.norm()),
                             norm_prefixed=float(sampled.norm(dim=1).mean()),
                             denominator_rome=float(keys.k_bare @ (c_inv_k / c_inv_k.norm())),
                             denominator_crome=float(keys.k_mean @ (c_inv_k / c_inv_k.norm()))))
    x = np.stack(vectors)
    xs = (x - x.mean(0)) / (x.std(0) + 1e-8)
    proj = {"pca": PCA(n_components=2, random_state=seed).fit_transform(xs)}
    if len(x) > 5:
        proj["tsne"] = TSNE(n_components=2, random_state=seed, init="pca",
                            perplexity=min(30.0, (len(x) - 1) / 3)).fit_transform(xs)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, p in proj.items():
        _plot_keys(p, kinds, f"Keys at layer {layer}, {name.upper()}", out_dir / f"keys_{name}.png")
    np.savez_compressed(out_dir / "keys.npz", vectors=x, kinds=np.array(kinds), owners=np.array(owners))

    groups = {"first-token subject": [c for c in per_case if c["first_token_subject"]],
              "other subject": [c for c in per_case if not c["first_token_subject"]]}
    stats = ("cos_bare_mean", "cos_bare_prefixed", "norm_bare", "norm_prefixed", "denominator_rome",
             "denominator_crome")
    summary, rows = {}, []
    for g, cs in groups.items():
        summary[g] = {s: statistics.mean([c[s] for c in cs]) if cs else None for s in stats} | {"n": len(cs)}
        rows.append([g, str(len(cs))] + [_g(summary[g][s]) if cs else "-" for s in stats])
    data = dict(layer=layer, seed=seed, mom2=mom2 is not None, context_templates=templates, cases=per_case,
                summary=summary, plots=[f"keys_{n}.png" for n in proj])
    return _write(out_dir, "key_geometry", data, ["subjects", "n", "mean cos(k^u, k̄)", "mean cos(k^u, prefixed)",
                                                  "‖k^u‖", "‖prefixed‖", "k^u·û (ROME denominator)",
                                                  "k̄·û (C-ROME)"], rows)


# ------------------------------------------------------------------ 3. first-token experiment

def first_token_experiment(lm, records: list[dict], cases_by_id: dict, hp, templates: list[str], monitor,
                           out_dir: Path, k: int = 5, seed: int = 0, stats=None) -> dict:
    """Collapsed ROME cases (or, if fewer than ``k``, the smallest denominators among first-token
    subjects) edited again with random text prepended so the subject is no longer first."""
    from ..editing.edit import apply_edit, compute_edit
    from ..editing.request import EditRequest
    from ..evaluation.measure import collapsed, template_prefix

    rome = [r for r in records if r["method"] == "rome" and r.get("denominator") is not None]
    chosen = [r for r in rome if r.get("collapsed")]
    extra = sorted((r for r in rome if r.get("first_token_subject") and not r.get("collapsed")),
                   key=lambda r: abs(r["denominator"]))
    chosen += extra[: max(0, k - len(chosen))]
    rng = random.Random(seed)
    prefixes = [template_prefix(t) for t in templates if template_prefix(t)]
    results = []
    for r in chosen:
        case = cases_by_id[r["case_id"]]
        prefix = rng.choice(prefixes)
        variants = {"bare prompt": case.request,
                    "random text first": EditRequest.create(f"{prefix} {case.request.prompt}", case.request.subject,
                                                            case.request.target_new, case.request.target_true)}
        row = dict(case_id=r["case_id"], prompt=case.request.text(), prefix=prefix,
                   was_collapsed=bool(r.get("collapsed")))
        for name, req in variants.items():
            edit = compute_edit(lm, req, "rome", hparams=hp, templates=templates, seed=seed, mom2=stats)
            d = edit.diagnostics
            ppl = None
            if d.finite:
                with apply_edit(lm, edit):
                    ppl = monitor()
            row[name] = dict(first_token_subject=d.first_token_subject, denominator=d.denominator,
                             update_ratio=d.update_ratio, ppl_after=ppl,
                             ppl_ratio=ppl / monitor.baseline if ppl else None,
                             collapsed=collapsed(monitor.baseline, ppl) if ppl else True)
        results.append(row)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(results))
    for j, name in enumerate(("bare prompt", "random text first")):
        ax.bar(xs + (j - 0.5) * 0.4, [r[name]["ppl_ratio"] or float("nan") for r in results], 0.4, label=name)
    ax.axhline(2.0, color="red", ls=":", lw=1, label="collapse threshold")
    ax.set(yscale="log", xticks=xs, xticklabels=[r["case_id"] for r in results], xlabel="case",
           ylabel="perplexity ratio after a ROME edit", title="ROME with the subject first vs not first")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "first_token.png", dpi=110)
    plt.close(fig)
    rows = [[r["case_id"], r["prompt"], "yes" if r["was_collapsed"] else "no",
             _g(r["bare prompt"]["denominator"]), _g(r["bare prompt"]["ppl_ratio"]),
             _g(r["random text first"]["denominator"]), _g(r["random text first"]["ppl_ratio"]),
             "yes" if r["random text first"]["collapsed"] else "no"] for r in results]
    data = dict(seed=seed, layer=hp.layer, ppl_before=monitor.baseline, cases=results, plots=["first_token.png"],
                key_stats=stats.record() if stats is not None else None)
    return _write(out_dir, "first_token", data, ["case", "prompt", "collapsed in eval", "denominator (bare)",
                                                 "ppl ratio (bare)", "denominator (text first)",
                                                 "ppl ratio (text first)", "collapsed (text first)"], rows)


# ------------------------------------------------------------------ 4. test-time prefix effect

PREFIX_METRICS = (("ES", "es"), ("EM", "em"), ("rewrite acc", "rewrite_acc"), ("PS", "ps"))


def prefix_effect(records: list[dict], out_dir: Path) -> dict:
    applied = [r for r in records if r.get("applied") and r.get("metrics") and r.get("metrics_prefixed")]
    if not applied:
        raise ValueError("the results hold no metrics with a test-time prefix (run crome eval with --test-prefix)")
    groups = {"first-token subject": [r for r in applied if r["first_token_subject"]],
              "other subject": [r for r in applied if not r["first_token_subject"]]}
    table, rows = {}, []
    for g, recs in groups.items():
        for label, key in PREFIX_METRICS:
            vals = [(r["metrics"][key], r["metrics_prefixed"][key]) for r in recs
                    if _number(r["metrics"].get(key)) and _number(r["metrics_prefixed"].get(key))]
            no, yes = ((statistics.mean(v[0] for v in vals), statistics.mean(v[1] for v in vals)) if vals
                       else (None, None))
            table.setdefault(g, {})[key] = dict(n=len(vals), without=no, with_prefix=yes)
            rows.append([g, label, str(len(vals)), _g(no), _g(yes)])
    plt = _plt()
    fig, axes = plt.subplots(1, len(PREFIX_METRICS), figsize=(12, 3.5))
    for ax, (label, key) in zip(axes, PREFIX_METRICS):
        xs = np.arange(len(groups))
        for j, (name, field) in enumerate((("no prefix", "without"), ("test-time prefix", "with_prefix"))):
            ax.bar(xs + (j - 0.5) * 0.4, [table[g][key][field] or 0 for g in groups], 0.4, label=name)
        ax.set(xticks=xs, xticklabels=[g.replace(" subject", "") for g in groups], title=label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{applied[0]['method']}: efficacy with and without a test-time prefix")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "prefix_effect.png", dpi=110)
    plt.close(fig)
    data = dict(method=applied[0]["method"], test_prefix=applied[0].get("test_prefix"), table=table,
                plots=["prefix_effect.png"])
    return _write(out_dir, "prefix_effect", data, ["subjects", "metric", "n", "without prefix", "with prefix"], rows)


# ------------------------------------------------------------------ 5. causal tracing

def causal_trace(lm, facts, out_dir: Path, n: int = 20, seed: int = 0, window: int = 10,
                 scan: int = 300, chosen_layer: dict | None = None) -> dict:
    """Trace the first ``n`` of the first ``scan`` facts that the model predicts (its top token
    is the answer's first token); plot the mean indirect effects."""
    from ..evaluation.measure import score_targets
    from .trace import GROUPS, KINDS, by_group, trace_fact

    pool = facts[:scan]
    scores = score_targets(lm, [(f.prompt, f.answer) for f in pool])
    known = [f for f, s in zip(pool, scores) if s.hits[0]][:n]
    if not known:
        raise ValueError("the model predicts none of the scanned facts")
    traces = [trace_fact(lm, f.prompt, f.subject, f.answer, seed=seed, window=window) for f in known]
    L = lm.num_layers
    mean = {k: [[float(np.nanmean([by_group(t)[k][g][layer] for t in traces])) for layer in range(L)]
                for g in range(len(GROUPS))] for k in KINDS}
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    titles = {"hidden": "hidden state (single layer)", "mlp": f"MLP output (window {window})",
              "attn": f"attention output (window {window})"}
    cmaps = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
    for ax, k in zip(axes, KINDS):
        im = ax.imshow(np.array(mean[k]), aspect="auto", cmap=cmaps[k])
        ax.set(yticks=range(len(GROUPS)), yticklabels=GROUPS, xlabel="layer", title=f"Restoring the {titles[k]}")
        fig.colorbar(im, ax=ax, label="mean indirect effect")
    fig.tight_layout()
    fig.savefig(out_dir / "trace_heatmap.png", dpi=110)
    plt.close(fig)
    last = GROUPS.index("last subject token")
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in KINDS:
        ax.plot(range(L), mean[k][last], label=titles[k])
    if chosen_layer is not None:
        ax.axvline(chosen_layer["layer"], color="k", ls=":", lw=1,
                   label=f"edited layer {chosen_layer['layer']} ({chosen_layer['rule']})")
    ax.set(xlabel="layer", ylabel="mean indirect effect at the last subject token",
           title=f"Causal trace over {len(traces)} known facts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "trace_last_subject.png", dpi=110)
    plt.close(fig)
    mlp_last = mean["mlp"][last]
    peak = int(np.nanargmax(mlp_last))
    rows = [[str(layer)] + [_g(mean[k][last][layer]) for k in KINDS] for layer in range(L)]
    data = dict(n_facts=len(traces), scanned=len(pool), seed=seed, window=window, noise_scale=3.0,
                mlp_peak_layer_last_subject=peak, mean_effect=mean, chosen_layer=chosen_layer,
                p_clean=float(np.mean([t.p_clean for t in traces])),
                p_corrupted=float(np.mean([t.p_corrupted for t in traces])),
                facts=[dict(prompt=t.prompt, subject=t.subject, answer=t.answer, p_clean=t.p_clean,
                            p_corrupted=t.p_corrupted) for t in traces],
                plots=["trace_heatmap.png", "trace_last_subject.png"])
    return _write(out_dir, "trace", data, ["layer", "hidden", "MLP", "attention"], rows)


# ------------------------------------------------------------------ 7. collapse guard

def guard_analysis(calibration: list[dict], test: list[dict], out_dir: Path) -> dict:
    """Calibrate the guard on ``calibration`` records, report it on ``test`` records (disjoint cases)."""
    from ..editing.guard import DEFAULT_RULES
    from .calibrate import calibrate, precision_recall

    overlap = {r["case_id"] for r in calibration} & {r["case_id"] for r in test}
    if overlap and calibration[0].get("data") == test[0].get("data"):
        raise ValueError(f"calibration and test share {len(overlap)} cases")
    rule = calibrate(calibration)
    shipped = DEFAULT_RULES.get(rule.model)
    result = dict(rule=rule.to_dict(), rule_file="guard_rule.json",
                  default_rule=shipped.to_dict() if shipped else None,
                  calibration=dict(data=calibration[0].get("data"), **precision_recall(rule, calibration)),
                  test=dict(data=test[0].get("data"), **precision_recall(rule, test)),
                  default_rule_test=precision_recall(shipped, test) if shipped else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    rule.save(out_dir / "guard_rule.json")
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, recs, marker in (("calibration", calibration, "o"), ("test", test, "^")):
        judged = [r for r in recs if r.get("collapsed") is not None]
        for flag, colour in ((False, "tab:blue"), (True, "tab:red")):
            pts = [r for r in judged if bool(r["collapsed"]) is flag]
            ax.scatter([r[rule.feature] for r in pts], [r["ppl_ratio"] or 1e9 for r in pts], marker=marker, s=18,
                       c=colour, alpha=0.7, label=f"{name}, {'collapsed' if flag else 'normal'}")
    sign = ">" if rule.above else "<"
    ax.axvline(rule.threshold, color="k", ls="--", lw=1, label=f"rule: {rule.feature} {sign} {rule.threshold:.3g}")
    ax.set(xscale="log" if rule.feature != "cos_bare_mean" else "linear", yscale="log", xlabel=rule.feature,
           ylabel="perplexity ratio after the edit", title="Collapse guard")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "guard.png", dpi=110)
    plt.close(fig)
    result["plots"] = ["guard.png"]
    rows = [[name, str(result[key]["n"]), str(result[key]["collapsed"]), str(result[key]["predicted"]),
             _g(result[key]["precision"]), _g(result[key]["recall"])]
            for name, key in (("calibration", "calibration"), ("test (held out)", "test"))]
    return _write(out_dir, "guard", json_safe(result), ["cases", "n", "collapsed", "predicted collapse",
                                                           "precision", "recall"], rows)
