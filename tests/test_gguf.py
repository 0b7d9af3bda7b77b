"""GGUF files: a tiny Llama written by the ``gguf`` package loads with the source's logits, a changed
file is converted again, and a missing or broken file is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model

from crome.errors import CromeError


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's layout of q/k rows (its converter permutes them; loaders undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path) -> None:
    """A tiny Llama written as an F32 GGUF by the ``gguf`` package, with the default model's tokenizer."""
    import gguf

    from crome.models import default_gguf_path

    cfg = model.config
    src = gguf.GGUFReader(default_gguf_path())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model(src.fields["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(src.fields["tokenizer.ggml.pre"].contents())
    w.add_token_list(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    for key in ("bos", "eos", "unknown", "padding"):
        value = src.fields[f"tokenizer.ggml.{key}_token_id"].contents()
        getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unknown": "add_unk_token_id",
                    "padding": "add_pad_token_id"}[key])(value)
    w.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = _permute(t, cfg.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        w.add_tensor(gg, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_with_the_source_logits_and_a_changed_file_reconverts(tokenizer, tmp_path, monkeypatch):
    from crome.models import load_model

    monkeypatch.setenv("CROME_CACHE_DIR", str(tmp_path / "cache"))
    src = tiny_model("llama", tokenizer, seed=3)
    src.model.lm_head.weight = torch.nn.Parameter(src.model.lm_head.weight.detach().clone())  # untied
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(src.model, path)
    ids = torch.tensor([tokenizer("The capital of France is Paris")["input_ids"]])
    lm = load_model(str(path), device="cpu", progress=False)
    assert lm.name == "tiny" and lm.arch.mlp_out == "model.layers.{}.mlp.down_proj"
    torch.testing.assert_close(lm.model(input_ids=ids).logits, src.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    folders = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert len(folders) == 1
    assert load_model(str(path), device="cpu", progress=False).identity == lm.identity  # cached, same weights
    import shutil

    copy = shutil.copy(path, tmp_path / "other-name.gguf")        # the same bytes under another name: one entry
    same = load_model(str(copy), device="cpu", progress=False)
    assert same.name == "other-name" and same.identity == lm.identity
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == folders

    with torch.no_grad():
        src.model.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    write_llama_gguf(src.model, path)  # same name, new content
    changed = load_model(str(path), device="cpu", progress=False)
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2
    assert changed.identity != lm.identity
    torch.testing.assert_close(changed.model(input_ids=ids).logits, src.model(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-4)

    # end to end through the CLI: --model x.gguf, the auto layer (a random model knows no facts:
    # the depth rule, recorded), key statistics sampled from the model, the verifying guard (its probe;
    # whether a random model's edit takes is not this test's question: --no-guard-efficacy)
    from crome.cli import main

    res = CliRunner().invoke(main, ["edit", "--model", str(path), "--prompt", "{} is the capital of", "--subject",
                                    "Paris", "--target", "Germany", "--layer", "auto", "--mom2-samples", "300",
                                    "--guard-threshold", "1e9", "--no-guard-efficacy", "--json", "--no-ppl"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout[res.stdout.index("{"):])
    assert data["model"] == "tiny" and data["layer"] == 1 and data["layer_choice"]["rule"] == "depth"
    assert data["key_stats"]["n_keys"] == 300 and data["guard_action"] == "applied" and data["applied"]


def test_missing_gguf_file_is_a_one_line_error(tmp_path):
    from crome.models import load_model

    with pytest.raises(CromeError, match="no such GGUF file"):
        load_model(str(tmp_path / "nothing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CromeError, match="is not a GGUF file"):      # the header check, before any parser
        load_model(str(bad), progress=False)
    import struct

    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + b"\0" * 64)   # a well-formed header, no model
    with pytest.raises(CromeError, match="cannot convert GGUF file"):
        load_model(str(bad), progress=False)
