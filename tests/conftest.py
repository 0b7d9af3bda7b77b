"""Fixtures: tiny random models built from a config (no download) and the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(os.environ.get("CROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ME_PPL_50 = DATA / "me-ppl" / "ME-PPL_50.json"

# a handful of templates so tiny-model tests don't sample
TEMPLATES = ["{}", "The day was long. {}", "Therefore it rained. {}", "I saw that. {}"]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests use their own cache folder, except for the converted default model."""
    os.environ.setdefault("CROME_CACHE_DIR", str(tmp_path_factory.mktemp("crome-cache")))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from crome.models import default_gguf_path

    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return tok


def tiny_config(model_type: str, vocab_size: int):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=3, n_embd=32, n_head=2, n_positions=128, **common)
    if model_type == "gptj":
        return AutoConfig.for_model("gptj", n_layer=3, n_embd=32, n_head=2, n_positions=128, rotary_dim=8, **common)
    if model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=128, **common)
    extra = dict(head_dim=16) if model_type == "gemma3_text" else {}
    if model_type in ("mistral", "gemma3_text"):
        extra["sliding_window"] = 6  # shorter than the templated prompts, so the window matters
    return AutoConfig.for_model(model_type, num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                                **extra, **common)


def tiny_model(model_type: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from crome.models import from_modules

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, len(tokenizer)))
    # larger random weights so tiny models have non-trivial activations
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return from_modules(model, tokenizer, name=f"tiny-{model_type}")


def save_tiny(folder, tokenizer, model_type: str = "llama"):
    """A tiny random model saved as a model folder (what --model takes)."""
    lm = tiny_model(model_type, tokenizer)
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request, tokenizer):
    return tiny_model(request.param, tokenizer)


@pytest.fixture(scope="session")
def default_lm():
    from crome.models import load_model

    return load_model(progress=False)


@pytest.fixture(scope="session")
def me_ppl_50():
    from crome.evaluation.texts import load_texts

    if not ME_PPL_50.exists():
        pytest.skip(f"shared data not found at {ME_PPL_50}")
    return load_texts(ME_PPL_50)
