"""A delta file: edits without the model. The requests, each update's rank-one factors, the base
model's fingerprint and the settings, in one safetensors file (no pickle: safe to open).

    tensors   "edit-0003.layer-06.a" [d_out, r], "edit-0003.layer-06.b" [d_in, r]  (ΔW = a bᵀ)
              a gated-memory edit: "edit-0003.memory.keys" [2, d_in], "edit-0003.memory.value" [d_out],
              and its memory's gate once: "gate.scale" [d_in] (√diag C)
    metadata  {"crome_delta": JSON}: format, version, model, fingerprint, the gate's layer and
              threshold, and per edit its request(s), method, layers and the record of how it was made

Applying a delta file adds the factors to the base model's W in the file's order, with
``weights.replay``: the same operations as the session or run that made them, so the weights
come out bit for bit. A model whose weights differ from the fingerprint is refused: the factors
were computed for those weights and mean nothing for others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CromeError
from ..models import LoadedModel, weights_fingerprint
from ..models.fingerprint import tensor_sha
from .weights import Factors, replay

FORMAT, VERSION = "crome-delta", 1
GATED_PARTS = ("keys", "value", "thresholds")   # a gated-memory edit's tensors


def layer_sha(lm: LoadedModel, layer: int) -> str:
    """sha256 of one layer's W as stored (first 16 hex digits)."""
    return tensor_sha(lm.mlp_out(layer).weight.detach())


def fingerprint(lm: LoadedModel, layers) -> dict:
    """What identifies the base model: a hash of all its weights (``weights_fingerprint``), the
    exact hash of each edited layer's W, and the dtype. Call it on the unedited model."""
    return dict(weights=weights_fingerprint(lm.model), dtype=lm.dtype,
                layers={str(x): layer_sha(lm, x) for x in sorted(layers)})


@dataclass
class DeltaEdit:
    """One update: its factors per layer (ΔW_l = a bᵀ) and what made it."""

    requests: list[dict]                         # prompt, subject, target_new
    method: str
    factors: Factors = field(repr=False)
    record: dict = field(default_factory=dict)   # seed, hparams, templates, key statistics, diagnostics
    entry: dict | None = field(default=None, repr=False)   # a memory edit: its "keys" and "value"

    def to_meta(self) -> dict:
        return dict(requests=self.requests, method=self.method, layers=sorted(self.factors), record=self.record,
                    gated=self.entry is not None)


def write_delta(path: str | Path, lm_name: str, base: dict, edits: list[DeltaEdit], gate: dict | None = None) -> Path:
    """Write ``edits`` (in order) with the base model's ``fingerprint`` to ``path``, atomically.
    ``gate``: the memory's layer, threshold and scale, when memory edits are among them."""
    from safetensors.torch import save_file

    tensors = {}
    for i, e in enumerate(edits):
        for layer, (a, b) in e.factors.items():
            tensors[f"edit-{i:04d}.layer-{layer:02d}.a"] = a.detach().cpu().contiguous()
            tensors[f"edit-{i:04d}.layer-{layer:02d}.b"] = b.detach().cpu().contiguous()
        if e.entry is not None:
            for part in GATED_PARTS:
                tensors[f"edit-{i:04d}.memory.{part}"] = e.entry[part].detach().cpu().contiguous()
    if any(e.entry is not None for e in edits):
        if gate is None:
            raise CromeError("memory edits need their memory's gate (layer, threshold, scale) in the delta file")
        tensors["gate.scale"] = gate["scale"].detach().cpu().contiguous()
    meta = dict(format=FORMAT, version=VERSION, model=lm_name, fingerprint=base,
                edits=[e.to_meta() for e in edits])
    if "gate.scale" in tensors:
        meta["gate"] = dict(layer=int(gate["layer"]), threshold=float(gate["threshold"]))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"crome_delta": json.dumps(meta)})
    tmp.replace(path)
    return path


def read_delta(path: str | Path) -> tuple[dict, list[DeltaEdit]]:
    """(metadata, edits) of a delta file; a file that is not one gets a one-line ``CromeError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CromeError(f"no delta file at {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("crome_delta", "null"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CromeError(f"{path} is not a crome delta file: {str(e).splitlines()[0] if str(e) else e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CromeError(f"{path} is not a crome delta file (no '{FORMAT}' metadata)")
    if meta.get("version") != VERSION:
        raise CromeError(f"{path} is a version {meta.get('version')} delta file; this crome reads version {VERSION}")
    try:
        if meta.get("gate"):
            meta["gate"]["scale"] = tensors["gate.scale"]
        return meta, [_edit(i, e, tensors) for i, e in enumerate(meta["edits"])]
    except (KeyError, TypeError, ValueError) as bad:
        raise CromeError(f"{path}: malformed delta file (an edit lacks or mangles {bad})") from None


def _edit(i: int, e: dict, tensors: dict) -> DeltaEdit:
    def name(layer: int, part: str) -> str:
        return f"edit-{i:04d}.layer-{layer:02d}.{part}"

    factors = {int(x): (tensors[name(int(x), "a")], tensors[name(int(x), "b")]) for x in e["layers"]}
    entry = {part: tensors[f"edit-{i:04d}.memory.{part}"] for part in GATED_PARTS} if e.get("gated") else None
    return DeltaEdit(list(e["requests"]), str(e["method"]), factors, dict(e.get("record", {})), entry)


def check_base(lm: LoadedModel, meta: dict, source: str = "the delta file") -> None:
    """Refuse a model that is not the one the edits were computed on (one line)."""
    want = meta["fingerprint"]
    layers = [int(x) for x in want["layers"]]
    if lm.num_layers <= max(layers, default=-1):
        raise CromeError(f"{source} edits layer {max(layers)}, {lm.name} has {lm.num_layers} layers: another model")
    have = fingerprint(lm, layers)
    if have["dtype"] != want["dtype"]:
        raise CromeError(f"{source} was made on {want['dtype']} weights, {lm.name} is loaded as {have['dtype']}: "
                         f"load it with --dtype {want['dtype']}")
    if have != want:
        raise CromeError(f"{source} was made on another model ({meta.get('model')}, weights {want['weights']}); "
                         f"{lm.name} has weights {have['weights']}: refusing to apply it")


def apply_edits(lm: LoadedModel, meta: dict, edits: list[DeltaEdit], source: str = "the delta file") -> None:
    """Check ``lm`` against the file's fingerprint, then add every edit's factors in order."""
    check_base(lm, meta, source)
    replay(lm, (e.factors for e in edits))


def apply_delta(lm: LoadedModel, path: str | Path) -> tuple[dict, list[DeltaEdit]]:
    """Read a delta file and apply it to ``lm`` (``apply_edits``)."""
    meta, edits = read_delta(path)
    apply_edits(lm, meta, edits, str(path))
    return meta, edits
