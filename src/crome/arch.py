"""Architecture table: where each model family keeps the pieces ROME touches.

Architecture differences are data, not branches. Each entry names, with a
``{}`` for the layer index:

* ``layer``: the transformer block;
* ``mlp_out``: the MLP's output projection W (its input is the key k, its
  output the value v);
* ``attn_out``: the attention's output projection (causal tracing restores its output);
* ``transposed``: True where W is stored as [in, out] (GPT-2's Conv1D) instead
  of torch.nn.Linear's [out, in].
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CromeError


@dataclass(frozen=True)
class Arch:
    layer: str
    mlp_out: str
    attn_out: str
    transposed: bool = False

    def layer_name(self, layer: int) -> str:
        return self.layer.format(layer)

    def mlp_out_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)

    def attn_out_name(self, layer: int) -> str:
        return self.attn_out.format(layer)


_LLAMA_LIKE = Arch("model.layers.{}", "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn.o_proj")

ARCHITECTURES: dict[str, Arch] = {
    "gpt2": Arch("transformer.h.{}", "transformer.h.{}.mlp.c_proj", "transformer.h.{}.attn.c_proj", transposed=True),
    "gptj": Arch("transformer.h.{}", "transformer.h.{}.mlp.fc_out", "transformer.h.{}.attn.out_proj"),
    "gpt_neox": Arch("gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp.dense_4h_to_h",
                     "gpt_neox.layers.{}.attention.dense"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": Arch("model.language_model.layers.{}", "model.language_model.layers.{}.mlp.down_proj",
                   "model.language_model.layers.{}.self_attn.o_proj"),
}


def arch_for(model_type: str) -> Arch:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise CromeError(
            f"unsupported architecture '{model_type}': crome supports {supported}"
        ) from None
