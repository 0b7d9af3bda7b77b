"""``crome sweep SPEC.toml``: a grid of eval runs, one Ray task per cell, one results file each.

A spec has eval options shared by every cell (``[defaults]``) and lists to cross (``[grid]``)::

    [defaults]
    data = "counterfact/counterfact-val.json"   # as --data: a path, or a name under $CROME_DATA
    n_cases = 20
    gen_tokens = 0

    [grid]
    method = ["rome", "crome"]
    layer = [5, 6]
    mom2 = [false, true]    # false: C = I; true: sampled text; a string: a corpus file
    seed = [0]

Keys are ``EvalJob``'s fields (``n`` is ``n_cases``; ``-`` may stand for ``_``); ``hparams`` is a
table of hyper-parameter overrides. Each cell writes ``OUT/<name>.jsonl`` (its name spells its grid
values) with ``--resume`` semantics, and ``OUT/sweep.json`` records the spec and the cells. A rerun
skips finished cells and finishes partial ones; a partial sequential cell is moved aside to
``<name>.jsonl.partial`` and run anew, since its edits lived in a model that is gone.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CromeError
from ..evaluation.datasets import load_cases
from ..evaluation.jobs import EvalJob, cases_of
from ..evaluation.results import ResultsFile, timing_path
from ..evaluation.summary import MANIFEST
from .cluster import connect, placement

ALIASES = {"n": "n_cases", "cases": "case_ids"}


def _toml(path: str | Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise CromeError(f"cannot read sweep spec {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CromeError(f"{path}: not valid TOML ({exc})") from None


def _options(table: dict, where: str) -> dict:
    """Spec keys as EvalJob fields: aliases, '-' for '_', and mom2 = false|true|"corpus"."""
    out = {}
    for key, value in table.items():
        key = key.replace("-", "_")
        if key == "no_mom2":
            raise CromeError(f"{where}: write mom2 = false, not no_mom2")
        key = ALIASES.get(key, key)
        if key == "model" and value == "default":
            value = None
        if key == "mom2" and isinstance(value, str):
            out["mom2"], out["mom2_corpus"] = True, value
            continue
        out[key] = value
    return out


@dataclass(frozen=True)
class Cell:
    name: str
    values: dict        # the grid's values for this cell
    job: EvalJob


def _slug(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "default"
    text = Path(str(value)).stem if "/" in str(value) or str(value).endswith((".json", ".gguf")) else str(value)
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


def cells(spec: dict, out_dir: str | Path) -> list[Cell]:
    """Every combination of the grid's lists, as jobs writing under ``out_dir``."""
    unknown = set(spec) - {"defaults", "grid", "out"}
    if unknown:
        raise CromeError(f"sweep spec: unknown section {sorted(unknown)[0]!r} (use [defaults] and [grid])")
    defaults = _options(spec.get("defaults", {}), "[defaults]")
    grid = spec.get("grid", {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise CromeError(f"sweep spec: [grid] {key} must be a non-empty list")
    keys = list(grid)
    out, seen = [], {}
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        name = "_".join(f"{k.replace('_', '-')}-{_slug(v)}" for k, v in values.items()) or "run"
        if name in seen:
            raise CromeError(f"sweep spec: cells {seen[name]} and {values} have the same file name {name}")
        seen[name] = values
        options = {**defaults, **_options(values, "[grid]")}
        if "data" not in options:
            raise CromeError("sweep spec: no data (set it in [defaults] or [grid])")
        options.update(out=str(Path(out_dir) / f"{name}.jsonl"), resume=not options.get("sequential", False))
        out.append(Cell(name, values, EvalJob.from_dict(options).absolute()))
    return out


@dataclass(frozen=True)
class Outcome:
    """What became of a cell: finished before this run, ran now (its file's totals), or failed."""

    state: str                 # "finished before", "ran", "failed"
    records: int = 0
    errors: int = 0
    message: str = ""

    def __str__(self) -> str:
        if self.state == "ran":
            return f"{self.records} records, {self.errors} with errors"
        return f"error: {self.message}" if self.state == "failed" else self.state


def status(cell: Cell, load_dataset=load_cases) -> tuple[int, int]:
    """(finished cases, cases) of a cell's results file."""
    cases, _, _ = cases_of(cell.job, load_dataset)
    done = {r["case_id"] for r in ResultsFile(cell.job.out).read()}
    return sum(c.case_id in done for c in cases), len(cases)


def _run_cell(job: EvalJob, threads: int) -> Outcome:
    """One cell, in a Ray task: the in-process eval run, resumed from its file."""
    import torch

    from ..evaluation.jobs import run_job

    torch.set_num_threads(threads)
    records, _, _ = run_job(job)
    return Outcome("ran", records=len(records), errors=sum(r.get("error") is not None for r in records))


def run_sweep(spec_path: str | Path, out_dir: str | Path, workers: int | None = None, address: str | None = None,
              threads: int | None = None, say=None, progress=None) -> dict[str, Outcome]:
    """Run every unfinished cell of the spec; returns {cell name: outcome}. A failed cell does not
    stop the others, and the next rerun retries it."""
    say = say or (lambda message: None)
    spec = _toml(spec_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = cells(spec, out_dir)
    manifest = dict(spec=spec, cells=[dict(name=c.name, values=c.values, job=c.job.to_dict()) for c in todo])
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    outcomes, pending = {}, []
    load_dataset = functools.lru_cache(maxsize=None)(load_cases)   # cells share their data files
    for cell in todo:
        finished, total = status(cell, load_dataset)
        if finished == total:
            outcomes[cell.name] = Outcome("finished before")
            continue
        if cell.job.sequential and finished:
            partial = Path(cell.job.out + ".partial")
            Path(cell.job.out).replace(partial)
            timing_path(cell.job.out).unlink(missing_ok=True)
            say(f"{cell.name}: a sequential run can't resume; its {finished} records moved to {partial.name}")
        pending.append(cell)
    say(f"{len(todo)} cells: {len(todo) - len(pending)} finished before, {len(pending)} to run")
    if not pending:
        return outcomes
    ray = connect(address)
    workers = workers or int(ray.cluster_resources().get("GPU", 0)) or int(ray.cluster_resources().get("CPU", 1))
    place = placement(ray, min(workers, len(pending)), threads, pending[0].job.device_map)
    task = ray.remote(_run_cell).options(**place.options())
    running = {task.remote(c.job, place.threads): c for c in pending}

    def finish():
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            cell = running.pop(ref)
            try:
                outcomes[cell.name] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                outcomes[cell.name] = Outcome("failed", message=str(cause or exc).strip().splitlines()[0])
            except ray.exceptions.RayError as exc:
                outcomes[cell.name] = Outcome("failed", message=f"{type(exc).__name__}: "
                                                                f"{str(exc).strip().splitlines()[0]}")
            yield cell

    wrap = progress or (lambda it, total, description: it)
    for _ in wrap(finish(), len(running), f"{len(running)} cells"):
        pass
    return outcomes
