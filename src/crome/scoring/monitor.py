"""Perplexity of a fixed text set, measured again cheaply after edits at one layer.

An edit at layer L changes nothing below L: the output of layer L-1 is recorded once, and each
later measurement runs only the layers from L up (``hooks.short_circuit``). The numbers equal
``measure.perplexity``'s.
"""

from __future__ import annotations

import math

import torch

from ..hooks import repeat_output, run_until, short_circuit
from ..models import LoadedModel
from ..request import pad_right
from .measure import next_token_nll


class PerplexityMonitor:
    """Perplexity of a fixed text set, measured again cheaply after edits at ``layer``.

    An edit at layer L changes nothing below L. The texts are tokenised once, the
    output of layer L-1 is recorded once (with the unedited model), and each later
    call runs only layers ≥ L and the output layer. ``baseline`` is the unedited
    model's perplexity. The numbers equal ``measure.perplexity`` (same token
    weighting; batches sorted by length, so up to float rounding).
    """

    def __init__(self, lm: LoadedModel, texts: list[str], layer: int, batch_size: int = 10, max_length: int = 256):
        lm.check_layer(layer)
        self.lm, self.layer = lm, layer
        self.texts, self.batch_size, self.max_length = texts, batch_size, max_length
        self.below_monitors: dict[int, PerplexityMonitor] = {}
        self.layers = [lm.module(lm.arch.layer_name(i)) for i in range(lm.num_layers)]
        tokens = sorted((lm.tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts), key=len)
        self.batches = []  # texts of similar length batched together: little padding
        for start in range(0, len(tokens), batch_size):
            seqs = tokens[start:start + batch_size]
            ids, mask = pad_right(seqs, lm.tokenizer.pad_token_id, lm.device)
            below = None
            if layer > 0:
                with torch.no_grad():
                    below = run_until(lm.model, self.layers[layer - 1], input_ids=ids, attention_mask=mask).output
            self.batches.append((ids, mask, below))
        self.baseline = self()

    def at(self, layer: int) -> "PerplexityMonitor":
        """A monitor that sees an edit at ``layer``: this one for layers at or above its own (it
        recomputes every layer from its own up), else one for ``layer`` on the same texts, made once."""
        if layer >= self.layer:
            return self
        if layer not in self.below_monitors:
            self.below_monitors[layer] = PerplexityMonitor(self.lm, self.texts, layer, self.batch_size, self.max_length)
        return self.below_monitors[layer]

    @torch.no_grad()
    def __call__(self) -> float:
        nll, count = 0.0, 0
        for ids, mask, below in self.batches:
            skip = self.layers[: self.layer] if below is not None else []
            with short_circuit(skip, below):
                hidden = self.lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            lost, counted = next_token_nll(self.lm, hidden, ids, mask)
            nll, count = nll + lost, count + counted
        return math.exp(nll / count)

    @torch.no_grad()
    def each(self, overlay, max_rows: int = 64) -> list[float]:
        """The perplexity under each edit of ``overlay`` (``edit.Overlay``, W untouched): several
        edits share one forward pass, each on its own copy of a batch of texts, up to ``max_rows`` rows."""
        if overlay.layer < self.layer:
            return self.at(overlay.layer).each(overlay, max_rows)
        k = len(overlay)
        nll, count = [0.0] * k, 0
        for ids, mask, below in self.batches:
            b = len(ids)
            count += int(mask[:, 1:].sum())
            step = max(1, max_rows // b)
            for first in range(0, k, step):
                group = list(range(first, min(first + step, k)))
                n = len(group)
                skip = self.layers[: self.layer] if below is not None else []
                owners = [e for e in group for _ in range(b)]
                with short_circuit(skip, repeat_output(below, n)), overlay.rows(self.lm, owners):
                    hidden = self.lm.model.base_model(input_ids=ids.repeat(n, 1),
                                                      attention_mask=mask.repeat(n, 1)).last_hidden_state
                for j, e in enumerate(group):
                    nll[e] += next_token_nll(self.lm, hidden[j * b:(j + 1) * b], ids, mask)[0]
        return [math.exp(x / count) for x in nll]

