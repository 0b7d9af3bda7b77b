"""crome: ROME and Consistent ROME (C-ROME) rank-one fact edits that don't collapse the model."""

from .editing.api import (
    apply_memit,
    compute_edit,
    compute_edits,
    context_for,
    guarded_apply,
    guarded_memit,
    prepare_edit,
    prepare_edits,
)
from .editing.context import RunContext, RunSettings
from .editing.edit import Edit, EditHandle, apply_edit, finish_edit
from .editing.guard import guarded
from .editing.hparams import Hparams, defaults_for
from .editing.layer_choice import choose_layer
from .editing.memit import BatchEdit
from .editing.methods import METHODS, Method
from .editing.mom2 import KeyStats, key_stats
from .editing.null_space import NullSpace
from .editing.records import Diagnostics, GuardDecision, GuardRefused, LayerChoice
from .editing.rules import GuardRule
from .editing.templates import context_templates
from .editing.verify import Verifier
from .errors import CromeError
from .evaluation.report import edit_and_report, measure_edit
from .models import DEFAULT_MODEL, LoadedModel, LoadOptions, load_model, save_model
from .request import EditRequest, load_requests
from .scoring.measure import Prefixed, collapsed, generate, generation_matches, perplexity, target_probability

__all__ = [
    "METHODS", "DEFAULT_MODEL", "BatchEdit", "CromeError", "Diagnostics", "Edit", "EditHandle", "EditRequest",
    "GuardDecision", "GuardRefused", "GuardRule", "Hparams", "KeyStats", "LayerChoice", "LoadOptions", "LoadedModel",
    "Method", "NullSpace", "Prefixed", "RunContext", "RunSettings", "Verifier", "apply_edit", "apply_memit",
    "choose_layer", "collapsed", "compute_edit", "compute_edits", "context_for", "context_templates",
    "defaults_for", "edit_and_report", "finish_edit", "generate", "generation_matches", "guarded", "guarded_apply",
    "guarded_memit", "key_stats", "load_model", "load_requests", "measure_edit", "perplexity", "prepare_edit",
    "prepare_edits", "save_model", "target_probability",
]
__version__ = "0.1.0"
