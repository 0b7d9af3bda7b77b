"""Locate: causal tracing, ROME's step that finds where a fact is recalled (Meng et al. 2022 §2).

For a known fact: run the prompt clean, then with Gaussian noise added to the subject's
token embeddings (3 × the embeddings' standard deviation, seeded), and then corrupted
again but with one activation restored to its clean value. The indirect effect of that
activation is P(answer | restored) − P(answer | corrupted). Activations, addressed by
kind, layer and token position:

* ``hidden``: the output of transformer block L (the residual stream);
* ``mlp``: the MLP output of blocks L−w/2 … L+w/2−1 (ROME's window, w = 10);
* ``attn``: the attention output, same window.

All restorations of one fact run in a few batched forward passes (one row per
(kind, layer, position)). Positions are reported in ROME's six groups: first, middle
and last subject token, first subsequent token, further tokens, last token.
``layer_choice`` picks the edited layer from these effects; ``crome.analysis.trace_plot``
plots them.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from ..hooks import forward_hook, record, widen
from ..models import LoadedModel
from ..request import EditRequest, locate, target_ids

KINDS = ("hidden", "mlp", "attn")
GROUPS = ("first subject token", "middle subject tokens", "last subject token",
          "first subsequent token", "further tokens", "last token")


@dataclass
class Trace:
    prompt: str
    subject: str
    answer: str
    p_clean: float
    p_corrupted: float
    groups: list[str]              # the position group of each token
    effects: dict[str, list]       # kind -> [layer][position] indirect effect
    subject_last: int = -1         # position of the subject's last token


def _modules(lm: LoadedModel, kind: str) -> list[torch.nn.Module]:
    name = {"hidden": lm.arch.layer_name, "mlp": lm.arch.mlp_out_name, "attn": lm.arch.attn_out_name}[kind]
    return [lm.module(name(i)) for i in range(lm.num_layers)]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _replace(module: torch.nn.Module, rows: torch.Tensor, positions: torch.Tensor, clean: torch.Tensor):
    """Put the clean activation back at (rows[i], positions[i])."""
    def hook(_m, _a, output):
        out = _first(output).clone()
        out[rows, positions] = clean[positions].to(out.dtype)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    with forward_hook(module, hook):
        yield


@contextmanager
def _noise(lm: LoadedModel, first: int, last: int, noise: torch.Tensor):
    """Add ``noise`` ([n_subject_tokens, d]) to the subject's embeddings in every row."""
    def hook(_m, _a, output):
        out = output.clone()
        out[:, first:last + 1] += noise.to(out.dtype)
        return out

    with forward_hook(lm.model.get_input_embeddings(), hook):
        yield


def position_groups(n_tokens: int, first: int, last: int) -> list[str]:
    groups = []
    for i in range(n_tokens):
        if i == n_tokens - 1:
            groups.append(GROUPS[5])
        elif i == first:
            groups.append(GROUPS[0])
        elif i == last:
            groups.append(GROUPS[2])
        elif first < i < last:
            groups.append(GROUPS[1])
        elif i == last + 1:
            groups.append(GROUPS[3])
        else:
            groups.append(GROUPS[4])
    return groups


@torch.no_grad()
def embedding_std(lm: LoadedModel, ids: torch.Tensor) -> float:
    """Standard deviation of the embeddings as the model sees them: the table's, times the
    scale the embedding module applies (Gemma multiplies by √d), measured on ``ids``."""
    module = lm.model.get_input_embeddings()
    table = widen(module.weight[ids[0]])
    scale = float(widen(module(ids)[0]).norm() / table.norm())
    return float(widen(module.weight).std()) * scale


@torch.no_grad()
def trace_fact(lm: LoadedModel, prompt: str, subject: str, answer: str, seed: int = 0,
               noise_scale: float = 3.0, window: int = 10, batch_size: int = 128,
               kinds: tuple[str, ...] = KINDS, last_subject_only: bool = False, first_layer: int = 0) -> Trace:
    """Indirect effects of every (kind, layer, position); with ``last_subject_only`` only the
    subject's last token is restored (the other positions' effects stay 0). Windows of MLP and
    attention layers start at ``first_layer`` at the lowest."""
    req = EditRequest.create(prompt, subject, answer)
    loc = locate(lm.tokenizer, req)
    ids = torch.tensor([loc.ids], device=lm.device)
    answer_id = target_ids(lm.tokenizer, req.text(), answer)[0]
    n, L = len(loc.ids), lm.num_layers
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.randn(loc.subject_last - loc.subject_first + 1, lm.model.get_input_embeddings().weight.shape[1],
                         generator=gen) * noise_scale * embedding_std(lm, ids)).to(lm.device)

    def p_answer(input_ids):
        logits = widen(lm.model(input_ids=input_ids).logits[:, -1])
        return torch.softmax(logits, -1)[:, answer_id]

    clean = {}
    with ExitStack() as stack:
        recs = {(k, i): stack.enter_context(record(m)) for k in kinds for i, m in enumerate(_modules(lm, k))}
        p_clean = float(p_answer(ids)[0])
    for key, rec in recs.items():
        clean[key] = _first(rec.output)[0].detach()
    with _noise(lm, loc.subject_first, loc.subject_last, noise):
        p_corrupt = float(p_answer(ids)[0])

    # one row per (kind, layer, position): which (module, position) it restores
    positions = [loc.subject_last] if last_subject_only else range(n)
    plan = [(k, layer, pos) for k in kinds for layer in range(L) for pos in positions]
    effects = {k: [[0.0] * n for _ in range(L)] for k in kinds}
    modules = {k: _modules(lm, k) for k in kinds}
    for start in range(0, len(plan), batch_size):
        chunk = plan[start:start + batch_size]
        restore: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for row, (k, layer, pos) in enumerate(chunk):
            span = [layer] if k == "hidden" else range(max(first_layer, layer - window // 2),
                                                       min(L, layer - window // 2 + window))
            for j in span:
                restore.setdefault((k, j), []).append((row, pos))
        with ExitStack() as stack:
            stack.enter_context(_noise(lm, loc.subject_first, loc.subject_last, noise))
            for (k, j), pairs in restore.items():
                rows = torch.tensor([r for r, _ in pairs], device=lm.device)
                pos = torch.tensor([p for _, p in pairs], device=lm.device)
                stack.enter_context(_replace(modules[k][j], rows, pos, clean[(k, j)]))
            p = p_answer(ids.expand(len(chunk), -1)).tolist()
        for (k, layer, pos), value in zip(chunk, p):
            effects[k][layer][pos] = value - p_corrupt
    return Trace(prompt=req.text(), subject=subject, answer=answer, p_clean=p_clean, p_corrupted=p_corrupt,
                 groups=position_groups(n, loc.subject_first, loc.subject_last), effects=effects,
                 subject_last=loc.subject_last)


def by_group(trace: Trace) -> dict[str, list[list[float]]]:
    """kind -> [group][layer]: the mean indirect effect over the positions of each group."""
    out = {}
    for kind, grid in trace.effects.items():
        rows = []
        for g in GROUPS:
            cols = [i for i, gi in enumerate(trace.groups) if gi == g]
            rows.append([sum(grid[layer][i] for i in cols) / len(cols) if cols else float("nan")
                         for layer in range(len(grid))])
        out[kind] = rows
    return out
