"""Chaos test of resumable runs (issue 25, part 3): kill -9 at random moments, resume, compare.

For one run: an uninterrupted reference run, then the same ``crome eval`` command killed with SIGKILL
at random moments (at least ``--kills`` times) and restarted with ``--resume`` after each kill, until
it finishes. After every kill the results file must hold whole records only. At the end the
results must be byte-identical to the reference's, and the final weights bit-identical.

Sequential runs (``--method crome`` or ``cmemit``): the whole process group is killed, and the
final weights are replayed from both runs' checkpoints.
Ray runs (``--workers 2``): a kill hits either one worker (the driver must hand its cases to a new
one) or the driver with its local Ray. The results are compared case by case, since workers finish
in any order, and an edit is not kept, so there are no weights to compare.

A quarter of the kill moments fall in the start-up (30-100% of the reference's start-up time: loading
the model, preparing the run), the rest at a uniform point of an edit after the next one or two
records. So kills land in loading, in the value optimisation, in the monitor's perplexity and now
and then in a write, and each restart gets a record or two further. A kill is reported as in the
start-up when that start had written no record yet.

    OMP_NUM_THREADS=1 python benchmarks/chaos.py --method crome --n 60 --kills 20
    OMP_NUM_THREADS=1 python benchmarks/chaos.py --method cmemit --n 60 --kills 20
    python benchmarks/chaos.py --method crome --workers 2 --n 60 --kills 20

Each run writes ``<out-dir>/<name>/summary.json``; ``--docs`` also copies it there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchlib import CROME, add_fault_run_options, newlines, portable, write_summary

from crome.editing.methods import DEFAULT_METHOD, METHODS


def command(args, out: Path, resume: bool) -> list[str]:
    """The ``crome eval`` command line of the run (the reference's and the chaos run's)."""
    cmd = [CROME, "eval", "--data", args.data, "--method", args.method, "--n", str(args.n), "--out", str(out),
           "--gen-tokens", "0", "--seed", str(args.seed), "--ppl-data", args.ppl_data, "--test-prefix", "fixed"]
    if args.workers:
        cmd += ["--workers", str(args.workers), "--threads", "1"]
    else:
        cmd += ["--sequential", "--monitor-every", str(args.monitor_every)]
    return cmd + (["--resume"] if resume else [])


def records(out: Path) -> list[str]:
    """The results file's lines; a line without its newline (a torn write) is an error."""
    if not out.exists():
        return []
    text = out.read_text()
    if text and not text.endswith("\n"):
        raise SystemExit(f"FAIL: {out} ends in a partial line: {text[-80:]!r}")
    lines = text.splitlines()
    for line in lines:
        json.loads(line)     # every line a whole record
    return lines


def ray_workers() -> list[int]:
    """The pids of the Ray workers on this machine (``ray::Worker`` processes: one local Ray at a time)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith("ray::") and "Worker" in cmdline:
            pids.append(int(proc.name))
    return pids


def stop_ray() -> None:
    """What a killed driver's local Ray leaves behind is stopped before the next start."""
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)


def kill_group(p: subprocess.Popen, ray: bool) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()
    if ray:
        stop_ray()


def clear(folder: Path, prefix: str) -> None:
    """Remove what an earlier, unfinished attempt left: ``<prefix>*`` files and folders."""
    for stale in folder.glob(prefix + "*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def warm_up(args, folder: Path, env: dict) -> None:
    """One case first, so that the model conversion and the cached key statistics, templates and
    layer choice are not in the reference's start-up time."""
    clear(folder, "warm-up")
    one_case = argparse.Namespace(**{**vars(args), "n": 1, "workers": 0})
    cmd = command(one_case, folder / "warm-up.jsonl", resume=False)
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)


