"""crome: ROME and Consistent ROME (C-ROME) rank-one fact edits that don't collapse the model."""

from .editing.edit import (
    METHODS,
    Diagnostics,
    Edit,
    EditHandle,
    apply_edit,
    compute_edit,
    compute_edits,
    finish_edit,
    prepare_edit,
    prepare_edits,
)
from .editing.guard import GuardRefused, GuardRule, Verifier, guarded_apply
from .editing.hparams import Hparams, defaults_for
from .editing.layer_choice import LayerChoice, choose_layer
from .editing.memit import BatchEdit, apply_memit
from .editing.mom2 import KeyStats, key_stats
from .editing.request import EditRequest, load_requests
from .editing.templates import context_templates
from .errors import CromeError
from .evaluation.measure import Prefixed, collapsed, generate, perplexity, target_probability
from .models import DEFAULT_MODEL, LoadedModel, load_model, save_model

__all__ = [
    "METHODS", "DEFAULT_MODEL", "BatchEdit", "CromeError", "Diagnostics", "Edit", "EditHandle", "EditRequest",
    "GuardRefused", "GuardRule", "Hparams", "KeyStats", "LayerChoice", "LoadedModel", "Prefixed", "Verifier",
    "apply_edit", "apply_memit", "choose_layer", "collapsed", "compute_edit", "compute_edits", "context_templates", "defaults_for",
    "finish_edit", "generate", "guarded_apply", "key_stats", "load_model", "load_requests", "perplexity", "prepare_edit",
    "prepare_edits", "save_model", "target_probability",
]
__version__ = "0.1.0"
