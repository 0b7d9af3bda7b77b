"""The fast v* runner: the same numbers as the straightforward computation, a fraction of the work.

``FastRunner`` replaces ``compute_value.ReferenceRunner`` in the v* optimisation (the same idea,
for perplexity after an edit, is ``scoring.monitor.PerplexityMonitor``).

δ is added to W's output at layer L at the subject's last token p. Nothing before
p ever sees it, and no layer below L does. So, once per edit:

* the prefix (positions < p) runs through the model once, its keys/values kept
  as a cache;
* the suffix (positions ≥ p) runs through layers < L once, and those layers are
  then short-circuited to return that recorded output;

and every optimisation step runs only the suffix through layers ≥ L, attending
to the cached prefix, with the output layer applied only at the positions the
loss reads. No weight gradients are ever built.
"""

from __future__ import annotations

import inspect

import torch

from ..hooks import add_at, record, short_circuit
from ..models import LoadedModel
from ..request import pad_right
from .compute_value import Batch


class FastRunner:
    """Drop-in for ``ReferenceRunner``: same log-probs, computed on the suffix above layer L only."""

    def __init__(self, lm: LoadedModel, batch: Batch, layer: int, site: torch.nn.Module | None = None):
        self.lm, self.batch, self.layer = lm, batch, layer
        self.site = site if site is not None else lm.mlp_out(layer)   # δ is added to its output (in layer L)
        dev, pad = lm.device, lm.tokenizer.pad_token_id
        self.base = lm.model.base_model
        params = inspect.signature(self.base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.layers = [lm.module(lm.arch.layer_name(i)) for i in range(lm.num_layers)]

        starts = batch.lookup
        prefixes = [s[:p] for s, p in zip(batch.sequences, starts)]
        suffixes = [s[p:] for s, p in zip(batch.sequences, starts)]
        # prefixes padded on the left, so that every row's prefix ends where its suffix
        # starts: index distances then equal token distances, as sliding windows assume
        pre_ids, pre_mask = pad_right(prefixes, pad, dev, left=True)
        self.suf_ids, suf_mask = pad_right(suffixes, pad, dev)
        self.P, S = pre_ids.shape[1], self.suf_ids.shape[1]
        self.mask = torch.cat([pre_mask, suf_mask], 1)
        self.positions = (torch.tensor(starts)[:, None] + torch.arange(S)[None, :]).to(dev)
        n = len(batch.sequences)
        self.rows = torch.arange(n, device=dev)
        self.zero = torch.zeros(n, dtype=torch.long, device=dev)

        t_rows, t_pos, t_ids = batch.target_reads()
        t_pos = [p - starts[i] for i, p in zip(t_rows, t_pos)]  # suffix coordinates
        kl = list(range(batch.n_rewrite, n))
        self.read_rows = torch.tensor(t_rows + kl, device=dev)
        self.read_pos = torch.tensor(t_pos + [0] * len(kl), device=dev)
        self.t_ids = torch.tensor(t_ids, device=dev)
        self.n_t = len(t_ids)

        with torch.no_grad():
            self.cache = None
            if self.P:
                out = self.base(input_ids=pre_ids, attention_mask=pre_mask,
                                position_ids=(torch.tensor(starts, device=dev)[:, None] - self.P
                                              + torch.arange(self.P, device=dev)[None]).clamp(min=0),
                                use_cache=True)
                self.cache = getattr(out, "cache", None) or out.past_key_values
                for lay in self.cache.layers:  # fully padded rows: no NaN
                    lay.keys.nan_to_num_(0.0)
                    lay.values.nan_to_num_(0.0)
                # everything a cache layer holds (keys, values, a sliding window's length)
                self.prefix_state = [dict(vars(lay)) for lay in self.cache.layers]
            self.below = None
            if layer > 0:
                with record(self.layers[layer - 1]) as rec:
                    self._base_forward()
                self.below = rec.output

    def _base_forward(self):
        kwargs = {self.cache_kw: self.cache} if self.cache is not None else {}
        out = self.base(input_ids=self.suf_ids, attention_mask=self.mask, position_ids=self.positions,
                        use_cache=self.cache is not None, **kwargs)
        if self.cache is not None:
            self._crop()
        return out.last_hidden_state

    def _crop(self) -> None:
        """Drop the suffix the forward appended: the cache holds the prefix only again."""
        for lay, state in zip(self.cache.layers, self.prefix_state):
            vars(lay).clear()
            vars(lay).update(state)

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.layers[: self.layer] if self.below is not None else []
        with short_circuit(skip, self.below), add_at(self.site, self.rows, self.zero, delta):
            hidden = self._base_forward()
        log_probs = torch.log_softmax(self.lm.logits(hidden[self.read_rows, self.read_pos]), dim=-1)
        target_lp = log_probs[torch.arange(self.n_t, device=log_probs.device), self.t_ids]
        return target_lp, log_probs[self.n_t:], log_probs[:self.n_t].detach().max(-1).values
