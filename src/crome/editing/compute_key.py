"""Step 1: the key k and the current value v at the subject's last token.

k is the input of the MLP output projection W at the edited layer, v = W k (+ b)
its output. ROME needs them twice over:

* ``k_bare`` / ``v_bare``: the bare, unprefixed prompt (the paper's k^u);
* ``k_mean`` / ``v_mean``: the mean over all context templates (the paper's k̄).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks import record, run_until, widen
from ..models import LoadedModel
from ..request import SLOT, EditRequest, locate, pad_right


@dataclass
class Keys:
    k_bare: torch.Tensor
    v_bare: torch.Tensor
    k_mean: torch.Tensor
    v_mean: torch.Tensor
    keys: torch.Tensor      # [n_templates, d_in], one key per template
    values: torch.Tensor    # [n_templates, d_out]
    first_token_subject: bool
    key_outlier_ratio: float  # ‖k^u‖ / median ‖k‖ over the prefixed templates (1.0 without any)


@torch.no_grad()
def keys_at(lm: LoadedModel, request: EditRequest, layer: int,
            templates: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value of W at the subject's last token, one row per template."""
    located = [locate(lm.tokenizer, request, t) for t in templates]
    ids, mask = pad_right([x.ids for x in located], lm.tokenizer.pad_token_id, lm.device)
    rec = run_until(lm.model, lm.mlp_out(layer), input_ids=ids, attention_mask=mask)
    rows = torch.arange(len(located), device=lm.device)
    pos = torch.tensor([x.subject_last for x in located], device=lm.device)
    return widen(rec.input[rows, pos]), widen(rec.output[rows, pos])


@torch.no_grad()
def key_and_output(lm: LoadedModel, request: EditRequest, layer: int, out_layer: int,
                   templates: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """W's key at ``layer`` and the residual stream after layer ``out_layer`` (≥ ``layer``), at the
    subject's last token, one row per template: what MEMIT's solve and residual read."""
    located = [locate(lm.tokenizer, request, t) for t in templates]
    ids, mask = pad_right([x.ids for x in located], lm.tokenizer.pad_token_id, lm.device)
    with record(lm.mlp_out(layer)) as key:
        out = run_until(lm.model, lm.module(lm.arch.layer_name(out_layer)), input_ids=ids, attention_mask=mask)
    rows = torch.arange(len(located), device=lm.device)
    pos = torch.tensor([x.subject_last for x in located], device=lm.device)
    return widen(key.input[rows, pos]), widen(out.output[rows, pos])


def outlier_ratio(k_bare: torch.Tensor, prefixed: torch.Tensor) -> float:
    """How far the bare prompt's key sits from the prefixed ones: ‖k^u‖ / median ‖k‖ of the
    prefixed keys. Far from 1 either way, the first position's key is an outlier: an
    "attention sink" massive activation (≫ 1), or ROME's near-zero denominator (≪ 1)."""
    if len(prefixed) == 0:
        return 1.0
    return float(k_bare.norm() / prefixed.norm(dim=1).median())


def compute_keys(lm: LoadedModel, request: EditRequest, layer: int, templates: list[str]) -> Keys:
    keys, values = keys_at(lm, request, layer, [SLOT, *templates])
    prefixed = torch.tensor([t != SLOT for t in templates], device=keys.device)
    return Keys(
        k_bare=keys[0], v_bare=values[0],
        k_mean=keys[1:].mean(0), v_mean=values[1:].mean(0),
        keys=keys[1:], values=values[1:],
        first_token_subject=locate(lm.tokenizer, request).subject_is_first,
        key_outlier_ratio=outlier_ratio(keys[0], keys[1:][prefixed]),
    )
