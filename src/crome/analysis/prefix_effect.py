"""``crome analyze prefix``: efficacy with and without the test-time prefix, by subject position."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from .output import _g, _number, _plt, _write

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
