"""``crome analyze update``: the numerator ‖v* − v_cur‖·‖u‖ against the denominator k_cur·u, per
case of eval runs; a histogram of denominators per method; medians for collapse vs normal."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from ..evaluation.results import json_safe
from .output import _g, _plt, _write

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
