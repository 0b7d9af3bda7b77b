"""Step 2: v*, the value that makes the model say the new target.

As in the ROME reference: a vector δ is added to the output of W at the
subject's last token in every templated prompt ("<prefix>. <prompt> <target
tokens but the last>") and in the KL prompt "{} is a"; Adam minimises

    NLL(target | templated prompts) + kl_factor · KL(p_δ ‖ p_0 on "{} is a")
    + v_weight_decay · ‖δ‖ / ‖v0‖²

with δ clamped to clamp_norm_factor · ‖v0‖, stopping early at loss < 0.05.
v* = v0 + δ, with v0 the output of W at the bare prompt.

``optimise_delta`` holds the loop once; the forward it differentiates through
comes from a *runner*: ``ReferenceRunner`` here (the whole model on the padded
batch, as the reference does), or the fast runner in ``fast.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..hooks import add_at
from ..models import LoadedModel
from .hparams import Hparams
from .request import EditRequest, locate, pad_right, target_ids


@dataclass
class Batch:
    """The optimisation's prompts, token ids only (no padding yet)."""

    sequences: list[list[int]]   # rewriting prompts then KL prompts
    lookup: list[int]            # subject's last token in each sequence
    target: list[int]            # target token ids
    n_rewrite: int               # the first n_rewrite sequences carry the target

    def target_positions(self, i: int) -> list[int]:
        """Positions whose next-token logits predict the target in rewriting prompt i."""
        end = len(self.sequences[i])
        return list(range(end - len(self.target), end))

    def target_reads(self) -> tuple[list[int], list[int], list[int]]:
        """(row, position, target token id) of every target token in every rewriting prompt."""
        reads = [(i, p, self.target[j]) for i in range(self.n_rewrite)
                 for j, p in enumerate(self.target_positions(i))]
        rows, positions, ids = zip(*reads)
        return list(rows), list(positions), list(ids)


def build_batch(lm: LoadedModel, request: EditRequest, templates: list[str], kl_prompts) -> Batch:
    tok = lm.tokenizer
    target = target_ids(tok, request.text(), request.target_new)
    sequences, lookup = [], []
    for template in templates:
        loc = locate(tok, request, template)
        sequences.append(loc.ids + target[:-1])
        lookup.append(loc.subject_last)
    for kl in kl_prompts:
        loc = locate(tok, EditRequest(prompt=kl, subject=request.subject, target_new=request.target_new))
        sequences.append(loc.ids)
        lookup.append(loc.subject_last)
    return Batch(sequences=sequences, lookup=lookup, target=target, n_rewrite=len(templates))


@dataclass
class ValueResult:
    v_star: torch.Tensor
    v0: torch.Tensor
    delta: torch.Tensor
    p_target: float           # mean P(target) over the templated prompts, last step
    steps: int
    losses: list[float] = field(default_factory=list)


class ReferenceRunner:
    """The straightforward forward: the whole model on the right-padded batch, full logits."""

    def __init__(self, lm: LoadedModel, batch: Batch, layer: int):
        self.lm, self.batch, self.layer = lm, batch, layer
        self.ids, self.mask = pad_right(batch.sequences, lm.tokenizer.pad_token_id, lm.device)
        dev = lm.device
        self.rows = torch.arange(len(batch.sequences), device=dev)
        self.lookup = torch.tensor(batch.lookup, device=dev)
        t_rows, t_pos, t_ids = batch.target_reads()
        self.t_rows = torch.tensor(t_rows, device=dev)
        self.t_pos = torch.tensor(t_pos, device=dev)
        self.t_ids = torch.tensor(t_ids, device=dev)

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of each target token [n_targets] and KL-prompt log-dists [n_kl, vocab]."""
        with add_at(self.lm.mlp_out(self.layer), self.rows, self.lookup, delta):
            logits = self.lm.model(input_ids=self.ids, attention_mask=self.mask).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        target_lp = log_probs[self.t_rows, self.t_pos, self.t_ids]
        n = self.batch.n_rewrite
        kl_lp = log_probs[self.rows[n:], self.lookup[n:]]
        return target_lp, kl_lp


def optimise_delta(runner, batch: Batch, v0: torch.Tensor, hp: Hparams) -> ValueResult:
    """The reference optimisation loop, shared by every runner."""
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    n_rw, n_tgt = batch.n_rewrite, len(batch.target)
    kl_init = None
    losses: list[float] = []
    p_target = 0.0
    steps = 0
    for it in range(hp.v_steps):
        steps = it + 1
        opt.zero_grad()
        target_lp, kl_lp = runner(delta)
        nll_each = -target_lp.view(n_rw, n_tgt).sum(1) / n_tgt
        nll = nll_each.mean()
        if kl_init is None:
            kl_init = kl_lp.detach().clone()
        kl = hp.kl_factor * torch.nn.functional.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
        decay = hp.v_weight_decay * (delta.norm() / v0.norm() ** 2)
        loss = nll + kl + decay
        losses.append(loss.item())
        p_target = torch.exp(-nll_each).mean().item()
        if loss < hp.early_stop_loss or it == hp.v_steps - 1:
            break
        loss.backward()
        opt.step()
        max_norm = hp.clamp_norm_factor * v0.norm()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    delta = delta.detach()
    return ValueResult(v_star=v0 + delta, v0=v0, delta=delta, p_target=p_target, steps=steps, losses=losses)


def compute_v_star(lm: LoadedModel, request: EditRequest, layer: int, templates: list[str],
                   v0: torch.Tensor, hp: Hparams, runner_cls=ReferenceRunner) -> ValueResult:
    batch = build_batch(lm, request, templates, hp.kl_prompts)
    return optimise_delta(runner_cls(lm, batch, layer), batch, v0.detach(), hp)
