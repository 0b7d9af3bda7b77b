"""Fixtures: tiny random models built from a config (no download) and the real default model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from crome.editing.context import RunSettings
from crome.editing.hparams import Hparams
from crome.editing.mom2 import KeyStats

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


def tiny_model(model_type: str, tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    from crome.models import from_modules

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, len(tokenizer))).to(dtype)
    # larger random weights so tiny models have non-trivial activations; drawn in ``dtype``
    # (torch's vectorised normal_ rounds its draws differently on CPUs with other vector units:
    # float32 draws differ in the last bits between machines, float64 ones ~1e-16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return from_modules(model, tokenizer, name=f"tiny-{model_type}")


def save_tiny(folder, tokenizer, model_type: str = "llama", dtype: torch.dtype = torch.float32):
    """A tiny random model saved as a model folder (what --model takes)."""
    lm = tiny_model(model_type, tokenizer, dtype=dtype)
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
    from crome.scoring.texts import load_texts

    if not ME_PPL_50.exists():
        pytest.skip(f"shared data not found at {ME_PPL_50}")
    return load_texts(ME_PPL_50)


# ------------------------------------------------------------------ data and helpers shared by the test files

FLAT = [
    {"case_id": 1, "prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Germany",
     "ground_truth": "France", "rephrase_prompt": "The city of Paris is the capital of",
     "locality_prompt": "Berlin is the capital of", "locality_ground_truth": "Germany"},
    {"case_id": 2, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux speaks",
     "locality_prompt": "The mother tongue of Jean Gabin is", "locality_ground_truth": "French"},
    {"case_id": 3, "prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano",
     "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is known for playing the",
     "locality_prompt": "Jimi Hendrix plays the", "locality_ground_truth": "guitar"},
]
FULL = {"case_id": 18, "requested_rewrite": {"prompt": "{}, created by", "subject": "Porsche 911",
        "target_new": {"str": "Honda"}, "target_true": {"str": "Porsche"}},
        "paraphrase_prompts": ["Porsche 911 is developed by", "Porsche 911, developed by"],
        "neighborhood_prompts": ["Porsche 550, developed by"], "attribute_prompts": ["Honda 70, produced by"],
        "generation_prompts": ["Porsche 911 is sold by"]}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
        "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
HP = Hparams(mom2_adjustment=False, layer=1, v_steps=3)
TEXTS = ["The cat sat on the mat.", "Rivers run to the sea and the sea is wide.", "A short one."]


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def settings(**kw):
    base = dict(method="rome", model="tiny-llama", layer=1, seed=0, test_prefix="fixed", data="data.json",
                ppl_data="texts", gen_tokens=5)
    return RunSettings(**{**base, **kw})


def approx_equal(a, b, rel=1e-4, path="record"):
    """Records equal but for float rounding: every number within ``rel``, everything else exactly."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-9), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            approx_equal(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            approx_equal(x, y, rel, f"{path}[{i}]")
    else:
        assert a == b, path


def assert_same(a, b, tol=1e-4):
    for name in ("v_star", "k_cur", "v_cur"):
        va, vb = getattr(a.vectors, name), getattr(b.vectors, name)
        assert float((va - vb).norm() / va.norm()) < tol, name
    assert float((a.delta_w - b.delta_w).norm() / a.delta_w.norm()) < tol
    assert a.diagnostics.denominator == pytest.approx(b.diagnostics.denominator, rel=tol)
    assert a.diagnostics.numerator_norm == pytest.approx(b.diagnostics.numerator_norm, rel=tol)
    assert a.diagnostics.p_target_opt == pytest.approx(b.diagnostics.p_target_opt, rel=tol)
    assert a.diagnostics.opt_steps == b.diagnostics.opt_steps


def stats_for(lm, layers, seed=0):
    """A random well-conditioned second moment per layer (C is data to the solve)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        w = lm.mlp_out(layer).weight
        d_in = w.shape[0] if lm.arch.transposed else w.shape[1]
        x = torch.randn(4 * d_in, d_in, generator=g)
        out[layer] = KeyStats(mom2=x.T @ x / len(x), source="test", source_hash="", layer=layer, n_keys=len(x),
                              shrinkage=0.0, hash=f"test{layer}")
    return out


# ------------------------------------------------------------------ the edit of test_key_stats, test_layer_choice, test_guard

from crome import EditRequest  # noqa: E402  (appended; the imports above are shared)

REQ = EditRequest.create("{} is the capital of", "Paris", "Germany")
