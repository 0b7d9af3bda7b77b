"""Architecture table: where each model family keeps the pieces ROME touches.

Architecture differences are data, not branches. Each entry names, with a
``{}`` for the layer index:

* ``layer``: the transformer block;
* ``mlp_out``: the MLP's output projection W (its input is the key k, its
  output the value v);
* ``transposed``: True where W is stored as [in, out] (GPT-2's Conv1D) instead
  of torch.nn.Linear's [out, in];
* ``fast``: whether the fast v* runner (``fast.py``) applies. Mistral's and
  Gemma 3's sliding-window masks don't yet accept its prefix cache, so they
  use the reference runner.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CromeError


@dataclass(frozen=True)
class Arch:
    layer: str
    mlp_out: str
    transposed: bool = False
    fast: bool = True

    def layer_name(self, layer: int) -> str:
        return self.layer.format(layer)

    def mlp_out_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)


_LLAMA_LIKE = Arch("model.layers.{}", "model.layers.{}.mlp.down_proj")

ARCHITECTURES: dict[str, Arch] = {
    "gpt2": Arch("transformer.h.{}", "transformer.h.{}.mlp.c_proj", transposed=True),
    "gptj": Arch("transformer.h.{}", "transformer.h.{}.mlp.fc_out"),
    "gpt_neox": Arch("gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
    "llama": _LLAMA_LIKE,
    "mistral": Arch("model.layers.{}", "model.layers.{}.mlp.down_proj", fast=False),
    "qwen2": _LLAMA_LIKE,
    "gemma3_text": Arch("model.layers.{}", "model.layers.{}.mlp.down_proj", fast=False),
    "gemma3": Arch("model.language_model.layers.{}", "model.language_model.layers.{}.mlp.down_proj", fast=False),
}


def arch_for(model_type: str) -> Arch:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise CromeError(
            f"unsupported architecture '{model_type}': crome supports {supported}"
        ) from None
