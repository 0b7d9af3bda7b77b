"""Hashes of what a model is: its weights (``weights_fingerprint``), its vocabulary
(``tokenizer_fingerprint``), and of any tensors (``tensor_sha``)."""

from __future__ import annotations

import hashlib
import json

import torch

from ..hooks import widen


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the weights: every tensor's name, shape and first 4,096 values (in float32,
    or float64 for a float64 model, whose caches must not be those of its float32 original)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(widen(p.detach().reshape(-1)[:4096]).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary (token -> id): the same weights with another tokenizer read other text."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:12]


def tensor_sha(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' values, one after another, each in float32 (float64 stays float64):
    the first 16 hex digits."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(widen(t.detach()).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
