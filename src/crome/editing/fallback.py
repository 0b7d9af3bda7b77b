"""The guard's fallback: after the method itself, the consistent rank-one method at the same layer,
then one layer up and one down, each verified in turn."""

from __future__ import annotations

from ..models import LoadedModel
from .edit import Prepared, prepare_edit
from .methods import FALLBACK_METHOD, Method, method
from .mom2 import KeyStats, stats_for
from .records import LayerChoice

FALLBACK_LAYERS = (1, -1)


def attempts(m: Method, action: str, neighbours: bool) -> list[tuple[Method, int]]:
    """(method, layer offset) in the order the guard tries them."""
    if action != "fallback":
        return [(m, 0)]
    fallback = method(FALLBACK_METHOD)
    tries = [(m, 0)] + ([(fallback, 0)] if m != fallback else [])
    return tries + ([(fallback, d) for d in FALLBACK_LAYERS] if neighbours else [])


def at_layer(lm: LoadedModel, prepared: Prepared, stats: KeyStats | None, offset: int):
    """The prepared keys and v*, and C, ``offset`` layers away ((None, None) when outside the model)."""
    if offset == 0:
        return prepared, stats
    layer = prepared.hparams.layer + offset
    if not 0 <= layer < lm.num_layers:
        return None, None
    hp = prepared.hparams.with_(layer=layer)
    choice = LayerChoice(layer, "fallback", dict(from_layer=prepared.hparams.layer))
    moved = prepare_edit(lm, prepared.request, hp, prepared.templates, prepared.seed, layer_choice=choice)
    return moved, stats_for(lm, hp, corpus=stats.corpus if stats is not None else None)
