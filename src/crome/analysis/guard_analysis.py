"""``crome analyze guard``: the collapse guard calibrated on one set of records, reported on another."""

from __future__ import annotations

from pathlib import Path

from ..evaluation.results import json_safe
from .output import _g, _plt, _write


def guard_analysis(calibration: list[dict], test: list[dict], out_dir: Path) -> dict:
    """Calibrate the guard on ``calibration`` records, report it on ``test`` records (disjoint cases)."""
    from ..editing.rules import DEFAULT_RULES
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
