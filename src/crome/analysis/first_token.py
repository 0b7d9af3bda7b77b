"""``crome analyze first-token``: collapse cases edited again with random text before the subject."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from ..editing.context import RunContext
from .output import _g, _plt, _write


def first_token_experiment(lm, records: list[dict], cases_by_id: dict, ctx: RunContext, out_dir: Path,
                           k: int = 5) -> dict:
    """Collapsed ROME cases (or, if fewer than ``k``, the smallest denominators among first-token
    subjects) edited again with random text prepended so the subject is no longer first, with the
    context's hyper-parameters, templates, key statistics and perplexity monitor."""
    from ..editing.api import compute_edit
    from ..editing.edit import apply_edit
    from ..editing.methods import REFERENCE_METHOD
    from ..request import EditRequest
    from ..scoring.measure import collapsed, template_prefix

    hp, templates, monitor, seed, stats = ctx.hparams, ctx.templates, ctx.monitor, ctx.settings.seed, ctx.stats
    rome = [r for r in records if r["method"] == REFERENCE_METHOD and r.get("denominator") is not None]
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
            edit = compute_edit(lm, req, REFERENCE_METHOD, hparams=hp, templates=templates, seed=seed, mom2=stats)
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
    _plot(results, out_dir / "first_token.png")
    rows = [[r["case_id"], r["prompt"], "yes" if r["was_collapsed"] else "no",
             _g(r["bare prompt"]["denominator"]), _g(r["bare prompt"]["ppl_ratio"]),
             _g(r["random text first"]["denominator"]), _g(r["random text first"]["ppl_ratio"]),
             "yes" if r["random text first"]["collapsed"] else "no"] for r in results]
    data = dict(seed=seed, layer=hp.layer, ppl_before=monitor.baseline, cases=results, plots=["first_token.png"],
                key_stats=stats.record() if stats is not None else None)
    return _write(out_dir, "first_token", data, ["case", "prompt", "collapsed in eval", "denominator (bare)",
                                                 "ppl ratio (bare)", "denominator (text first)",
                                                 "ppl ratio (text first)", "collapsed (text first)"], rows)


def _plot(results: list[dict], path: Path) -> None:
    """The perplexity ratio after each ROME edit, with the subject first and not first."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
