"""What the benchmark scripts share: printing a result and writing it where --out says."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

DATA = Path(os.environ.get("CROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CROME = str(Path(sys.executable).with_name("crome"))     # the CLI of this interpreter's environment


def emit(result: dict, out: str | None, indent: int = 1) -> None:
    """Print ``result`` as JSON and, with ``out``, write it there (its folder created)."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def run_spec(name: str) -> tuple[str, dict, int | None]:
    """(method, hyper-parameter overrides, layer) of a run named like ``memory+mpes+t6+L18``: a method
    (crome, memit, cmemit, alphaedit, calphaedit, memory) and options joined by "+": ``mpes`` (MPES
    early stopping), ``nas`` (NAS norm anchoring), ``t<n>`` (n context templates: the bare prompt and
    n - 1 sampled ones of 5 tokens, instead of 21), ``norm<mu>`` (ENCORE's norm bound), ``tau<x>`` (the
    memory's gate threshold), ``e<share>`` (AlphaEdit's null-space energy share), ``lr<x>`` (v*'s
    Adam step size), ``L<n>`` (edit layer n instead of the model's default)."""
    from crome.editing.hparams import few_templates

    method, *flags = name.split("+")
    hparams, layer = {}, None
    for flag in flags:
        if flag in ("mpes", "nas"):
            hparams[flag] = True
        elif re.fullmatch(r"t\d+", flag):
            hparams["template_lengths"] = [list(x) for x in few_templates(int(flag[1:]))]
        elif re.fullmatch(r"lr[\d.]+", flag):
            hparams["v_lr"] = float(flag[2:])
        elif re.fullmatch(r"L\d+", flag):
            layer = int(flag[1:])
        elif flag.startswith("norm"):
            hparams["norm_weight"] = float(flag[4:])
        elif flag.startswith("tau"):
            hparams["memory_threshold"] = float(flag[3:])
        elif flag.startswith("e"):
            hparams["null_space_energy"] = float(flag[1:])
        else:
            raise SystemExit(f"unknown run option {flag!r} in {name!r}")
    return method, hparams, layer


def add_run_options(ap, data: str, ppl_data: str, out_dir: str, docs: str) -> None:
    """The options of a resumable long-run benchmark (mass_editing.py, lifelong.py): seed, a time
    budget, data, where the runs go, and ``--report`` with where its table and plot go."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hours", type=float, default=None, help="Stop after this long (rerun to continue).")
    ap.add_argument("--data", default=data)
    ap.add_argument("--ppl-data", default=ppl_data)
    ap.add_argument("--out-dir", default=out_dir)
    ap.add_argument("--report", action="store_true", help="Write the table and plot from the runs so far.")
    ap.add_argument("--docs", default=docs)


def prepared_runs(jobs: dict, n: int):
    """(model, the first ``n`` cases, a ``RunContext`` per run name) for runs that share a model and
    cases: every context, with its perplexity baseline, is built on the unedited model."""
    import transformers

    from crome.evaluation.jobs import cases_of, load, prepare, with_checks

    transformers.utils.logging.set_verbosity_error()
    first = next(iter(jobs.values()))
    cases, _, _ = cases_of(first)
    lm = load(first, progress=False)
    return lm, cases[:n], {name: with_checks(lm, prepare(lm, job), job) for name, job in jobs.items()}


def add_fault_run_options(ap, out_dir: str) -> None:
    """The options of the fault runs (chaos.py, soak.py): seed, data, where the run and its summary go."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-train.json"))
    ap.add_argument("--ppl-data", default=str(DATA / "me-ppl" / "ME-PPL_50.json"))
    ap.add_argument("--out-dir", default=out_dir)
    ap.add_argument("--docs", default=None, help="Also write the summary into this folder.")
    ap.add_argument("--table", metavar="DIR", help="Print the Markdown table of the summaries in DIR and stop.")


def newlines(path: Path) -> int:
    """Whole lines (records) in ``path`` so far; a line a live run is still writing is not counted."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def portable(text: str) -> str:
    """``text`` with this machine's data folder written as ``$CROME_DATA`` (for summaries in docs)."""
    return text.replace(str(DATA), "$CROME_DATA")


def write_summary(result: dict, folder: Path, docs: str | None) -> None:
    """A fault run's summary: ``<folder>/summary.json`` and, with ``docs``, ``<docs>/<name>.json``."""
    emit(result, str(folder / "summary.json"))
    if docs:
        emit(result, str(Path(docs) / f"{result['name']}.json"))