def reference(args, folder: Path, env: dict) -> dict:
    """The uninterrupted run, and its start-up and per-edit times (from its first and last record)."""
    out, done = folder / "reference.jsonl", folder / "reference.done.json"
    if done.exists():
        return json.loads(done.read_text())
    clear(folder, "reference")
    warm_up(args, folder, env)
    if args.workers:
        stop_ray()
    start, first = time.time(), None
    with open(folder / "reference.log", "w") as log:
        p = subprocess.Popen(command(args, out, resume=False), stdout=log, stderr=log, env=env)
        while p.poll() is None:
            time.sleep(0.5)
            if first is None and out.exists() and out.stat().st_size:
                first = time.time() - start
    if p.returncode:
        raise SystemExit(f"the reference run failed (exit {p.returncode}): see {folder / 'reference.log'}")
    total = time.time() - start
    timing = dict(startup_s=first, total_s=total, per_edit_s=(total - first) / max(1, args.n - 1))
    done.write_text(json.dumps(timing))
    return timing


class Moments:
    """Random moments to kill at: a quarter in the run's start-up (loading the model, preparing), the
    rest at a random point of an edit, after the next one or two records (none or one on Ray's two
    workers), so each restart gets a little further, and 20 kills fit in one run."""

    def __init__(self, rng: random.Random, timing: dict, ahead: tuple[int, int]):
        self.rng, self.startup, self.gap, self.ahead = rng, timing["startup_s"], timing["per_edit_s"], ahead

    def wait(self, p: subprocess.Popen, out: Path, began: float) -> bool:
        """Wait for the next moment; False when the run ended first."""
        if self.rng.random() < 0.25:
            at = began + self.rng.uniform(0.3, 1.0) * self.startup
        else:
            target = newlines(out) + self.rng.randint(*self.ahead)
            seen, when = newlines(out), None
            while p.poll() is None and seen < target:
                time.sleep(0.05)
                now = newlines(out)
                if now > seen:      # the gap between two records seen here, not the start-up before
                    self.gap = time.time() - when if when else self.gap
                    seen, when = now, time.time()
            at = time.time() + self.rng.uniform(0, self.gap)
        while p.poll() is None and time.time() < at:
            time.sleep(0.05)
        return p.poll() is None


def chaos(args, folder: Path, env: dict, timing: dict) -> dict:
    """Kill the run at random moments until ``args.kills`` kills, then let it finish."""
    out = folder / "chaos.jsonl"
    clear(folder, "chaos")
    rng = random.Random(args.seed)
    moments = Moments(rng, timing, ahead=(0, 1) if args.workers else (1, 2))   # two workers write twice as fast
    kills, starts, gave_up, start = [], 0, 0, time.time()
    log = open(folder / "chaos.log", "w")
    while True:
        starts += 1
        if args.workers:
            stop_ray()
        p = subprocess.Popen(command(args, out, resume=out.exists()), stdout=log, stderr=log, env=env,
                             start_new_session=True)
        began, at_start = time.time(), newlines(out)
        while p.poll() is None and len(kills) < args.kills:
            if not moments.wait(p, out, began):
                break
            phase = "start-up" if newlines(out) == at_start else "edit"    # no record yet from this start
            workers = ray_workers() if args.workers else []
            what = "worker" if workers and rng.random() < 0.5 else "driver"
            before = newlines(out)
            if what == "worker":
                os.kill(rng.choice(workers), signal.SIGKILL)
            else:
                kill_group(p, ray=bool(args.workers))
            kills.append(dict(what=what, phase=phase, after_s=round(time.time() - began, 2), records=before))
            print(f"kill {len(kills):3d}: {what} in {phase} at {kills[-1]['after_s']:6.1f} s, {before} records",
                  flush=True)
            if what == "driver":
                break
            began = time.time()
        if p.poll() is None:
            p.wait()
        if p.returncode == 0 and (len(kills) >= args.kills or len(records(out)) >= args.n):
            break
        records(out)     # whole records after every kill
        if p.returncode == 2 and args.workers:    # a case whose workers were killed 3 times: the run stops, keeps
            gave_up += 1                           # what finished and says --resume (workers.MAX_ATTEMPTS)
        elif p.returncode not in (0, -signal.SIGKILL):
            raise SystemExit(f"FAIL: a restart exited {p.returncode}: see {folder / 'chaos.log'}")
    log.close()
    return dict(kills=kills, starts=starts, stopped_after_three_attempts=gave_up, seconds=round(time.time() - start, 1))


