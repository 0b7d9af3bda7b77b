"""The dtypes a model loads in: their names (``DTYPES``, ``dtype_name``) and the ``auto`` rule
(``resolve_dtype``: float32 on CPU, bfloat16 on a GPU for models over ``LARGE_MODEL_PARAMS``)."""

from __future__ import annotations

import torch

from ..errors import CromeError

# float64: for numerical checks (crome then computes v*, the update and the measures in float64 too)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
LARGE_MODEL_PARAMS = 1_000_000_000   # above this, "auto" loads bfloat16 on a GPU


def count_parameters(config) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config=None) -> torch.dtype:
    """``float32``/``bfloat16``/``float16``/``float64``, or ``auto`` (None): float32 on CPU, and on a GPU
    bfloat16 for models over 1B parameters, float32 below."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu" or config is None or count_parameters(config) <= LARGE_MODEL_PARAMS:
            return torch.float32
        return torch.bfloat16
    if dtype not in DTYPES:
        raise CromeError(f"unknown dtype '{dtype}': choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
