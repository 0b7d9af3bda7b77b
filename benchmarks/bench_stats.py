"""What the safe defaults cost: key statistics (each source) and the auto layer, once per model;
the verifying guard's probe, once per edit.

Every timing starts from an empty cache folder (a temporary $CROME_CACHE_DIR; the converted
model is loaded from the normal cache). C from sampled text comes first, so its time includes
sampling the text; the auto layer then runs with that text cached (its trial edits need C at
each candidate layer: key passes, no new sampling), as it does for a user after the first run.

    python benchmarks/bench_stats.py                           # default model, layer 6
    python benchmarks/bench_stats.py --model path/to/x.gguf --layer 2 --out docs/results/models/stats-x.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchlib import emit

DATA = Path(os.environ.get("CROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--layer", type=int, default=None, help="Default: the model's table entry, else auto.")
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch
    import transformers

    from crome.editing.layer_choice import auto_layer, choose_layer
    from crome.editing.mom2 import key_stats
    from crome.models import load_model
    from crome.scoring.texts import default_corpus_path

    transformers.utils.logging.set_verbosity_error()
    lm = load_model(args.model, progress=False)  # converted model: normal cache
    result = dict(model=lm.name, device=str(lm.device), threads=torch.get_num_threads(), samples=args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CROME_CACHE_DIR"] = tmp
        layer = args.layer if args.layer is not None else choose_layer(lm).layer
        result["layer"] = layer
        sources = {"model": None, "passages": default_corpus_path(),
                   "wikipedia": DATA / "wikipedia" / "vital_articles_summaries_en.json"}
        for name, corpus in sources.items():
            t = time.perf_counter()
            stats = key_stats(lm, layer, corpus, args.samples, progress=False)
            result[f"stats_{name}"] = dict(seconds=time.perf_counter() - t, **stats.record())
            print(name, f"{result[f'stats_{name}']['seconds']:.1f} s", stats.record(), flush=True)
        t = time.perf_counter()
        auto = auto_layer(lm)
        result["auto_layer"] = dict(layer=auto.layer, rule=auto.rule, seconds=time.perf_counter() - t)
        print("auto layer", auto.layer, f"{result['auto_layer']['seconds']:.1f} s", flush=True)
    from crome.editing.verify import Verifier

    t = time.perf_counter()
    verifier = Verifier(lm, layer)
    result["guard_probe_setup_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    verifier.ratio()
    result["guard_probe_check_seconds"] = time.perf_counter() - t
    emit(result, args.out, indent=2)


if __name__ == "__main__":
    main()
