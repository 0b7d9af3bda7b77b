"""``crome eval``: edit, measure, restore, one case at a time; or edits that accumulate.

Each case gives one JSON line with every metric of ``metrics.py``, the edit's diagnostics,
the guard's decision, the perplexity check, and what reproduces it (seed, context templates,
hyper-parameters, test prefix, key statistics). ``run`` appends the lines to a results file
(``results.py``) and, for a sequential run, checkpoints every update (``sequential.py``), so a
killed run loses nothing finished and ``--resume`` continues it.
"""

from __future__ import annotations

import time
from contextlib import closing, nullcontext
from itertools import islice

from ..editing.context import RunContext
from ..models import LoadedModel
from .cases import evaluate_cases, prepare_together
from .datasets import Case
from .options import cases_per_chunk, check_options
from .results import ResultsFile, check_resumable, timing_path
from .sequential import SequentialRun


def _chunks(items, size: int):
    """(cases before it, chunk) of ``size`` consecutive items (the last may be shorter)."""
    items, start = iter(items), 0
    while chunk := list(islice(items, size)):
        yield start, chunk
        start += len(chunk)


def run(lm: LoadedModel, cases: list[Case], ctx: RunContext, out, resume: bool = False, progress=None,
        edits_per_pass: int = 1) -> list[dict]:
    """Evaluate ``cases`` into the results file ``out``; returns every record of the file (earlier ones included).

    ``progress(iterable, total, description)`` wraps the loop (a progress bar). ``edits_per_pass``
    K > 1 computes the keys and v* of K cases together and measures their K edited models in shared
    forward passes: the records are K = 1's, up to float summation order. MEMIT edits
    ``batch_size`` cases as one update. A sequential run checkpoints each update's factors and
    ``resume`` continues it from them, bit for bit (``SequentialRun``)."""
    s = ctx.settings
    check_options(s.method, guard=s.guard, batch_size=s.batch_size, edits_per_pass=edits_per_pass,
                  sequential=s.sequential)
    results, timing = ResultsFile(out), ResultsFile(timing_path(out))
    done = results.read()
    check_resumable(done, s, results.path, resume)
    ctx = ctx.with_monitor(lm)   # its baseline: the unedited model
    seq = SequentialRun(lm, ctx, results) if s.sequential else None
    per_chunk = cases_per_chunk(ctx.method, s.batch_size, edits_per_pass)
    records = []
    with closing(seq) if seq else nullcontext():   # a sequential run gives the original weights back
        done = seq.resume(done, cases) if seq else done
        ctx = seq.ctx if seq else ctx   # an AlphaEdit run's running key sum is the run's
        records += done
        finished = {r["case_id"] for r in done}
        todo = [c for c in cases if c.case_id not in finished]
        progress = progress or (lambda it, total, description: it)
        steps = progress(todo, len(todo), f"{s.method} on {len(todo)} cases")
        for before, chunk in _chunks(steps, per_chunk):
            start = time.perf_counter()
            n_done, last = len(done) + before + len(chunk), before + len(chunk) == len(todo)
            monitor_now = seq is None or seq.due(s.monitor_every, n_done, len(chunk), last)
            retain_now = seq.due(s.retained_every, n_done, len(chunk), last) if seq and s.retained_every \
                else monitor_now
            score_now = seq is None or seq.due(s.scores_every, n_done, len(chunk), last)
            evaluated = evaluate_cases(lm, chunk, ctx, measure_ppl=monitor_now, keep=seq is not None,
                                       prepared_by_id=prepare_together(lm, chunk, ctx), score=score_now)
            if seq:
                seq.record(evaluated, chunk, n_done, monitor_now, retain_now)
            seconds = (time.perf_counter() - start) / len(chunk)
            for (rec, _), case in zip(evaluated, chunk):
                line = rec.to_dict()
                results.append(line)
                timing.append(dict(case_id=case.case_id, seconds=seconds, edits_per_pass=edits_per_pass))
                records.append(line)
    return records
