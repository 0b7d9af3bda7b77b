"""Which layer to edit: the table's entry, the user's, or ``auto`` from causal tracing.

``auto`` follows ROME's "locate" step: for facts the model knows (a small list that
ships with crome, ``corpus/facts.tsv``, CC0), corrupt the subject's embeddings and
restore the MLP output at the subject's last token, in a window of layers around
each layer; the layer whose window restores the most probability of the right answer
(the mean indirect effect over the facts) is the one to edit. The window is a fifth
of the depth (ROME: 10 of 48 layers). Layer 0's MLP is never restored: the noise is
added to the embeddings, and the first MLP mostly re-encodes the token itself, so
restoring it undoes the corruption wholesale (on SmolLM2 every window that holds
layer 0 restores ~0.35 of the probability, every other ≤ 0.09) and would drag the
choice to the bottom of the model. Layer 0 is therefore not a candidate either. The choice is cached per model and recorded
with every result (``LayerChoice.record()``), with the traced curve.

Models in the hyper-parameter table keep their entry; every other model gets
``auto``. Too few known facts (fewer than ``MIN_FACTS``) fall back to the
relative-depth rule, and the record says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources

from ..errors import CromeError
from ..models import LoadedModel, cache_dir
from .hparams import DEFAULTS, Hparams, defaults_for, depth_rule

MIN_FACTS = 3
RULE_VERSION = 2   # part of the cache key: a changed rule recomputes cached choices
FACTS_FILE = "facts.tsv"


@dataclass
class LayerChoice:
    layer: int
    rule: str                          # "user", "table", "auto" (causal trace) or "depth" (20% rule)
    detail: dict = field(default_factory=dict)

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Fact:
    prompt: str
    subject: str
    answer: str


def load_facts() -> list[Fact]:
    """The fact list that ships with crome."""
    text = (resources.files("crome") / "corpus" / FACTS_FILE).read_text(encoding="utf-8")
    facts = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            prompt, subject, answer = line.split("\t")
            facts.append(Fact(prompt, subject, answer))
    return facts


def auto_layer(lm: LoadedModel, seed: int = 0, n_facts: int = 20, window: int | None = None,
               use_cache: bool = True) -> LayerChoice:
    """The layer whose MLP window at the subject's last token carries the most causal effect."""
    from ..analysis.trace import trace_fact
    from ..evaluation.measure import score_targets

    facts = load_facts()
    window = window or max(1, round(lm.num_layers / 5))
    key = json.dumps([RULE_VERSION, lm.identity, [asdict(f) for f in facts], seed, n_facts, window])
    path = cache_dir() / "layers" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")
    if use_cache and path.exists():
        return LayerChoice(**json.loads(path.read_text()))
    scores = score_targets(lm, [(f.prompt.replace("{}", f.subject) if "{}" in f.prompt else f.prompt, f.answer)
                                for f in facts])
    known = [f for f, s in zip(facts, scores) if s.hits[0]][:n_facts]
    if len(known) < max(1, MIN_FACTS):
        layer = depth_rule(lm.num_layers)
        choice = LayerChoice(layer, "depth", dict(reason=f"the model knows {len(known)} of {len(facts)} facts "
                                                         f"(needs {MIN_FACTS}): relative-depth rule", known=len(known)))
    else:
        L = lm.num_layers
        effects = [0.0] * L
        for f in known:
            t = trace_fact(lm, f.prompt, f.subject, f.answer, seed=seed, window=window, kinds=("mlp",),
                           last_subject_only=True, first_layer=1)
            for layer in range(L):
                effects[layer] += t.effects["mlp"][layer][t.subject_last] / len(known)
        layer = max(range(1, L), key=lambda i: effects[i]) if L > 1 else 0
        choice = LayerChoice(layer, "auto", dict(method="causal trace, MLP at the last subject token (layers >= 1)", window=window,
                                                 seed=seed, n_facts=len(known), scanned=len(facts),
                                                 effects=[round(e, 6) for e in effects]))
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(choice.record()))
    return choice


def choose_layer(lm: LoadedModel, layer: int | str | None = None, seed: int = 0) -> LayerChoice:
    """``layer``: an index, ``"auto"``, ``"depth"``, or None (the table's entry, else auto)."""
    if isinstance(layer, str):
        if layer.lstrip("-").isdigit():
            layer = int(layer)
        elif layer == "auto":
            return auto_layer(lm, seed)
        elif layer == "depth":
            return LayerChoice(depth_rule(lm.num_layers), "depth")
        else:
            raise CromeError(f"--layer must be a layer index, 'auto' or 'depth', not {layer!r}")
    if layer is not None:
        lm.check_layer(layer)
        return LayerChoice(layer, "user")
    if lm.name in DEFAULTS:
        return LayerChoice(DEFAULTS[lm.name].layer, "table")
    return auto_layer(lm, seed)


def resolve(lm: LoadedModel, hparams: Hparams | None = None, layer: int | str | None = None,
            seed: int = 0) -> tuple[Hparams, LayerChoice]:
    """Hyper-parameters and the layer choice for an edit: explicit ``hparams`` keep their layer
    unless ``layer`` overrides it."""
    if hparams is not None and layer is None:
        lm.check_layer(hparams.layer)
        return hparams, LayerChoice(hparams.layer, "user")
    choice = choose_layer(lm, layer, seed)
    hp = (hparams or defaults_for(lm.name, lm.num_layers)).with_(layer=choice.layer)
    lm.check_layer(hp.layer)
    return hp, choice
