"""Step 2: v*, the value that makes the model say the new target.

As in the ROME reference: a vector δ is added to the output of W at the
subject's last token in every templated prompt ("<prefix>. <prompt> <target
tokens but the last>") and in the KL prompt "{} is a"; Adam minimises

    NLL(target | templated prompts) + kl_factor · KL(p_δ ‖ p_0 on "{} is a")
    + v_weight_decay · ‖δ‖ / ‖v0‖²

with δ clamped to clamp_norm_factor · ‖v0‖, stopping early at loss < 0.05 or, with MPES
(``Hparams.mpes``, ENCORE's "most-probable early stopping"), once the target is the most
probable token at every target position of every rewriting prompt.
v* = v0 + δ, with v0 the output of W at the bare prompt.

``optimise_delta`` holds the loop once; the forward it differentiates through
comes from a *runner*: ``ReferenceRunner`` here (the whole model on the padded
batch, as the reference does), or the fast runner in ``fast.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..hooks import add_at, widen
from ..models import LoadedModel
from ..request import EditRequest, locate, pad_right, target_ids
from .hparams import Hparams


@dataclass
class Batch:
    """The optimisation's prompts for one or more edits, token ids only (no padding yet).

    Rows are every edit's rewriting prompts (edit 0's, then edit 1's, ...), then every edit's
    KL prompts in the same order; one edit is the case K = 1."""

    sequences: list[list[int]]   # rewriting prompts, then KL prompts
    lookup: list[int]            # subject's last token in each sequence
    targets: list[list[int]]     # target token ids, per edit
    rewrite: list[int]           # rewriting prompts per edit
    kl: list[int]                # KL prompts per edit

    @property
    def n_rewrite(self) -> int:
        return sum(self.rewrite)

    @property
    def edits(self) -> int:
        return len(self.targets)

    def owners(self) -> list[int]:
        """The edit each row belongs to."""
        return ([e for e, n in enumerate(self.rewrite) for _ in range(n)]
                + [e for e, n in enumerate(self.kl) for _ in range(n)])

    def target_reads(self) -> tuple[list[int], list[int], list[int]]:
        """(row, position, target token id) of every target token in every rewriting prompt,
        edit by edit: edit e's are ``rewrite[e] · len(targets[e])`` consecutive reads."""
        reads, row = [], 0
        for target, n in zip(self.targets, self.rewrite):
            for i in range(row, row + n):
                end = len(self.sequences[i])
                reads += [(i, end - len(target) + j, t) for j, t in enumerate(target)]
            row += n
        rows, positions, ids = zip(*reads)
        return list(rows), list(positions), list(ids)

    @classmethod
    def stack(cls, batches: list["Batch"]) -> "Batch":
        """Several edits' batches as one."""
        def rows(b, kl):
            lo, hi = (b.n_rewrite, len(b.sequences)) if kl else (0, b.n_rewrite)
            return b.sequences[lo:hi], b.lookup[lo:hi]
        seq, look = [], []
        for kl in (False, True):
            for b in batches:
                s, lk = rows(b, kl)
                seq += s
                look += lk
        return cls(sequences=seq, lookup=look, targets=[t for b in batches for t in b.targets],
                   rewrite=[n for b in batches for n in b.rewrite], kl=[n for b in batches for n in b.kl])


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
    return Batch(sequences=sequences, lookup=lookup, targets=[target], rewrite=[len(templates)],
                 kl=[len(kl_prompts)])


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

    def __init__(self, lm: LoadedModel, batch: Batch, layer: int, site: torch.nn.Module | None = None):
        self.lm, self.batch, self.layer = lm, batch, layer
        self.site = site if site is not None else lm.mlp_out(layer)   # δ is added to its output
        self.ids, self.mask = pad_right(batch.sequences, lm.tokenizer.pad_token_id, lm.device)
        dev = lm.device
        self.rows = torch.arange(len(batch.sequences), device=dev)
        self.lookup = torch.tensor(batch.lookup, device=dev)
        t_rows, t_pos, t_ids = batch.target_reads()
        self.t_rows = torch.tensor(t_rows, device=dev)
        self.t_pos = torch.tensor(t_pos, device=dev)
        self.t_ids = torch.tensor(t_ids, device=dev)

    def __call__(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs of each target token [n_targets], KL-prompt log-dists [n_kl, vocab], and the
        largest log-prob at each target token's position [n_targets] (MPES: is the target on top?)."""
        with add_at(self.site, self.rows, self.lookup, delta):
            logits = self.lm.model(input_ids=self.ids, attention_mask=self.mask).logits
        log_probs = torch.log_softmax(widen(logits), dim=-1)
        at_targets = log_probs[self.t_rows, self.t_pos]
        target_lp = at_targets[torch.arange(len(self.t_ids), device=at_targets.device), self.t_ids]
        n = self.batch.n_rewrite
        kl_lp = log_probs[self.rows[n:], self.lookup[n:]]
        return target_lp, kl_lp, at_targets.detach().max(-1).values


def optimise_delta(runner, batch: Batch, v0: torch.Tensor, hp: Hparams) -> list[ValueResult]:
    """The reference optimisation loop, shared by every runner, for the batch's K edits at once.

    ``v0``: [K, d]. Each edit has its own δ (a row of one [K, d] tensor), loss, KL reference,
    weight decay, clamp and early stop; Adam is elementwise, so optimising the rows together
    is K separate optimisations. The loss summed over the edits still running gives each δ its
    own gradient (rows never see another edit's δ); an edit that has stopped keeps its δ."""
    k_edits = batch.edits
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    owners = torch.tensor(batch.owners(), device=v0.device)
    reads = [n * len(t) for n, t in zip(batch.rewrite, batch.targets)]
    read_at = [sum(reads[:e]) for e in range(k_edits)]
    kl_at = [sum(batch.kl[:e]) for e in range(k_edits)]
    kl_init: list[torch.Tensor | None] = [None] * k_edits
    losses: list[list[float]] = [[] for _ in range(k_edits)]
    p_target, steps = [0.0] * k_edits, [0] * k_edits
    running = list(range(k_edits))
    final: dict[int, torch.Tensor] = {}   # the δ of each edit that has stopped
    for it in range(hp.v_steps):
        opt.zero_grad()
        # one edit: δ broadcast over the rows, exactly as the single-edit reference adds it
        target_lp, kl_lp, top_lp = runner(delta[0] if k_edits == 1 else delta[owners])
        still = []
        for e in running:
            steps[e] = it + 1
            n_rw, n_tgt = batch.rewrite[e], len(batch.targets[e])
            nll_each = -target_lp[read_at[e]:read_at[e] + reads[e]].view(n_rw, n_tgt).sum(1) / n_tgt
            nll = nll_each.mean()
            kl_e = kl_lp[kl_at[e]:kl_at[e] + batch.kl[e]]
            if kl_init[e] is None:
                kl_init[e] = kl_e.detach().clone()
            kl = hp.kl_factor * torch.nn.functional.kl_div(kl_init[e], kl_e, log_target=True, reduction="batchmean")
            decay = hp.v_weight_decay * (delta[e].norm() / v0[e].norm() ** 2)
            loss = nll + kl + decay
            losses[e].append(loss.item())
            p_target[e] = torch.exp(-nll_each).mean().item()
            reads_e = slice(read_at[e], read_at[e] + reads[e])
            on_top = hp.mpes and bool((target_lp[reads_e].detach() >= top_lp[reads_e]).all())
            if not (loss < hp.early_stop_loss or on_top or it == hp.v_steps - 1):
                still.append((e, loss))
        if not still:
            break
        running = [e for e, _ in still]
        for e in set(range(k_edits)) - set(running) - set(final):
            final[e] = delta.detach()[e].clone()
        sum(loss for _, loss in still).backward()
        opt.step()
        with torch.no_grad():
            for e, value in final.items():
                delta[e] = value   # Adam's momentum would still move a stopped edit's δ
            for e in running:
                max_norm = hp.clamp_norm_factor * v0[e].norm()
                if delta[e].norm() > max_norm:
                    delta[e].mul_(max_norm / delta[e].norm())
    delta = delta.detach()
    return [ValueResult(v_star=v0[e] + delta[e], v0=v0[e], delta=delta[e].clone(), p_target=p_target[e],
                        steps=steps[e], losses=losses[e]) for e in range(k_edits)]


# The most edits whose v* are optimised in one batch. Memory grows with them (the backward keeps
# every row's activations): 100 MEMIT requests at once took 19.7 GB on the default model, more than
# a 23 GB machine can spare. The edits are independent, so larger batches go in chunks of this many.
V_STAR_CHUNK = 8


def compute_v_stars(lm: LoadedModel, requests: list[EditRequest], layer: int, templates: list[str],
                    v0: list[torch.Tensor], hp: Hparams, runner_cls=ReferenceRunner,
                    site: torch.nn.Module | None = None) -> list[ValueResult]:
    """v* of several edits at one layer, optimised together (one batched forward per step), up to
    ``V_STAR_CHUNK`` at a time. ``site``: the module of layer ``layer`` whose output δ is added to
    (default: W, ROME's; MEMIT adds it to the layer's output, the residual stream)."""
    out = []
    for start in range(0, len(requests), V_STAR_CHUNK):
        chunk = requests[start:start + V_STAR_CHUNK]
        batch = Batch.stack([build_batch(lm, r, templates, hp.kl_prompts) for r in chunk])
        values = torch.stack([v.detach() for v in v0[start:start + V_STAR_CHUNK]])
        out += optimise_delta(runner_cls(lm, batch, layer, site), batch, values, hp)
    return out
