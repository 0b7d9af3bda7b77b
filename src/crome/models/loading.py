"""Reading and writing models: ``load_model`` (the embedded default model, a GGUF file, a Hugging Face
id or a local folder), how the CLI asks for it (``LoadOptions``), ``from_modules`` for a model already in
memory, and ``save_model``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch import arch_for
from ..errors import CromeError, first_line
from .dtypes import resolve_dtype
from .gguf import converted_gguf, default_gguf_path
from .loaded import LoadedModel
from .paths import default_device

DEFAULT_MODEL = "smollm2-135m-instruct"


def _has_safetensors(path: str | Path) -> bool | None:
    """Whether a local folder holds safetensors weights (None: not a local folder, ask the hub)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    return any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").exists()


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded, as the CLI's --dtype, --device-map, --trust-remote-code and
    --allow-pickle give it (``load_model(name, **options.kwargs())``)."""

    dtype: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def kwargs(self) -> dict:
        return dict(dtype=self.dtype, device_map=self.device_map, trust_remote_code=self.trust_remote_code,
                    allow_pickle=self.allow_pickle)


def _source(name: str | None, progress: bool) -> tuple[str, str | Path]:
    """(the model's name, what transformers loads): the embedded default model and GGUF files are
    converted once (cached); anything else is a Hugging Face id or a local folder."""
    if name in (None, DEFAULT_MODEL):
        return DEFAULT_MODEL, converted_gguf(default_gguf_path(), progress)
    if name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise CromeError(f"cannot load model '{name}': no such GGUF file")
        return gguf.stem, converted_gguf(gguf.resolve(), progress)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path and not Path(name).expanduser().exists():
        raise CromeError(f"cannot load model '{name}': no such folder")
    return name, name


def load_model(
    name: str | None = None,
    device: torch.device | str | None = None,
    dtype: str | torch.dtype | None = torch.float32,
    progress: bool = True,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM for editing.

    ``name=None`` (or ``"smollm2-135m-instruct"``) is the embedded default model;
    a path ending in ``.gguf`` is converted to fp32 once and cached by the file's
    sha256; anything else is a Hugging Face model id or a local folder.

    ``dtype``: a torch dtype, a name, or ``"auto"`` (``resolve_dtype``). ``device_map="auto"``
    spreads the model over the GPUs (accelerate) instead of putting it on ``device``.
    Weights load from safetensors only: pickle (``.bin``) files need ``allow_pickle``, and code
    shipped with a model runs only with ``trust_remote_code``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    label, path = _source(name, progress)
    if device_map not in (None, "auto"):
        raise CromeError(f"--device-map must be 'auto', not {device_map!r}")
    if _has_safetensors(path) is False and not allow_pickle:
        raise CromeError(f"cannot load model '{label}': it has no safetensors weights; pass --allow-pickle to "
                         f"load pickle (.bin) weights you trust")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        torch_dtype = resolve_dtype(dtype, device, config)
        arch = arch_for(config.model_type)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            **({"device_map": "auto"} if device_map else {}))
    except CromeError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/HTTP errors
        raise CromeError(f"cannot load model '{label}': {first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=label, arch=arch)


def from_modules(model: torch.nn.Module, tokenizer, name: str = "custom") -> LoadedModel:
    """Wrap a model already in memory (used by tests with tiny random models)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, arch=arch_for(model.config.model_type))


def save_model(lm: LoadedModel, path: str | Path) -> Path:
    """Save (edited) weights in Hugging Face format; AutoModelForCausalLM loads the folder."""
    path = Path(path)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
