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
from .editing.guard import GuardDecision, GuardRefused, GuardRule, Verifier, guarded_apply, guarded_memit
from .editing.hparams import Hparams, defaults_for
from .editing.layer_choice import LayerChoice, choose_layer
from .editing.memit import BatchEdit, apply_memit
from .editing.mom2 import KeyStats, key_stats
from .editing.null_space import NullSpace
from .editing.request import EditRequest, load_requests
from .editing.templates import context_templates
from .errors import CromeError
from .evaluation.context import RunContext, RunSettings
from .evaluation.measure import Prefixed, collapsed, generate, generation_matches, perplexity, target_probability
from .evaluation.report import edit_and_report, measure_edit
from .models import DEFAULT_MODEL, LoadedModel, LoadOptions, load_model, save_model

__all__ = [
    "METHODS", "DEFAULT_MODEL", "BatchEdit", "CromeError", "Diagnostics", "Edit", "EditHandle", "EditRequest",
    "GuardDecision", "GuardRefused", "GuardRule", "Hparams", "KeyStats", "LayerChoice", "LoadOptions", "LoadedModel",
    "NullSpace", "Prefixed", "RunContext", "RunSettings", "Verifier", "apply_edit", "apply_memit", "choose_layer",
    "collapsed", "compute_edit", "compute_edits", "context_templates", "defaults_for", "edit_and_report",
    "finish_edit", "generate", "generation_matches", "guarded_apply", "guarded_memit", "key_stats", "load_model",
    "load_requests", "measure_edit", "perplexity", "prepare_edit", "prepare_edits", "save_model",
    "target_probability",
]
__version__ = "0.1.0"
