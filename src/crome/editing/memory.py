"""The memory step: edits kept in a gated memory beside W, the weights never touched.

A key-value memory at one layer's MLP output projection W (the GRACE/WISE/MEMOIR family; crome's
design, after ROME's own steps). An edit is what ROME's optimisation found, stored instead of
inserted:

* its keys: the key k (W's input) at the subject's last token, on the bare prompt (k^u) and averaged
  over the context templates (k̄): the two places "The Fall of ROME" shows a key can sit;
* its value: δ = v* − v0, the vector the v* optimisation adds to W's output at the subject's last
  token of every templated prompt (the bare one included), so that the model says the new target;
* a threshold per key: ``memory_threshold``, except for a bare key with almost no context (a subject
  at the start of the prompt whose last token is among the first ``memory_exact_below`` = 3). Such a key
  is a function of one or two tokens, and every text's first positions look alike (attention-sink
  keys): at 0.85 the one-token subject "Life" fired at the first position of nearly every text, and
  took a 700-edit run to 1.09x perplexity (``benchmarks/memory_firing.py``). It needs
  ``memory_exact_threshold`` (0.995), which only the same first tokens reach; a text starting with
  them has exactly that key, so nothing the bare key should catch is lost.

At every position of every input, W's input k is compared with every stored key by cosine
similarity after dividing each coordinate by its standard deviation over ordinary text (√diag C,
so that the few massive-activation coordinates of a first position do not decide it). Among the keys
whose threshold it reaches, the most similar fires: δ of its edit is added to W's output there.
Nothing fires on text far from every key, and then W's output is returned untouched: the model is
bit for bit the unedited one. Undo removes an edit's entry.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CromeError
from ..hooks import forward_hook, widen
from ..models import LoadedModel
from ..models.fingerprint import tensor_sha
from ..request import EditRequest, locate
from .edit import Prepared
from .mom2 import KeyStats
from .records import OneFact

# A saved edited model's memory: next to its weights, read by crome's loader (``attach_saved``).
MEMORY_FILE, MEMORY_FORMAT = "crome-memory.safetensors", "crome-memory"


@dataclass
class MemoryEdit(OneFact):
    """One edit stored in the memory: its request, keys, value and how it came about."""

    request: EditRequest
    method: str
    layer: int
    keys: torch.Tensor = field(repr=False)     # [2, d_in]: k^u and k̄
    delta: torch.Tensor = field(repr=False)    # [d_out]: δ = v* − v0
    thresholds: torch.Tensor = field(repr=False)   # [2]: the similarity each key needs to fire
    per_request: list[dict]                    # p_target_opt, opt_steps, first_token_subject, cos_bare_mean
    context_templates: list[str]
    seed: int
    hparams: object
    seconds: float
    key_stats: dict | None = None
    layer_choice: dict | None = None

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.delta).all() and torch.isfinite(self.keys).all())

    @property
    def factors(self) -> dict:
        """A memory edit adds nothing to W."""
        return {}

    @property
    def diagnostics(self):
        return None

    @property
    def null_space(self) -> None:
        return None

    def entry(self) -> dict:
        """What re-storing the edit needs (``EditMemory.add``), on the CPU: its keys, value and thresholds."""
        return dict(keys=self.keys.detach().cpu(), value=self.delta.detach().cpu(),
                    thresholds=self.thresholds.detach().cpu())

    def record(self) -> dict:
        """What every record of the edit carries: W is not updated (ΔW = 0), the memory holds ‖δ‖."""
        return dict(layers=[self.layer], update_cases=1, finite=self.finite, update_norm=0.0, update_ratio=0.0,
                    layer_stats={}, key_stats={str(self.layer): self.key_stats} if self.key_stats else {},
                    value_norm=float(self.delta.norm()), memory_keys=int(self.keys.shape[0]))


def key_thresholds(tokenizer, request: EditRequest, hp) -> torch.Tensor:
    """The similarity k^u and k̄ each need to fire: ``memory_threshold``, or ``memory_exact_threshold`` for a
    bare key whose subject's last token is among the prompt's first ``memory_exact_below`` tokens."""
    bare_context = locate(tokenizer, request).subject_last + 1
    exact = bare_context < hp.memory_exact_below
    return torch.tensor([hp.memory_exact_threshold if exact else hp.memory_threshold, hp.memory_threshold],
                        dtype=torch.float64)


def memory_edit(lm: LoadedModel, prepared: Prepared, name: str, stats: KeyStats | None) -> MemoryEdit:
    """The memory entry of prepared keys and v* (``edit.prepare_edits``): keys k^u and k̄, value δ."""
    keys, value = prepared.keys, prepared.value
    cos = float(torch.nn.functional.cosine_similarity(keys.k_bare, keys.k_mean, dim=0))
    return MemoryEdit(request=prepared.request, method=name, layer=prepared.hparams.layer,
                      keys=torch.stack([keys.k_bare, keys.k_mean]).detach(), delta=value.delta.detach(),
                      thresholds=key_thresholds(lm.tokenizer, prepared.request, prepared.hparams),
                      per_request=[dict(p_target_opt=value.p_target, opt_steps=value.steps,
                                        first_token_subject=keys.first_token_subject, cos_bare_mean=cos)],
                      context_templates=prepared.templates, seed=prepared.seed, hparams=prepared.hparams,
                      seconds=prepared.seconds, key_stats=stats.record() if stats is not None else None,
                      layer_choice=prepared.layer_choice)


class EditMemory:
    """The gated memory at one layer: stored keys (unit length in the gate's metric), their edits'
    values, the threshold. ``attached(lm)`` puts it on W's output; entries can come and go while it is."""

    def __init__(self, layer: int, threshold: float, scale: torch.Tensor):
        if not -1.0 < threshold <= 1.0:
            raise CromeError(f"the memory's gate threshold is a cosine similarity in (-1, 1], not {threshold}")
        self.layer, self.threshold = layer, threshold
        self.scale = widen(scale.detach()).cpu()                        # √diag C, [d_in]
        self.numbers: list[int] = []                                      # an edit's number per entry
        self.keys: dict[int, torch.Tensor] = {}                           # number -> [n, d_in], normalised
        self.values: dict[int, torch.Tensor] = {}                         # number -> [d_out]
        self.thresholds: dict[int, torch.Tensor] = {}                     # number -> [n]: each key's threshold
        self._tables: dict = {}                                           # (device, dtype) -> the gate's table
        self._hook = None                                                 # the forward hook while attached
        self._count = 0                                                   # the largest entry number so far

    @classmethod
    def from_stats(cls, stats: KeyStats, threshold: float) -> "EditMemory":
        return cls(stats.layer, threshold, torch.diagonal(stats.mom2).clamp(min=1e-12).sqrt())

    def __len__(self) -> int:
        return len(self.numbers)

    def next_number(self) -> int:
        """A number no entry has had: one more than the largest so far."""
        self._count += 1
        return self._count

    def fresh(self) -> "EditMemory":
        """The same gate with no entries (a new run)."""
        return EditMemory(self.layer, self.threshold, self.scale)

    def normalised(self, keys: torch.Tensor, dtype=None) -> torch.Tensor:
        """``keys`` divided by √diag C, unit length (in ``dtype``; default: as wide as the two are)."""
        x = widen(keys) / self.scale.to(device=keys.device, dtype=dtype or self.scale.dtype)
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    def add(self, number: int, keys: torch.Tensor, value: torch.Tensor, thresholds: torch.Tensor | None = None) -> None:
        """Store edit ``number``'s keys [n, d_in] and value; ``thresholds`` [n]: each key's (default: the memory's)."""
        if number in self.keys:
            raise CromeError(f"the memory already holds edit {number}")
        self._count = max(self._count, number)
        self.numbers.append(number)
        self.keys[number] = self.normalised(keys.detach().cpu())
        self.values[number] = widen(value.detach()).cpu()
        self.thresholds[number] = (torch.full((len(keys),), self.threshold, dtype=torch.float64) if thresholds is None
                                   else thresholds.detach().cpu().to(torch.float64))
        self._tables = {}

    def remove(self, number: int) -> None:
        if number not in self.keys:
            raise CromeError(f"the memory holds no edit {number}")
        self.numbers.remove(number)
        del self.keys[number], self.values[number], self.thresholds[number]
        self._tables = {}

    def table(self, device, dtype=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(every stored key [N, d_in] in ``dtype`` (default: as stored), the entry each belongs to [N], the
        entries' values [E, d_out], each key's threshold [N])."""
        dtype = dtype or self.keys[self.numbers[0]].dtype
        key = (torch.device(device), dtype)
        if key not in self._tables:
            keys = torch.cat([self.keys[n] for n in self.numbers]).to(device=device, dtype=dtype)
            owners = torch.tensor([i for i, n in enumerate(self.numbers) for _ in range(len(self.keys[n]))],
                                  device=device)
            values = torch.stack([self.values[n] for n in self.numbers]).to(device)
            thresholds = torch.cat([self.thresholds[n] for n in self.numbers]).to(device=device, dtype=dtype)
            self._tables[key] = (keys, owners, values, thresholds)
        return self._tables[key]

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(where the memory fires [...], the entry that fires there [...]) for W's inputs ``x`` [..., d_in]:
        among the keys whose threshold the similarity reaches, the most similar. Compared in the model's
        working precision (``widen``: float32, float64 for a float64 model): with thousands of keys the
        comparison is a large share of a forward pass, and float64 would double it."""
        dtype = widen(x).dtype
        keys, owners, _, thresholds = self.table(x.device, dtype)
        sims = self.normalised(x, dtype) @ keys.T
        best, index = sims.masked_fill(sims < thresholds, -torch.inf).max(-1)
        return best > -torch.inf, owners[index]

    def hook(self, _module, args, output):
        """W's output plus the firing entries' values; None (untouched) where nothing fires."""
        if not self.numbers:
            return None
        fire, owner = self.gate(args[0])
        if not bool(fire.any()):
            return None
        _, _, values, _ = self.table(output.device, widen(args[0]).dtype)
        out = output.clone()
        out[fire] = (widen(out[fire]) + values[owner[fire]]).to(out.dtype)
        return out

    def attach(self, lm: LoadedModel) -> "EditMemory":
        """Put the memory on layer ``layer``'s W until ``detach()`` (entries may come and go meanwhile);
        empty, it changes nothing."""
        if self._hook is None:
            self._hook = lm.mlp_out(self.layer).register_forward_hook(self.hook)
        return self

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @contextmanager
    def attached(self, lm: LoadedModel):
        """The memory on W for the duration of the block."""
        with forward_hook(lm.mlp_out(self.layer), self.hook):
            yield self

    def sha(self) -> str:
        """A hash of the entries, in order (what a sequential run's records check on resume)."""
        if not self.numbers:
            return ""
        return tensor_sha(*(t for n in self.numbers for t in (self.keys[n], self.values[n], self.thresholds[n])))

    def state(self) -> dict:
        return dict(layer=self.layer, threshold=self.threshold, scale=self.scale, numbers=list(self.numbers),
                    keys=dict(self.keys), values=dict(self.values), thresholds=dict(self.thresholds))

    def save(self, path: str | Path) -> Path:
        """The memory as one safetensors file (no pickle), atomically: the gate (layer, threshold,
        √diag C) and every entry's stored keys and value, in order."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"scale": self.scale.contiguous()}
        for n in self.numbers:
            tensors[f"entry-{n}.keys"] = self.keys[n].contiguous()
            tensors[f"entry-{n}.value"] = self.values[n].contiguous()
            tensors[f"entry-{n}.thresholds"] = self.thresholds[n].contiguous()
        meta = dict(format=MEMORY_FORMAT, layer=self.layer, threshold=self.threshold, numbers=self.numbers)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"crome_memory": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EditMemory":
        """A memory ``save`` wrote; anything else gets a one-line ``CromeError``."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("crome_memory", "null"))
            tensors = load_file(str(path))
            if not isinstance(meta, dict) or meta.get("format") != MEMORY_FORMAT:
                raise ValueError("no crome memory metadata")
            numbers = [int(n) for n in meta["numbers"]]
            return cls.from_state(dict(layer=meta["layer"], threshold=meta["threshold"], scale=tensors["scale"],
                                       numbers=numbers, keys={n: tensors[f"entry-{n}.keys"] for n in numbers},
                                       values={n: tensors[f"entry-{n}.value"] for n in numbers},
                                       thresholds={n: tensors[f"entry-{n}.thresholds"] for n in numbers}))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            raise CromeError(f"{path} is not a crome memory file ({str(e).splitlines()[0] if str(e) else e})") from None

    @classmethod
    def from_state(cls, state: dict) -> "EditMemory":
        memory = cls(int(state["layer"]), float(state["threshold"]), state["scale"])
        for n in state["numbers"]:
            memory.numbers.append(int(n))
            memory._count = max(memory._count, int(n))
            memory.keys[int(n)], memory.values[int(n)] = state["keys"][n], state["values"][n]
            memory.thresholds[int(n)] = state["thresholds"][n]
        return memory


class MemoryHandle:
    """An edit in the memory; ``restore()`` takes it out (the model as it was, bit for bit)."""

    def __init__(self, memory: EditMemory, number: int, edit: MemoryEdit):
        self.memory, self.number, self.edit = memory, number, edit
        self.active = True
        self.factors: dict = {}
        self.keys: dict = {}

    def restore(self) -> None:
        if self.active:
            self.memory.remove(self.number)
            self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def store(memory: EditMemory, edit: MemoryEdit, number: int) -> MemoryHandle:
    """Put ``edit`` into ``memory`` as entry ``number``; a non-finite one is refused, the memory unchanged."""
    if not edit.finite:
        raise CromeError(f"non-finite memory entry (NaN or inf) at layer {edit.layer}: edit not stored")
    if edit.layer != memory.layer:
        raise CromeError(f"the memory is at layer {memory.layer}, the edit at layer {edit.layer}")
    memory.add(number, edit.keys, edit.delta, edit.thresholds)
    return MemoryHandle(memory, number, edit)


def memory_from_delta(meta: dict, edits: list) -> EditMemory | None:
    """The memory of a delta file's memory edits (``delta.read_delta``), entries in the file's order;
    None when it has none. Their keys and values are stored as the session stored them: the same bits."""
    entries = [e.entry for e in edits if e.entry is not None]
    if not entries:
        return None
    gate = meta.get("gate")
    if not gate:
        raise CromeError("malformed delta file: memory edits without their gate (layer, threshold, scale)")
    memory = EditMemory(int(gate["layer"]), float(gate["threshold"]), gate["scale"])
    for number, entry in enumerate(entries, start=1):
        memory.add(number, entry["keys"], entry["value"], entry["thresholds"])
    return memory


def attach_saved(lm: LoadedModel, source: str | None) -> EditMemory | None:
    """The memory saved with the model folder ``source`` (``MEMORY_FILE``), put on ``lm``; None without one.
    A memory that does not fit the model (layer, width) is refused with one line."""
    path = Path(source) / MEMORY_FILE if source else None
    if path is None or not path.is_file():
        return None
    memory = EditMemory.load(path)
    width = lm.weight(min(memory.layer, lm.num_layers - 1)).shape[1]
    if memory.layer >= lm.num_layers or memory.scale.shape != (width,):
        raise CromeError(f"{path} is a memory for layer {memory.layer} of width {memory.scale.shape[0]}; "
                         f"{lm.name} has {lm.num_layers} layers of width {width}")
    return memory.attach(lm)
