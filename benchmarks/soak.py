"""Memory over a long sequential run (issue 25, part 5): RSS, open files and threads every 50 edits.

Runs ``crome eval --sequential`` (``--n`` edits, one thread) as a child process and reads its
``/proc/<pid>/status`` and ``/proc/<pid>/fd`` each time the results file reaches a multiple of
``--every`` records, that is, at the same point of the loop each time (an edit's record just written).
A leak of hooks, tensors or handles shows as RSS, files or seconds per edit growing with the edits.
The run passes when every sample after warm-up (the first sample) is within 5% of the warm-up RSS,
and the open files and threads do not grow.

    python benchmarks/soak.py --method crome --n 500 --docs docs/results/soak

It resumes: rerun the same command after a kill, and the samples already taken are kept (a sample
is taken only in the process that wrote its record).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchlib import CROME, add_fault_run_options, newlines, write_summary

TOLERANCE = 0.05


def status(pid: int) -> dict:
    """RSS and peak RSS in MiB, threads and open file descriptors of process ``pid``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return dict(rss_mib=round(int(fields["VmRSS"][0]) / 1024, 1), peak_mib=round(int(fields["VmHWM"][0]) / 1024, 1),
                threads=int(fields["Threads"][0]), open_files=len(os.listdir(f"/proc/{pid}/fd")))


def run(args, folder: Path) -> list[dict]:
    out, samples_path = folder / "results.jsonl", folder / "samples.jsonl"
    samples = [json.loads(s) for s in samples_path.read_text().splitlines()] if samples_path.exists() else []
    cmd = [CROME, "eval", "--data", args.data, "--method", args.method, "--n", str(args.n), "--out", str(out),
           "--sequential", "--monitor-every", str(args.every), "--gen-tokens", "0", "--ppl-data", args.ppl_data,
           "--seed", str(args.seed)] + (["--mpes"] if args.mpes else []) + (["--resume"] if out.exists() else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(folder / "log.txt", "a") as log, open(samples_path, "a") as keep:
        p = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        last, since = newlines(out), time.time()
        while p.poll() is None:
            time.sleep(0.2)
            n = newlines(out)
            if n == last or n % args.every:
                continue
            if p.poll() is None:      # still the process that wrote record n
                sample = dict(pid=p.pid, edits=n, seconds_per_edit=round((time.time() - since) / (n - last), 2),
                              **status(p.pid))
                samples.append(sample)
                keep.write(json.dumps(sample) + "\n")
                keep.flush()
                print(json.dumps(sample), flush=True)
            last, since = n, time.time()
    if p.returncode:
        raise SystemExit(f"the run failed (exit {p.returncode}): see {folder / 'log.txt'}")
    return samples


def verdict(samples: list[dict]) -> dict:
    """Flat means: every sample after warm-up within 5% of the warm-up sample's RSS, no more open
    files or threads than at warm-up. A resumed run is judged on its longest process."""
    pids = [s["pid"] for s in samples]
    samples = [s for s in samples if s["pid"] == max(set(pids), key=pids.count)] if samples else []
    if len(samples) < 2:
        return dict(flat=None)
    warm, after = samples[0], samples[1:]
    drift = max(abs(s["rss_mib"] - warm["rss_mib"]) / warm["rss_mib"] for s in after)
    return dict(judged_edits=[warm["edits"], samples[-1]["edits"]], warm_up_rss_mib=warm["rss_mib"], last_rss_mib=samples[-1]["rss_mib"],
                max_rss_drift=round(drift, 4), tolerance=TOLERANCE,
                files_grew=any(s["open_files"] > warm["open_files"] for s in after),
                threads_grew=any(s["threads"] > warm["threads"] for s in after),
                flat=drift <= TOLERANCE and not any(s["open_files"] > warm["open_files"] for s in after))


def table(folder: str) -> str:
    """The Markdown table of the summaries in ``folder`` (RELIABILITY.md's): one row per sample."""
    rows = ["| run | edits | RSS (MiB) | peak RSS (MiB) | open files | threads | seconds per edit |", "|---|---|---|---|---|---|---|"]
    for path in sorted(Path(folder).glob("*.json")):
        s = json.loads(path.read_text())
        rows += [f"| {s['name']} | {x['edits']} | {x['rss_mib']} | {x['peak_mib']} | {x['open_files']} | {x['threads']} | "
                 f"{x['seconds_per_edit']} |" for x in s["samples"]]
        rows.append(f"\n{s['name']}: largest drift from the warm-up RSS {100 * s['max_rss_drift']:.1f}% "
                    f"(tolerance {100 * s['tolerance']:.0f}%), flat: {s['flat']}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="crome")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--mpes", action="store_true", help="MPES early stopping (a cheaper v*).")
    add_fault_run_options(ap, "runs/soak")
    args = ap.parse_args()
    if args.table:
        return print(table(args.table))
    name = f"{args.method}{'+mpes' if args.mpes else ''}-{args.n}"
    folder = Path(args.out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    samples = run(args, folder)
    result = dict(name=name, n=args.n, every=args.every, seed=args.seed, samples=samples, **verdict(samples))
    write_summary(result, folder, args.docs)
    sys.exit(0 if result["flat"] else 1)


if __name__ == "__main__":
    main()
