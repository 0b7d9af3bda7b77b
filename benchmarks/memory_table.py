"""Memory for one edit on 7B-class models: weights, v* activations, key statistics.

Shapes come from the models' configs, built on the meta device (no weights, no download):
GPT-J-6B (``GPTJConfig()`` defaults are GPT-J-6B's) and Llama-2-7B (``LlamaConfig()`` defaults).
Three parts:

* weights: parameters × bytes per value (float32, bfloat16);
* v* optimisation: the 21 templated prompts (20 context templates and the bare prompt) and the
  KL prompt, each ``--tokens`` long, run forward and backward from the edited layer to the
  output (crome's fast path); saved activations per token and layer are taken as
  ``a·d + b·d_ff + heads·T`` values, and the log-softmax over the vocabulary is kept in float32.
  ``a`` and ``b`` are fitted to nothing: they are counted from the layer's saved tensors (norms,
  q/k/v/o, MLP gate/up/act/down inputs) and the estimate is checked against a measured peak on
  the default model (``--measure``, peak RSS of one edit on CPU);
* key statistics: C is d_ff × d_ff in float32, accumulated in float64 while it is computed.

    python benchmarks/memory_table.py --measure --out docs/results/scale/memory.json
"""

from __future__ import annotations

import argparse
import resource

from benchlib import emit

BYTES = {"float32": 4, "bfloat16": 2}
GiB = 1024 ** 3


def shapes(config) -> dict:
    from crome.models import count_parameters

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = getattr(text, "hidden_size", None) or text.n_embd
    d_ff = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * d
    return dict(params=count_parameters(config), d=d, d_ff=d_ff,
                layers=getattr(text, "num_hidden_layers", None) or text.n_layer,
                heads=getattr(text, "num_attention_heads", None) or text.n_head, vocab=text.vocab_size)


def estimate(s: dict, dtype: str, layer: int, tokens: int = 32, prompts: int = 22) -> dict:
    b = BYTES[dtype]
    rows = prompts * tokens
    layers_run = s["layers"] - layer
    per_layer = rows * (12 * s["d"] + 4 * s["d_ff"] + s["heads"] * tokens) * b
    logits = rows * s["vocab"] * (b + 2 * 4)          # logits, float32 copy, log-softmax
    return dict(weights_gib=s["params"] * b / GiB,
                v_star_activations_gib=(layers_run * per_layer + logits) / GiB,
                key_stats_gib=s["d_ff"] ** 2 * 4 / GiB,
                key_stats_while_computing_gib=s["d_ff"] ** 2 * (4 + 8) / GiB)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_default(tokens: int) -> dict:
    """Peak resident memory above the loaded model during one edit on the default model (CPU,
    float32, sampled every 2 ms), against the estimate for the same shapes."""
    import threading
    import time

    import torch

    from crome import EditRequest, Hparams, compute_edit, context_templates, load_model

    lm = load_model(device="cpu", progress=False)
    req = EditRequest(prompt="{} is the capital of", subject="Paris", target_new="Germany")
    hp = Hparams(layer=6, mom2_adjustment=False, early_stop_loss=0.0)
    templates = context_templates(lm)
    base, peak, running = _rss(), [0], [True]

    def watch():
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=watch)
    thread.start()
    compute_edit(lm, req, "crome", hparams=hp, templates=templates)
    running[0] = False
    thread.join()
    s = shapes(lm.model.config)
    return dict(model=lm.name, threads=torch.get_num_threads(), layer=6, prompts=len(templates) + 1,
                peak_growth_gib=(peak[0] - base) / GiB, estimate=estimate(s, "float32", 6, tokens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="Tokens per templated prompt.")
    ap.add_argument("--measure", action="store_true", help="Also measure one edit on the default model (CPU).")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from transformers import GPTJConfig, LlamaConfig

    models = {"GPT-J-6B": (GPTJConfig(), 5), "Llama-2-7B": (LlamaConfig(), 5)}
    result = dict(tokens=args.tokens, models={})
    for name, (config, layer) in models.items():
        s = shapes(config)
        result["models"][name] = dict(shapes=s, layer=layer,
                                      **{dt: estimate(s, dt, layer, args.tokens) for dt in BYTES})
    if args.measure:
        result["default_model_check"] = measure_default(args.tokens)
    emit(result, args.out)


if __name__ == "__main__":
    main()
