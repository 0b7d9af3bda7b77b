"""crome: ROME and Consistent ROME (C-ROME) rank-one fact edits that don't collapse the model."""

from .edit import METHODS, Diagnostics, Edit, EditHandle, apply_edit, compute_edit
from .errors import CromeError
from .hparams import Hparams, defaults_for
from .measure import Prefixed, collapsed, generate, perplexity, target_probability
from .models import DEFAULT_MODEL, LoadedModel, load_model, save_model
from .request import EditRequest
from .templates import context_templates

__all__ = [
    "METHODS", "DEFAULT_MODEL", "CromeError", "Diagnostics", "Edit", "EditHandle", "EditRequest",
    "Hparams", "LoadedModel", "Prefixed", "apply_edit", "collapsed", "compute_edit",
    "context_templates", "defaults_for", "generate", "load_model", "perplexity", "save_model",
    "target_probability",
]
__version__ = "0.1.0"
