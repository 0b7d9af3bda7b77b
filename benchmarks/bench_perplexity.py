"""The perplexity check's output layer: the whole padded batch at once against real positions only, in
rows of ``measure.OUTPUT_ROWS``, in one run on the same texts and edited layer.

Both read the same final hidden states (the perplexity monitor's: layers from the edited one up, the
layers below recorded once). "whole batch" is how crome computed it before the eighth session on
issue 38: the output layer at every position of the padded batch, then the real positions picked out;
"row chunks" is ``measure.next_token_nll``. A 262k-token vocabulary (Gemma 3) makes the first a
gigabyte-sized tensor per batch. Reports seconds per call (the best of ``--repeat``) and both
perplexities.

    python benchmarks/bench_perplexity.py --out docs/results/speed/perplexity-default.json
    python benchmarks/bench_perplexity.py --model $G --layer 2 --out docs/results/speed/perplexity-gemma.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from benchlib import DATA, emit


@torch.no_grad()
def whole_batch(lm, monitor) -> float:
    """The earlier computation: the output layer on the whole padded batch, then the real positions."""
    from crome.hooks import short_circuit

    nll, count = 0.0, 0
    for ids, mask, below in monitor.batches:
        with short_circuit(monitor.layers[: monitor.layer] if below is not None else [], below):
            logits = lm.logits(lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1])
        real = mask[:, 1:].bool()
        lost = torch.nn.functional.cross_entropy(logits[real], ids[:, 1:][real], reduction="none")
        nll, count = nll + float(lost.double().sum()), count + int(real.sum())
    return math.exp(nll / count)


def best_of(fn, repeat: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="A model id, folder or GGUF file (default: crome's default model).")
    ap.add_argument("--layer", type=int, default=6, help="The edited layer the monitor starts at.")
    ap.add_argument("--ppl-data", default=str(DATA / "me-ppl" / "ME-PPL_50.json"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from crome.models import DEFAULT_MODEL, load_model
    from crome.scoring.measure import OUTPUT_ROWS
    from crome.scoring.monitor import PerplexityMonitor

    lm = load_model(args.model or DEFAULT_MODEL)
    texts = [r["Text"] for r in json.loads(open(args.ppl_data).read())]
    monitor = PerplexityMonitor(lm, texts, args.layer)
    old, t_old = best_of(lambda: whole_batch(lm, monitor), args.repeat)
    new, t_new = best_of(monitor, args.repeat)
    result = dict(model=lm.name, layer=args.layer, texts=len(texts), vocabulary=lm.model.config.get_text_config().vocab_size,
                  threads=torch.get_num_threads(), output_rows=OUTPUT_ROWS, whole_batch_s=round(t_old, 3),
                  row_chunks_s=round(t_new, 3), speedup=round(t_old / t_new, 2), ppl_whole_batch=old, ppl_row_chunks=new,
                  relative_difference=abs(old - new) / old)
    print(json.dumps(result, indent=1))
    if args.out:
        emit(result, args.out)


if __name__ == "__main__":
    main()
