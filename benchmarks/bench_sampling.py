"""Cold key statistics: what sampling the text costs, the old way against the default, in one run.

"fp32, 32 rows" is the scheme crome used before: the model's own dtype, 32 rows per batch. The
default draws up to 256 rows per batch with a KV cache, only the last position's logits, in
bfloat16 where the hardware has it (``crome.editing.mom2.sampling_dtype``). Both sample the same
number of tokens; then a full cold ``key_stats`` (sampling and key pass) runs from an empty cache.

    python benchmarks/bench_sampling.py                          # default model, layer 6
    python benchmarks/bench_sampling.py --qwen-shaped --out docs/results/models/sampling-qwen2-0.5b-shaped.json

``--qwen-shaped`` builds a randomly initialised model with Qwen2-0.5B's shapes (24 layers, width
896, MLP 4864, 151,936-token vocabulary, tied embeddings; the held-out model of issue 26 is not
available here): the cost is the shapes', not the weights'.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchlib import emit


def qwen_shaped(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from crome.models import from_modules

    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return from_modules(model, tokenizer, name="qwen2-0.5b-shaped-random")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--qwen-shaped", action="store_true", help="A random model with Qwen2-0.5B's shapes.")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--skip-old", action="store_true", help="Time only the default scheme.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import transformers

    from crome.editing.mom2 import key_stats, sample_token_ids, sampling_dtype
    from crome.models import dtype_name, load_model

    transformers.utils.logging.set_verbosity_error()
    lm = load_model(args.model, progress=False)
    if args.qwen_shaped:
        lm = qwen_shaped(lm.tokenizer)
    result = dict(model=lm.name, device=str(lm.device), threads=torch.get_num_threads(), samples=args.samples,
                  vocab=lm.model.get_output_embeddings().weight.shape[0], layer=args.layer,
                  sampling_dtype=dtype_name(sampling_dtype(lm)))
    if not args.skip_old:
        _, secs = timed(lambda: sample_token_ids(lm, args.samples, batch_size=32, dtype=torch.float32))
        result["sampling_fp32_32_rows_seconds"] = secs
        print(f"fp32, 32 rows: {secs:.1f} s", flush=True)
    _, secs = timed(lambda: sample_token_ids(lm, args.samples))
    result["sampling_default_seconds"] = secs
    print(f"default ({result['sampling_dtype']}, 256 rows): {secs:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CROME_CACHE_DIR"] = tmp
        stats, secs = timed(lambda: key_stats(lm, args.layer, None, args.samples, progress=False))
    result["cold_key_stats_seconds"] = secs
    result["key_stats"] = stats.record()
    print(f"cold key statistics (sampling + key pass): {secs:.1f} s", flush=True)
    emit(result, args.out, indent=2)


if __name__ == "__main__":
    main()
