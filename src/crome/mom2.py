"""Second-moment statistics of keys, C = E[k kᵀ], for ROME's mom2 adjustment.

Keys are collected at every token position of a text corpus (a file, or the
Wikipedia summaries in the shared data), up to ``samples`` key vectors, and
cached on disk keyed by model, layer, corpus content and sample count.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .hooks import run_until
from .models import LoadedModel, cache_dir
from .texts import load_texts


def _corpus_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@torch.no_grad()
def second_moment(lm: LoadedModel, layer: int, corpus: str | Path, samples: int = 20000,
                  max_length: int = 128, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """C = mean of k kᵀ over ``samples`` key vectors from ``corpus`` (cached)."""
    corpus = Path(corpus)
    key = f"{lm.name}|{layer}|{_corpus_hash(corpus)}|{samples}|{max_length}"
    path = cache_dir() / "mom2" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".pt")
    if path.exists():
        return torch.load(path, map_location=lm.device)["mom2"]
    texts = load_texts(corpus)
    d_in = lm.weight(layer).shape[1]
    total = torch.zeros(d_in, d_in, dtype=torch.float64, device=lm.device)
    count = 0
    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"mom2 stats, layer {layer}", total=samples)
        for start in range(0, len(texts), batch_size):
            enc = lm.tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                               truncation=True, max_length=max_length).to(lm.device)
            rec = run_until(lm.model, lm.mlp_out(layer), **enc)
            k = rec.input[enc["attention_mask"].bool()].double()
            k = k[: samples - count]
            total += k.T @ k
            count += k.shape[0]
            bar.update(task, completed=count)
            if count >= samples:
                break
    mom2 = (total / count).float()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"mom2": mom2.cpu(), "count": count, "key": json.dumps(key)}, path)
    return mom2
