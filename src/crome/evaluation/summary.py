"""Summaries of ``crome eval`` results: mean and 95% CI of every metric, the
collapse rate, the split by first-token vs other subjects, and runs side by side
(``crome summarize``) as a terminal table, Markdown or CSV."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from ..scoring.metrics import harmonic_mean, mean_ci
from .results import ResultsFile, timing_path

SPLITS = (("all", None), ("first-token subject", True), ("other subjects", False))
SCORES = [("ES", "es"), ("PS", "ps"), ("NS", "ns"), ("EM", "em"), ("PM", "pm"), ("NM", "nm"),
          ("rewrite acc", "rewrite_acc"), ("rephrase acc", "rephrase_acc"), ("locality", "locality"),
          ("gen EM", "gen_em"), ("gen EM paraphrase", "gen_em_paraphrase"),     # these four: --gen-em runs
          ("chat EM", "gen_em_chat"), ("chat EM paraphrase", "gen_em_chat_paraphrase")]
# the record groups a summary reports, and the tag of their rows (where the edit was read)
GROUPS = (("metrics", ""), ("metrics_natural", " (natural)"), ("metrics_prefixed", " (prefix)"))


def _cell(mean: float, half: float = math.nan, digits: int = 3) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    if half is None or math.isnan(half):
        return f"{mean:.{digits}g}" if abs(mean) >= 1000 else f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _get(rec: dict, group: str, key: str):
    block = rec.get(group)
    v = block.get(key) if isinstance(block, dict) else None
    return math.nan if v is None else v


def summarize(records: list[dict]) -> dict[str, dict[str, str]]:
    """{split: {row label: cell}} for one run."""
    out = {}
    for split, first in SPLITS:
        recs = [r for r in records if first is None or r.get("first_token_subject") is first]
        applied = [r for r in recs if r.get("applied")]
        rows: dict[str, str] = {"cases": str(len(recs)), "edits applied": str(len(applied))}
        judged = [r for r in applied if r.get("collapsed") is not None]
        if judged:
            m, h, _ = mean_ci([float(r["collapsed"]) for r in judged])
            rows["collapse rate"] = _cell(m, h)
        for group, tag in GROUPS:
            if not any(r.get(group) for r in applied):
                continue
            means = {}
            for label, key in SCORES:
                m, h, n = mean_ci([_get(r, group, key) for r in applied])
                means[key] = m
                if n:
                    rows[label + tag] = _cell(m, h)
            if not math.isnan(means["ns"]):
                rows["S" + tag] = _cell(harmonic_mean([means["es"], means["ps"], means["ns"]]))
        flu = [r["fluency"] for r in applied if r.get("fluency") is not None]
        if flu:
            rows["fluency"] = _cell(*mean_ci(flu)[:2])
        ppl = [r["ppl_after"] if r.get("ppl_after") is not None else math.inf for r in judged]
        if ppl:
            rows["perplexity after: mean"] = _cell(statistics.fmean(ppl))
            rows["perplexity after: median"] = _cell(statistics.median(ppl))
            rows["perplexity before"] = _cell(judged[0].get("ppl_before"))
        ratios = [r["ppl_ratio"] for r in judged if r.get("ppl_ratio") is not None]
        if ratios:
            rows["perplexity ratio: median"] = _cell(statistics.median(ratios))
            rows["perplexity ratio: max"] = _cell(max(ratios))
        guarded = [r for r in recs if r.get("guard", "off") != "off"]
        if guarded:
            stopped = sum(r.get("guard_action") in ("rolled back", "refused") for r in guarded)
            fallback = sum(str(r.get("guard_action", "")).startswith("fallback") for r in guarded)
            rows["guard: kept / fallback / stopped"] = f"{len(guarded) - stopped - fallback} / {fallback} / {stopped}"
            untaken = sum(r.get("guard_reason") == "did not take" for r in guarded)
            if untaken:
                rows["guard: stopped because the edit did not take"] = str(untaken)
            probe = [r["guard_ppl_ratio"] for r in applied if r.get("guard_ppl_ratio") is not None]
            if probe:
                rows["guard probe ratio of kept edits: max"] = _cell(max(probe))
        dens = [r["denominator"] for r in recs if r.get("denominator") is not None]
        if dens:
            rows["denominator: median"] = _cell(statistics.median(dens))
        seq = [r for r in recs if r.get("sequential")]
        if seq and first is None:
            rows.update(_sequential(seq))
        out[split] = rows
    return out


def _sequential(recs: list[dict]) -> dict[str, str]:
    first = next((r.get("step") for r in recs if r.get("collapsed")), None)
    last = [r for r in recs if r.get("ppl_after") is not None or r.get("collapsed")]
    rows = {"first collapsed at edit": str(first) if first else "none"}
    if last:
        rows["final perplexity"] = _cell(last[-1]["ppl_after"] if last[-1].get("ppl_after") is not None else math.inf)
    retained = (("retained_efficacy", "final retained ES"),
                ("retained_efficacy_prefixed", "final retained ES (prefix)"),
                ("retained_gen_em", "final retained gen EM"),
                ("retained_gen_em_prefixed", "final retained gen EM (prefix)"))
    for key, label in retained:
        vals = [r[key] for r in recs if r.get(key) is not None]
        if vals:
            rows[label] = _cell(vals[-1])
    return rows


def cases_per_minute(out: str | Path) -> float | None:
    times = [t["seconds"] for t in ResultsFile(timing_path(out)).read()]
    return 60 * len(times) / sum(times) if times else None


MANIFEST = "sweep.json"   # what crome sweep writes into its folder


def result_files(folder: str | Path) -> list[Path]:
    """The eval results files in a folder: a sweep's cells in spec order, else every ``*.jsonl``
    but the timing files."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.exists():
        names = [c["name"] for c in json.loads(manifest.read_text())["cells"]]
        return [folder / f"{n}.jsonl" for n in names if (folder / f"{n}.jsonl").exists()]
    return sorted(p for p in folder.glob("*.jsonl") if not p.name.endswith(".timing.jsonl"))


def label(records: list[dict], path: str | Path) -> str:
    if not records:
        return Path(path).stem
    r = records[0]
    return f"{r['method']} ({Path(path).stem})"


def side_by_side(runs: list[tuple[str, list[dict]]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one column per run, sections per split."""
    sums = [summarize(recs) for _, recs in runs]
    header = ["metric"] + [name for name, _ in runs]
    rows: list[list[str]] = []
    for split, _ in SPLITS:
        labels = list(dict.fromkeys(k for s in sums for k in s.get(split, {})))
        if split != "all":
            if all(s.get(split, {}).get("cases", "0") == "0" for s in sums):
                continue
            rows.append([f"**{split}**"] + [""] * len(runs))
        for lab in labels:
            rows.append([lab] + [s.get(split, {}).get(lab, "-") for s in sums])
    return header, rows


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([[c.replace("**", "") for c in r] for r in rows])
    return buf.getvalue()
