"""Bad input: one-line errors, weights untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner
from conftest import TEMPLATES

from crome import CromeError, EditRequest, apply_edit, compute_edit
from crome.cli import main
from crome.editing.hparams import Hparams

HP = Hparams(mom2_adjustment=False, layer=1, v_steps=3)


def snapshot(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def unchanged(lm, before):
    return all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("args, message", [
    (("Paris is the capital of", "London", "Germany"), "not in prompt"),
    (("Paris is the capital of", "paris", "Germany"), "not in prompt"),
    (("{} is the capital of", "Paris", ""), "empty target"),
    (("{} is the capital of", "Paris", "   "), "empty target"),
    (("{} is the capital of", "", "Germany"), "empty subject"),
    (("{} and {}", "Paris", "Germany"), "slots"),
])
def test_bad_requests(args, message):
    with pytest.raises(CromeError, match=message):
        EditRequest.create(*args)


def test_flat_prompt_with_literal_subject():
    r = EditRequest.create("Paris is the capital of", "Paris", "Germany", "France")
    assert r.prompt == "{} is the capital of" and r.text() == "Paris is the capital of"


def test_layer_out_of_range_and_unknown_method(tiny):
    before = snapshot(tiny)
    req = EditRequest.create("{} is the capital of", "Paris", "Germany")
    with pytest.raises(CromeError, match="layer 7 out of range"):
        compute_edit(tiny, req, "rome", hparams=HP.with_(layer=7), templates=TEMPLATES)
    with pytest.raises(CromeError, match="unknown method 'memit'"):
        compute_edit(tiny, req, "memit", hparams=HP, templates=TEMPLATES)
    with pytest.raises(CromeError, match="mom2 adjustment is off"):
        compute_edit(tiny, req, "rome", hparams=HP, templates=TEMPLATES, mom2=torch.eye(64))
    assert unchanged(tiny, before)


def test_nan_update_is_never_applied(tiny):
    req = EditRequest.create("{} is the capital of", "Paris", "Germany")
    edit = compute_edit(tiny, req, "rome", hparams=HP, templates=TEMPLATES)
    before = snapshot(tiny)
    bad = edit.delta_w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(CromeError, match="non-finite update"):
        apply_edit(tiny, dataclasses.replace(edit, delta_w=bad))
    assert unchanged(tiny, before)


def test_nan_from_a_zero_denominator_is_flagged(tiny):
    """A degenerate key (all zeros) gives 0/0: the diagnostics say not finite, apply refuses."""
    req = EditRequest.create("{} is the capital of", "Paris", "Germany")
    mod = tiny.mlp_out(1)
    h = mod.register_forward_pre_hook(lambda m, a: (torch.zeros_like(a[0]),))
    try:
        edit = compute_edit(tiny, req, "rome", hparams=HP, templates=TEMPLATES)
    finally:
        h.remove()
    assert not edit.diagnostics.finite
    before = snapshot(tiny)
    with pytest.raises(CromeError, match="non-finite"):
        apply_edit(tiny, edit)
    assert unchanged(tiny, before)


def test_unknown_architecture(tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from crome.models import from_modules

    cfg = AutoConfig.for_model("opt", num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                               vocab_size=100, word_embed_proj_dim=16)
    with pytest.raises(CromeError, match="unsupported architecture 'opt'.*gpt2.*llama"):
        from_modules(AutoModelForCausalLM.from_config(cfg), tokenizer)


def test_unknown_model_is_one_line(tmp_path):
    from crome import load_model

    with pytest.raises(CromeError, match="cannot load model") as info:
        load_model(str(tmp_path / "no-such-model"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv, message", [
    (["edit", "--prompt", "Paris is the capital of", "--subject", "London", "--target", "Germany"], "not in prompt"),
    (["edit", "--prompt", "{} is the capital of", "--subject", "Paris", "--target", ""], "empty target"),
    (["edit", "--prompt", "{} is", "--subject", "Paris", "--target", "x", "--model", "/no/such/model", "--no-ppl"], "cannot load model"),
    (["edit", "--prompt", "{} is", "--subject", "Paris", "--target", "x", "--ppl-data", "/no/such.json"], "text file not found"),
])
def test_cli_errors_are_one_line_exit_2(argv, message):
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_hub_id_without_network_is_one_line_on_stderr(tmp_path):
    """A Hugging Face id that can't be fetched: crome's one line, none of the hub's retry warnings."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    code = "from crome.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", code, "edit", "--prompt", "{} is", "--subject", "Paris", "--target", "x",
                          "--model", "someone/no-such-model-crome-test", "--no-ppl"],
                         capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot load model 'someone/no-such-model-crome-test'")


def test_output_path_and_guard_flags_are_checked_before_loading(tmp_path):
    (tmp_path / "dir").mkdir()
    res = CliRunner().invoke(main, ["eval", "--data", "/no/such/data.json", "--out", str(tmp_path / "dir")])
    assert res.exit_code == 2 and "output path is a folder" in res.output
    res = CliRunner().invoke(main, ["edit", "--prompt", "{} is", "--subject", "Paris", "--target", "x", "--no-mom2",
                                    "--mom2-corpus", "c.txt"])
    assert res.exit_code == 2 and "contradict" in res.output
    res = CliRunner().invoke(main, ["edit", "--prompt", "{} is", "--subject", "Paris", "--target", "x",
                                    "--layer", "middle", "--no-ppl", "--model", "/no/such/model"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
