"""``crome report``: one self-contained HTML page from an analysis folder or a sweep folder.

Every section of ``SECTIONS`` whose ``<name>.json`` is in the folder is shown with its
table (``<name>.md``), its plots (embedded as base64 PNG, so the file opens offline)
and its settings (every scalar and short list of the JSON: seeds, layer, templates).
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

SECTIONS = [
    ("update_anatomy", "1. Update anatomy",
     "Numerator against denominator of every edit: collapse comes from a near-zero denominator."),
    ("key_geometry", "2. Key geometry", "k^u, k̄, C⁻¹k̄ and prefixed keys: do first-token bare keys sit apart?"),
    ("first_token", "3. First-token experiment", "ROME edits again with random text before the subject."),
    ("prefix_effect", "4. Test-time prefix", "Efficacy with and without a test-time prefix, by subject position."),
    ("trace", "5. Causal tracing", "Indirect effect of restoring hidden states, MLP and attention outputs."),
    ("guard", "6. Collapse guard", "Predicting collapse from pre-application diagnostics."),
]
EXTRA_TABLES = ("reference-table.md", "sequential-table.md")


def _table(md: str) -> str:
    lines = [line.strip() for line in md.strip().splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return ""
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.replace('**', ''))}</td>" for c in row) + "</tr>"
                   for row in cells[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _settings(data: dict) -> str:
    keep = {k: v for k, v in data.items()
            if isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and k == "context_templates")}
    if not keep:
        return ""
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v, ensure_ascii=False))}</td></tr>"
                   for k, v in keep.items())
    return f"<details><summary>settings</summary><table class='kv'>{rows}</table></details>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    name = html.escape(path.name)
    return f"<figure><img alt='{name}' src='data:image/png;base64,{data}'><figcaption>{name}</figcaption></figure>"


def _shown(run_dir: Path) -> str:
    """The folder as a shared page should name it: relative to where the report was made."""
    try:
        return os.path.relpath(run_dir.resolve(), Path.cwd())
    except ValueError:  # another drive (Windows)
        return run_dir.name


def _eval_runs(run_dir: Path) -> str:
    """The folder's eval results (a sweep's cells) side by side, with the sweep's spec."""
    from ..evaluation.results import ResultsFile
    from ..evaluation.summary import MANIFEST, label, result_files, side_by_side, to_markdown

    runs = [(label(recs, p), recs) for p in result_files(run_dir) if (recs := ResultsFile(p).read())]
    if not runs:
        return ""
    spec = run_dir / MANIFEST
    settings = _settings({"spec": json.dumps(json.loads(spec.read_text())["spec"])}) if spec.exists() else ""
    return (f"<section id='runs'><h2>Eval runs</h2><p>{len(runs)} results files of this folder.</p>"
            + _table(to_markdown(*side_by_side(runs))) + settings + "</section>")


def build_report(run_dir: str | Path, out: str | Path) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    parts, missing = [], []
    runs = _eval_runs(run_dir)
    if runs:
        parts.append(runs)
    for name, title, blurb in SECTIONS:
        path = run_dir / f"{name}.json"
        if not path.exists():
            missing.append(title)
            continue
        data = json.loads(path.read_text())
        md = run_dir / f"{name}.md"
        images = [run_dir / p for p in data.get("plots", [])]
        absent = [p.name for p in images if not p.exists()]
        if absent:
            raise FileNotFoundError(f"{run_dir}: {name}.json names plots that are missing: {', '.join(absent)}")
        parts.append(f"<section id='{name}'><h2>{html.escape(title)}</h2><p>{html.escape(blurb)}</p>"
                     + (_table(md.read_text()) if md.exists() else "")
                     + "".join(_image(p) for p in images) + _settings(data) + "</section>")
    for extra in EXTRA_TABLES:
        if (run_dir / extra).exists():
            parts.append(f"<section id='{extra.split('.')[0]}'><h2>{html.escape(extra)}</h2>"
                         + _table((run_dir / extra).read_text()) + "</section>")
    if not parts:
        raise FileNotFoundError(f"{run_dir}: no analysis or eval results (run crome analyze ... --out-dir {run_dir}, "
                                f"or crome sweep)")
    note = f"<p class='missing'>Not in this folder: {html.escape(', '.join(missing))}.</p>" if missing else ""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px}"
             "td{text-align:right}td:first-child{text-align:left}img{max-width:100%}figure{margin:1em 0}"
             ".missing{color:#888}.kv td{text-align:left}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>crome report: {html.escape(run_dir.name)}</title>"
            f"<style>{style}</style></head><body><h1>crome report</h1><p>{html.escape(_shown(run_dir))}</p>{note}"
            + "".join(parts) + "</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
