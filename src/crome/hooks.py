"""Forward hooks on named modules, TransformerLens style.

Activations are addressed by module (layer) and token position:

* ``record(module)`` keeps the module's input and output of the last call;
* ``add_at(module, rows, positions, delta)`` adds ``delta`` to the module's
  output at ``(rows[i], positions[i])``;
* ``rank_one(module, u, lam)`` turns row b's output ``y = W x`` into
  ``y + (u[b] · x) lam[b]``: the output of ``W + lam[b] u[b]ᵀ``, a rank-one edit
  per row, without touching ``W`` (a zero row leaves that row unedited);
* ``run_until(model, module)`` ends the forward pass once the module has run, for
  passes that only need activations up to the edited layer;
* ``short_circuit(modules, output)`` makes modules return a recorded output without computing,
  for passes that only need the layers above an edit.

Each is a ``forward_hook``: registered on entry, removed on exit, however the block ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early."""


@contextmanager
def forward_hook(module: torch.nn.Module, hook):
    """``hook(module, args, output)`` runs after every forward of ``module`` inside the block
    (its return value, when not None, replaces the output)."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Recording:
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


@contextmanager
def record(module: torch.nn.Module, stop: bool = False):
    """Record the (first positional) input and the output of ``module``."""
    rec = Recording()

    def hook(_mod, args, output):
        rec.input, rec.output = args[0], output
        if stop:
            raise StopForward

    with forward_hook(module, hook):
        yield rec


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or as it is when wider (float64): the precision crome edits and measures in.
    A float32 tensor is returned as it is, a bfloat16 or float16 one cast."""
    return t if t.dtype == torch.float64 else t.float()


@contextmanager
def add_at(module: torch.nn.Module, rows: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor):
    """Add ``delta`` to the output of ``module`` at the given (row, position) pairs
    (``delta`` may be float32 on a bfloat16 model: the sum is taken in float32, then cast)."""

    def hook(_mod, _args, output):
        output = output.clone()
        output[rows, positions] = (output[rows, positions] + delta).to(output.dtype)
        return output

    with forward_hook(module, hook):
        yield


@contextmanager
def rank_one(module: torch.nn.Module, u: torch.Tensor, lam: torch.Tensor):
    """Row b of every batch through ``module`` sees the weights W + lam[b] u[b]ᵀ
    (``u``: [batch, d_in], ``lam``: [batch, d_out]; float32 (or float64) sums, cast back to the output's dtype)."""

    def hook(_mod, args, output):
        x = args[0]
        scale = torch.einsum("btd,bd->bt", widen(x), u)
        return (widen(output) + scale[..., None] * lam[:, None, :]).to(output.dtype)

    with forward_hook(module, hook):
        yield


def run_until(model: torch.nn.Module, module: torch.nn.Module, **inputs) -> Recording:
    """Run ``model`` only as far as ``module`` and return what it saw and produced."""
    with record(module, stop=True) as rec:
        try:
            model(**inputs)
        except StopForward:
            pass
    return rec


@contextmanager
def short_circuit(modules: list[torch.nn.Module], output):
    """Make ``modules`` return ``output`` without computing anything (a layer below an edit whose
    output was recorded once)."""
    for module in modules:
        module.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def repeat_output(output, n: int):
    """A module's recorded output for n copies of its batch (a tensor, or a tuple led by one)."""
    if output is None or n == 1:
        return output
    if isinstance(output, tuple):
        return (output[0].repeat(n, *[1] * (output[0].dim() - 1)),) + output[1:]
    return output.repeat(n, *[1] * (output.dim() - 1))
