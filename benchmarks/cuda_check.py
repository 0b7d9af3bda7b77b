"""The CUDA path, checked: edits on the GPU, fast path against reference path, and against the CPU.

    python benchmarks/cuda_check.py [--json out.json]

On the default model (SmolLM2-135M-Instruct) for "Paris is the capital of" → Germany,
both methods: v*, ΔW and the denominator from the fast and the reference runner on
CUDA, and from the fast runner on the CPU; seconds per edit on each; the
perplexity monitor against the plain perplexity after the edit; restore is bit-exact.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from crome import EditRequest, apply_edit, compute_edit, load_model
from crome.editing.compute_value import ReferenceRunner
from crome.editing.fast import FastRunner
from crome.editing.hparams import defaults_for
from crome.scoring.measure import perplexity
from crome.scoring.monitor import PerplexityMonitor
from crome.scoring.texts import load_texts

PAPER = defaults_for("smollm2-135m-instruct", 30).with_(mom2_adjustment=False)  # the setting of the stored results


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / a.float().cpu().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--ppl-data", default=None)
    ap.add_argument("--device", default="cuda", help="the device under test (cpu: a dry run of this script)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    gpu = load_model(device=args.device, progress=False)
    cpu = load_model(device="cpu", progress=False)
    req = EditRequest.create("{} is the capital of", "Paris", "Germany")
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__,
              "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "methods": {}}
    from crome.editing.templates import context_templates

    templates = context_templates(cpu, 0)  # the same templates on both devices
    texts = load_texts(args.ppl_data)
    monitor = PerplexityMonitor(gpu, texts, 6)
    for method in ("rome", "crome"):
        edits, seconds = {}, {}
        for name, lm, runner in (("cuda_reference", gpu, ReferenceRunner), ("cuda_fast", gpu, FastRunner),
                                 ("cpu_fast", cpu, FastRunner)):
            compute_edit(lm, req, method, hparams=PAPER, templates=templates, runner_cls=runner)  # warm-up
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            edits[name] = compute_edit(lm, req, method, hparams=PAPER, templates=templates, runner_cls=runner)
            if lm.device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - t
        ref, fast, on_cpu = edits["cuda_reference"], edits["cuda_fast"], edits["cpu_fast"]
        w0 = gpu.weight(6).detach().clone()
        handle = apply_edit(gpu, fast)
        ppl_fast, ppl_plain = monitor(), perplexity(gpu, texts)
        handle.restore()
        report["methods"][method] = {
            "seconds": seconds,
            "v_star_rel_diff_fast_vs_reference": rel(ref.vectors.v_star, fast.vectors.v_star),
            "delta_w_rel_diff_fast_vs_reference": rel(ref.delta_w, fast.delta_w),
            "v_star_rel_diff_cuda_vs_cpu": rel(on_cpu.vectors.v_star, fast.vectors.v_star),
            "delta_w_rel_diff_cuda_vs_cpu": rel(on_cpu.delta_w, fast.delta_w),
            "denominator": {k: e.diagnostics.denominator for k, e in edits.items()},
            "opt_steps": {k: e.diagnostics.opt_steps for k, e in edits.items()},
            "ppl_before": monitor.baseline, "ppl_after_monitor": ppl_fast, "ppl_after_plain": ppl_plain,
            "restore_bit_exact": bool(torch.equal(gpu.weight(6), w0)),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
