"""``LoadedModel``: a causal LM in memory with its tokenizer and architecture, and the identity its
caches are keyed by. Reading models from files is ``loading.py``'s."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import Arch
from ..errors import CromeError
from ..hooks import widen
from .dtypes import dtype_name
from .fingerprint import tokenizer_fingerprint, weights_fingerprint


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where ROME finds its MLP output matrices."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    arch: Arch
    identity: str = ""   # what caches are keyed by: the weights and the tokenizer, not the name

    def __post_init__(self):
        if not self.identity:
            self.identity = f"weights-{weights_fingerprint(self.model)}-vocab-{tokenizer_fingerprint(self.tokenizer)}"

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> str:
        """The weights' dtype, by name (``float32``, ``bfloat16``, ``float16``, ``float64``)."""
        return dtype_name(next(self.model.parameters()).dtype)

    def module(self, name: str) -> torch.nn.Module:
        return self.model.get_submodule(name)

    def mlp_out(self, layer: int) -> torch.nn.Module:
        return self.module(self.arch.mlp_out_name(layer))

    def weight(self, layer: int) -> torch.Tensor:
        """W of the edited layer, always as [out, in] (a view for GPT-2's Conv1D)."""
        w = self.mlp_out(layer).weight
        return w.T if self.arch.transposed else w

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on final hidden states (after the final norm), as float32 (float64 stays),
        with Gemma's logit soft-capping where the config asks for it."""
        logits = widen(self.model.get_output_embeddings()(hidden))
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise CromeError(
                f"layer {layer} out of range: {self.name} has layers 0..{self.num_layers - 1}"
            )
