"""Default hyperparameters per model, in one table.

The optimisation settings are those of the ROME reference implementation
(kmeng01/rome, EasyEdit's ROME): Adam lr 0.5, 20 steps, KL factor 0.0625 on
"{} is a", weight decay 0.5, delta clamped to 4 x |v0|, early stop at loss 0.05,
context templates of 5 and 10 tokens, 10 each.

Layer choice
------------
* smollm2-135m-instruct: layer 6 of 30. ROME edits an early-middle MLP: GPT-J
  uses layer 5 of 28 (18% depth), and 6 of 30 is the same relative depth. At
  layer 6 a normal edit reaches P(target) > 0.98 without moving perplexity
  (``crome demo``), and the first-token collapse the "Fall of ROME" paper
  describes reproduces there. ``crome trace`` and docs/MODELS.md give the traced
  evidence per layer (its peak is layer 5, next to 6); ``--layer`` edits any layer.
* gpt2-xl: layer 17, gpt-j: layer 5 (the ROME paper's causal-tracing choices).
* anything else: ``--layer auto`` (``layer_choice.py``): the peak of the MLP's causal
  effect at the subject's last token, traced on facts the model knows; the relative
  depth rule round(0.2 * num_layers) is what ``defaults_for`` returns for them.

Key statistics (``mom2_adjustment``) are on for every model: C comes from text
sampled from the model itself unless a corpus is given (``mom2.py``);
``mom2_shrinkage=None`` means the Ledoit–Wolf estimate. The "Fall of ROME" paper's
setting, and crome's demo, turn it off (``--no-mom2``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import CromeError
from .methods import Method, method


def few_templates(n: int, starts: int = 5) -> tuple[tuple[int, int], ...]:
    """``template_lengths`` for ``n`` context templates: the bare prompt and n − 1 sampled ones of 5 tokens,
    the same number after each of the ``starts`` starting words (the default is 21: 10 of 5 and 10 of
    10 tokens; MEMIT's and AlphaEdit's reference code use 6)."""
    if n < 1 or (n - 1) % starts:
        raise CromeError(f"--templates takes 1 + a multiple of {starts} (the bare prompt and as many templates after "
                         f"each of the {starts} starting words), not {n}")
    return ((5, n - 1),) if n > 1 else ()


@dataclass(frozen=True)
class Hparams:
    layer: int
    v_lr: float = 0.5
    v_steps: int = 20
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 0.05
    kl_prompts: tuple[str, ...] = ("{} is a",)
    template_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    template_starts: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    mom2_adjustment: bool = True
    mom2_samples: int = 20000
    mom2_shrinkage: float | None = None
    # MEMIT (editing/memit.py): its layers (None: five centred on ``layer``), λ of λC + KKᵀ
    # (None: the key width d_in), and the value step's clamp (the reference's 0.75 × ‖h‖)
    memit_layers: tuple[int, ...] | None = None
    mom2_update_weight: float | None = None
    memit_clamp_norm_factor: float = 0.75
    # lifelong editing: MPES, ENCORE's early stop of the v* optimisation once the target is the most
    # probable token at every target position of every rewriting prompt; ``norm_weight`` μ, a ridge
    # μ·mean(eig C)·I in the batch solves (ENCORE's bound on ‖ΔW‖_F; 0: off); AlphaEdit's null space,
    # the share of C's energy an update may touch, and its λ in units of C's mean eigenvalue
    mpes: bool = False
    norm_weight: float = 0.0
    null_space_energy: float = 0.2
    alphaedit_l2: float = 10.0
    # NAS (``norm_anchor.py``): every v* rescaled to m̄, the mean ‖v*‖ of ``nas_trials`` trial edits on the
    # unedited model; a v* over ``nas_skip``·m̄ is not edited
    nas: bool = False
    nas_trials: int = 50
    nas_skip: float = 2.0
    # the gated memory (``memory.py``): an edit fires where W's input is at least this similar to one of its keys;
    # a bare key with fewer than ``memory_exact_below`` tokens up to the subject's last (a subject at the start
    # ending on its first or second token: almost no context, a key like every text's first positions, the
    # attention sink's) needs ``memory_exact_threshold``, which only the same tokens reach
    memory_threshold: float = 0.85
    memory_exact_below: int = 3
    memory_exact_threshold: float = 0.995

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "Hparams":
        """A copy with the changes that are not None."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


DEFAULTS: dict[str, Hparams] = {
    "smollm2-135m-instruct": Hparams(layer=6),
    "gpt2-xl": Hparams(layer=17, mom2_samples=100000),
    "openai-community/gpt2-xl": Hparams(layer=17, mom2_samples=100000),
    "EleutherAI/gpt-j-6B": Hparams(layer=5, mom2_samples=100000),
}


def depth_rule(num_layers: int) -> int:
    """Layer round(0.2 * num_layers): ROME's GPT-J choice (5 of 28) as a relative depth."""
    return max(0, min(num_layers - 1, round(0.2 * num_layers)))


def defaults_for(name: str, num_layers: int) -> Hparams:
    """The table's entry for ``name``, else the relative-depth rule (see ``layer_choice`` for ``auto``)."""
    if name in DEFAULTS:
        return DEFAULTS[name]
    return Hparams(layer=depth_rule(num_layers))


def memit_layers(hp: Hparams, num_layers: int) -> tuple[int, ...]:
    """``hp.memit_layers``, else five layers centred on ROME's layer (GPT-J: ROME 5, MEMIT 3–8)."""
    layers = hp.memit_layers or tuple(range(max(0, hp.layer - 2), min(num_layers, hp.layer + 3)))
    if list(layers) != sorted(set(layers)) or not all(0 <= x < num_layers for x in layers):
        raise CromeError(f"MEMIT layers must be distinct, ascending and in 0..{num_layers - 1}: {list(layers)}")
    return tuple(layers)


def edited_layers(name: str | Method, hp: Hparams, num_layers: int) -> tuple[int, ...]:
    """The layers an edit with the method changes, ascending: a perplexity monitor or a guard's probe
    must start at the first."""
    return memit_layers(hp, num_layers) if method(name).batch else (hp.layer,)
