"""``crome eval``'s one choice: the run in this process, or its cases on Ray workers (``workers``)."""

from __future__ import annotations

from ..errors import CromeError
from ..evaluation.jobs import EvalJob, Status, quiet, run_job


def run_eval(job: EvalJob, workers: int | None = None, address: str | None = None, threads: int | None = None,
             progress=None, status: Status = quiet, say=None, cases=None):
    """Run ``job``: in this process (``workers`` None) or on ``workers`` Ray workers, which ``address``
    (a Ray cluster to join) and ``threads`` (torch threads per worker) go with. Returns (every record
    of its results file, its ``RunContext``). ``cases``: the job's cases when the caller has loaded them
    already (``cases_of``); ``progress``, ``status`` and ``say``: as ``run_job`` takes them."""
    if workers is None and (address or threads):
        raise CromeError("--ray-address and --threads go with --workers N")
    if workers is None:
        records, ctx, _ = run_job(job, progress=progress, status=status, say=say, cases=cases)
        return records, ctx
    from .workers import run_workers

    return run_workers(job.absolute(), workers, address=address, threads=threads, progress=progress, say=say,
                       cases=cases)
