"""Context templates: the random prefixes ROME averages keys over.

The reference scheme (EasyEdit / MEMIT): the bare ``"{}"`` plus, for each
(length, count) in ``((5, 10), (10, 10))``, ``count`` texts of ``length`` tokens
sampled from the model itself with top-k 5, ``count // 5`` after each of
"The", "Therefore", "Because", "I", "You"; each becomes ``"<text>. {}"``.
Sampling uses its own seeded generator, and the result is cached per model.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..cache import cached
from ..hooks import widen
from ..models import LoadedModel, cache_dir

BARE = "{}"


@torch.no_grad()
def sample_texts(lm: LoadedModel, start: str, n: int, length: int, generator: torch.Generator,
                 top_k: int = 5) -> list[str]:
    """``n`` continuations of ``start``, ``length`` tokens in all, top-k sampled."""
    tok = lm.tokenizer
    ids = torch.tensor([tok(start)["input_ids"]] * n, device=lm.device)
    while ids.shape[1] < length:  # short texts: recomputing beats managing a KV cache
        logits = widen(lm.model(input_ids=ids).logits[:, -1, :])
        top = logits.topk(top_k, dim=-1)
        probs = torch.softmax(top.values, dim=-1).cpu()
        choice = torch.multinomial(probs, 1, generator=generator).to(lm.device)
        ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
    return [tok.decode(row, skip_special_tokens=True) for row in ids]


def generate_templates(lm: LoadedModel, seed: int = 0,
                       lengths=((5, 10), (10, 10)),
                       starts=("The", "Therefore", "Because", "I", "You")) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    templates = [BARE]
    for length, count in lengths:
        per_start = max(1, count // len(starts))
        for start in starts:
            for text in sample_texts(lm, start, per_start, length, generator):
                templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


def context_templates(lm: LoadedModel, seed: int = 0,
                      lengths=((5, 10), (10, 10)),
                      starts=("The", "Therefore", "Because", "I", "You"),
                      use_cache: bool = True) -> list[str]:
    """Seeded context templates for ``lm``, cached on disk per model and settings."""
    key = json.dumps([lm.identity, seed, [list(x) for x in lengths], list(starts), str(lm.device.type)])
    path = cache_dir() / "templates" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    return cached(path, lambda: generate_templates(lm, seed, lengths, starts),
                  lambda t: json.dumps({"key": json.loads(key), "templates": t}, indent=1).encode(),
                  lambda b: json.loads(b)["templates"], "context templates", use_cache)