def final_weights(args, out: Path) -> dict:
    """The weights of every edited layer after the run's last update, replayed from its checkpoint."""
    import torch

    from crome.evaluation.checkpoint import FactorStore, replay
    from crome.evaluation.jobs import EvalJob, load

    lm = load(EvalJob(data=args.data, out=str(out)), progress=False)
    store = FactorStore(out)
    saved = [store.read(n) for n in store.updates()]
    replay(lm, saved)
    layers = sorted({int(x) for s in saved for x in s["layers"]})
    return {x: lm.mlp_out(x).weight.detach().to(torch.float32).clone() for x in layers}


def compare(args, folder: Path) -> dict:
    ref, got = records(folder / "reference.jsonl"), records(folder / "chaos.jsonl")
    result = dict(records=len(got), reference_records=len(ref))
    if args.workers:      # finished in any order: every case once, each record equal to the reference's
        def by_case(lines):
            return sorted(lines, key=lambda line: int(json.loads(line)["case_id"]))
        result["identical_records"] = by_case(got) == by_case(ref)
        result["each_case_once"] = len({json.loads(r)["case_id"] for r in got}) == len(got)
        return result
    import torch

    result["identical_bytes"] = (folder / "chaos.jsonl").read_bytes() == (folder / "reference.jsonl").read_bytes()
    a, b = final_weights(args, folder / "reference.jsonl"), final_weights(args, folder / "chaos.jsonl")
    result["layers"] = sorted(a)
    result["identical_weights"] = a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
    return result


def table(folder: str) -> str:
    """The Markdown table of the summaries in ``folder`` (RELIABILITY.md's)."""
    rows = ["| run | kills (driver / worker; in start-up) | starts | records | identical to the uninterrupted run |",
            "|---|---|---|---|---|"]
    for path in sorted(Path(folder).glob("*.json")):
        s = json.loads(path.read_text())
        start_up = sum(k.get("phase") == "start-up" for k in s["kills"])
        same = ("records byte for byte, weights bit for bit" if s.get("identical_bytes") and s.get("identical_weights")
                else "every case once, each record equal" if s.get("identical_records") and s.get("each_case_once")
                else "**no**")
        rows.append(f"| {s['name']} | {len(s['kills'])} ({s['driver_kills']} / {s['worker_kills']}; {start_up}) | "
                    f"{s['starts']} | {s['records']} of {s['reference_records']} | {same} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS))
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--workers", type=int, default=0, help="A Ray run on N workers instead of a sequential one.")
    ap.add_argument("--monitor-every", type=int, default=10)
    add_fault_run_options(ap, "runs/chaos")
    args = ap.parse_args()
    if args.table:
        return print(table(args.table))
    name = f"{args.method}-{'ray' + str(args.workers) if args.workers else 'sequential'}-{args.n}"
    folder = Path(args.out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    timing = reference(args, folder, env)
    print(f"reference: start-up {timing['startup_s']:.0f} s, {timing['per_edit_s']:.1f} s per case", flush=True)
    run = chaos(args, folder, env, timing)
    result = dict(name=name, command=portable(" ".join(command(args, Path("OUT"), False)[1:])), seed=args.seed,
                  reference=timing, **run, **compare(args, folder))
    result["driver_kills"] = sum(k["what"] == "driver" for k in run["kills"])
    result["worker_kills"] = sum(k["what"] == "worker" for k in run["kills"])
    write_summary(result, folder, args.docs)
    ok = result.get("identical_bytes", True) and result.get("identical_weights", True) and \
        result.get("identical_records", True) and result.get("each_case_once", True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
