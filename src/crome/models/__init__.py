"""Models: loading a causal LM for editing and what is known about it.

* ``loaded.py``: ``LoadedModel``, the model in memory with its tokenizer and architecture.
* ``loading.py``: ``load_model``, ``LoadOptions``, ``from_modules``, ``save_model``, ``DEFAULT_MODEL``.
* ``gguf.py``: GGUF files (the embedded default model, header checks, conversion to fp32, cached).
* ``dtypes.py``: dtype names and the ``auto`` rule.
* ``fingerprint.py``: hashes of weights, vocabularies and tensors (cache keys).
* ``paths.py``: the default device and the cache folder.
"""

from .dtypes import DTYPES, LARGE_MODEL_PARAMS, count_parameters, dtype_name, resolve_dtype
from .fingerprint import tensor_sha, tokenizer_fingerprint, weights_fingerprint
from .gguf import check_gguf_header, default_gguf_path, file_digest
from .loaded import LoadedModel
from .loading import DEFAULT_MODEL, LoadOptions, from_modules, load_model, save_model
from .paths import cache_dir, default_device

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "LARGE_MODEL_PARAMS",
    "LoadOptions",
    "LoadedModel",
    "cache_dir",
    "check_gguf_header",
    "count_parameters",
    "default_device",
    "default_gguf_path",
    "dtype_name",
    "file_digest",
    "from_modules",
    "load_model",
    "resolve_dtype",
    "save_model",
    "tensor_sha",
    "tokenizer_fingerprint",
    "weights_fingerprint",
]
