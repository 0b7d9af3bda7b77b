"""``crome eval --workers N``: the cases of one run on N Ray workers, one writer.

Each worker is a Ray actor that loads the model once. The first one prepares the run (layer, key
statistics, context templates: ``jobs.prepare``) and every worker gets that same ``RunContext``, so a
case's record does not depend on which worker ran it. The driver holds the queue: it hands each
idle worker the next case, writes each record as it arrives (the only writer: one fsync'd line
per case, as ``evaluate.run`` does), and when a worker dies mid-case (killed, out of memory)
puts that case back at the head of the queue for the next free worker and starts a replacement.
A case that takes down ``MAX_ATTEMPTS`` workers stops the run; what finished is kept for
``--resume``.

Records are written in the order cases finish; ``summarize`` and ``--resume`` key them by case id.
With ``--edits-per-pass K`` a worker is handed K cases at a time (their v* optimised together),
and a dead worker's K cases all go back to the queue.
"""

from __future__ import annotations

import os
import re
from collections import deque

from ..errors import CromeError
from ..evaluation.jobs import CaseRunner, EvalJob, cases_of, load, prepare
from ..evaluation.results import ResultsFile, check_resumable, timing_path
from .cluster import connect, placement

MAX_ATTEMPTS = 3


class Worker:
    """One model in one process (a Ray actor; plain class so it can be tested without Ray)."""

    def __init__(self, job: EvalJob, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.job = job
        self.lm = load(job, progress=False)
        self.runner = None

    def pid(self) -> int:
        return os.getpid()

    def prepare(self):
        return prepare(self.lm, self.job)

    def use(self, ctx) -> int:
        self.runner = CaseRunner(self.lm, self.job, ctx)
        return os.getpid()

    def run(self, cases) -> list[tuple[dict, float]]:
        return self.runner(cases)


class _Pool:
    """The driver's handles on the Ray actors: starting them, replacing a dead one, their pids."""

    def __init__(self, ray, job: EvalJob, workers: int, place):
        self.ray, self.job, self.place = ray, job, place
        self.actor = ray.remote(Worker).options(**place.options())
        self.workers = [self.spawn() for _ in range(workers)]
        self.pids: dict = {}
        self.ctx_ref = None

    def spawn(self):
        return self.actor.remote(self.job, self.place.threads)

    def use(self, ctx) -> None:
        """Hand every worker the prepared run."""
        self.ctx_ref = self.ray.put(ctx)
        self.pids = dict(zip(self.workers, self.ray.get([w.use.remote(self.ctx_ref) for w in self.workers])))

    def replace(self, dead):
        """Kill ``dead`` and start a replacement that holds the same prepared run."""
        self.ray.kill(dead, no_restart=True)
        worker = self.spawn()
        worker.use.remote(self.ctx_ref)   # runs before its first case: actor calls keep their order
        self.pids[worker] = None
        self.workers.append(worker)
        return worker

    def pid(self, worker) -> int:
        if self.pids.get(worker) is None:
            self.pids[worker] = self.ray.get(worker.pid.remote())
        return self.pids[worker]

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w, no_restart=True)


def run_workers(job: EvalJob, workers: int, address: str | None = None, threads: int | None = None,
                progress=None, say=None, on_dispatch=None, cases=None):
    """Run ``job`` on ``workers`` Ray actors; returns (every record of the results file, its context).
    ``cases``: the job's cases when the caller has loaded them already (``cases_of``).

    ``progress(iterable, total, description)`` wraps the finished cases (a bar with ETA);
    ``on_dispatch(case, pid)`` is called each time a case is handed to a worker (tests use it)."""
    if job.sequential:
        raise CromeError("a sequential run is one model and cannot be split over workers: drop --workers, "
                         "or run several side by side with crome sweep")
    if cases is None:
        cases, _, _ = cases_of(job)
    results, timing = ResultsFile(job.out), ResultsFile(timing_path(job.out))
    done = results.read()
    check_resumable(done, None, results.path, job.resume)   # the --resume flag, before any worker starts
    ray = connect(address)
    place = placement(ray, workers, threads, job.device_map)
    pool = _Pool(ray, job, workers, place)
    say = say or (lambda message: None)
    say(f"{workers} Ray worker(s), {place.num_gpus or place.num_cpus} {'GPU' if place.num_gpus else 'CPU'}(s) "
        f"and {place.threads} thread(s) each; the first prepares the run (layer, key statistics: computed once, "
        f"then cached; context templates)")
    try:
        try:
            ctx = ray.get(pool.workers[0].prepare.remote())
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
            raise _cause(exc) from None
        check_resumable(done, ctx.settings, results.path, job.resume)
        pool.use(ctx)
        finished = {r["case_id"] for r in done}
        queue = deque(c for c in cases if c.case_id not in finished)
        per_chunk = job.cases_per_chunk("cuda" if place.num_gpus else "cpu")
        records = list(done)
        for case, record, seconds, worker, attempt in (progress or (lambda it, total, description: it))(
                _finish(pool, queue, per_chunk, say, on_dispatch), len(queue),
                f"{job.method} on {len(queue)} cases, {workers} workers"):
            results.append(record)
            timing.append(dict(case_id=case.case_id, seconds=seconds, worker=pool.pid(worker), attempt=attempt,
                               edits_per_pass=per_chunk))
            records.append(record)
    finally:
        pool.close()
    return records, ctx


def _finish(pool: _Pool, queue: deque, per_chunk: int, say, on_dispatch):
    """Hand the queue's cases to idle workers ``per_chunk`` at a time; yield (case, record, seconds,
    worker, attempt) as they finish. A dead worker's cases go back to the head of the queue for a
    replacement; a case that took down ``MAX_ATTEMPTS`` workers stops the run."""
    ray = pool.ray
    attempts: dict[str, int] = {}
    idle, running = list(pool.workers), {}
    while queue or running:
        while idle and queue:
            worker = idle.pop(0)
            chunk = [queue.popleft() for _ in range(min(per_chunk, len(queue)))]
            for case in chunk:
                attempts[case.case_id] = attempts.get(case.case_id, 0) + 1
            running[worker.run.remote(chunk)] = (worker, chunk)
            for case in chunk:
                if on_dispatch:
                    on_dispatch(case, pool.pids.get(worker))
        [ref], _ = ray.wait(list(running), num_returns=1)
        worker, chunk = running.pop(ref)
        try:
            finished = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            worst = max(chunk, key=lambda c: attempts[c.case_id])
            if attempts[worst.case_id] >= MAX_ATTEMPTS:
                raise CromeError(f"case {worst.case_id} took down {MAX_ATTEMPTS} workers; the run stops "
                                 f"(finished cases are kept: --resume)") from None
            say(f"worker {pool.pids.get(worker)} died on case {', '.join(c.case_id for c in chunk)} "
                f"({type(exc).__name__}); retrying on another worker")
            queue.extendleft(reversed(chunk))
            idle.append(pool.replace(worker))
            continue
        except ray.exceptions.RayTaskError as exc:
            raise _cause(exc) from None
        for case, (record, seconds) in zip(chunk, finished):
            yield case, record, seconds, worker, attempts[case.case_id]
        idle.append(worker)


def _cause(exc) -> Exception:
    """The exception a worker raised, as one line: a task's own exception, or the CromeError that
    stopped a worker from starting (a model that does not load)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, Exception):
        return cause
    text = str(exc)
    found = re.findall(r"CromeError: (.+)", text)
    if found:
        return CromeError(found[-1].strip())
    return CromeError(f"a Ray worker failed: {text.strip().splitlines()[0]}")
