"""Key statistics C = E[k kᵀ] for ROME's mom2 adjustment: u = C⁻¹k̄ / ‖C⁻¹k̄‖.

Without C (identity), u = k̄/‖k̄‖ overlaps the keys of unrelated text and an edit
leaks into everything the layer reads; with C it points where ordinary keys have
little energy. So crome uses C by default, from one of two sources:

* ``corpus``: a text file the user names (plain text, ME-PPL JSON, Wikipedia summaries);
* ``model`` (the default): text sampled from the model itself, seeded per row, in
  bfloat16 where the hardware has it. It needs no download and fits any model and
  tokenizer; docs/MODELS.md compares it with Wikipedia text on two real models.

Keys are collected at every token position, up to ``samples`` of them. C is then
shrunk towards a multiple of the identity, C_λ = (1 − λ) S + λ (tr S / d) I, with
the Ledoit–Wolf λ (the second-moment form, as scikit-learn's ``ledoit_wolf`` with
``assume_centered=True``): a corpus smaller than the key dimension gives a singular
S, and C_λ is still well conditioned; with many keys λ is close to 0. A fixed λ can
be asked for instead (``mom2_shrinkage``; 0 reproduces the reference exactly).

Everything is cached on disk by model, layer, source (content hash) and settings,
and every result records ``KeyStats.record()``: source, number of keys, λ, hash.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import cached
from ..errors import CromeError
from ..hooks import run_until
from ..models import LoadedModel, cache_dir, dtype_name, file_digest
from ..models.fingerprint import tensor_sha
from ..request import pad_right
from ..scoring.texts import load_texts
from .hparams import memit_layers
from .methods import Method

MODEL_SOURCE = "model"
SAMPLER = "sampled-v2"  # per-row generators, large batches, native bf16 where the hardware has it
# starts of the sampled texts: common openings of English prose, one per row in turn
SAMPLE_STARTS = ("The", "In", "A", "It", "This", "When", "He", "She", "We", "They", "There", "I",
                 "One", "After", "According to", "On", "For", "Many", "Some", "His")


@dataclass
class KeyStats:
    """C (shrunk) for one model and layer, and where it came from."""

    mom2: torch.Tensor = field(repr=False)   # [d_in, d_in], float32
    source: str           # "model (sampled in bfloat16, seed 0)" or the corpus file name
    source_hash: str      # content hash of the corpus, or of the sampled token ids
    layer: int
    n_keys: int
    shrinkage: float      # λ
    hash: str             # sha256 of C's bytes, first 16 hex digits
    corpus: str | None = None  # the corpus file (None: sampled text): C for another layer comes from it too

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """C⁻¹ k."""
        return torch.linalg.solve(self.mom2.to(k), k)

    def record(self) -> dict:
        return dict(source=self.source, source_hash=self.source_hash, layer=self.layer, n_keys=self.n_keys,
                    shrinkage=self.shrinkage, hash=self.hash)


def ledoit_wolf(total: torch.Tensor, fourth: float, n: int) -> float:
    """Ledoit–Wolf shrinkage λ for the second moment S = total / n of n vectors x_i,
    from ``total`` = Σ x xᵀ and ``fourth`` = Σ ‖x_i‖⁴ (no need to keep the vectors)."""
    d = total.shape[0]
    s = total / n
    mu = float(torch.trace(s)) / d
    s_fro2 = float((s * s).sum())
    beta = (fourth / n - s_fro2) / (d * n)
    delta = (s_fro2 - 2 * mu * float(torch.trace(s)) + d * mu * mu) / d
    beta = min(beta, delta)
    return 0.0 if beta <= 0 else beta / delta


def shrink(s: torch.Tensor, lam: float) -> torch.Tensor:
    mu = torch.trace(s) / s.shape[0]
    return (1 - lam) * s + lam * mu * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)


def sampling_dtype(lm: LoadedModel) -> torch.dtype:
    """The dtype text is sampled in: bfloat16 where the hardware computes it natively (CUDA with
    bf16, or a CPU with AVX-512 BF16 / AMX), else the model's own. Only the sampled text depends
    on it (the key pass that builds C always runs in the model's dtype); the cache key and the
    statistics' label record it."""
    if lm.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if lm.device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return next(lm.model.parameters()).dtype


def _cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` with its parameters in ``dtype``; tied parameters stay tied and the
    original is untouched (the fp32 weights are never duplicated, only the cast ones made)."""
    if next(model.parameters()).dtype == dtype:
        return model
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _row_generators(seed: int, first: int, n: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sampled row, seeded by (seed, row): a row's text does not depend on
    which other rows share its batch, so the batch size is free to follow the hardware."""
    return [torch.Generator(device=device).manual_seed(seed * 1_000_003 + first + i) for i in range(n)]


@torch.no_grad()
def sample_token_ids(lm: LoadedModel, n_tokens: int, seed: int = 0, length: int = 128, batch_size: int = 256,
                     top_k: int = 50, dtype: torch.dtype | None = None) -> list[list[int]]:
    """Texts sampled from the model (top-k, seeded per row), as token ids: at least ``n_tokens`` in all.

    Every sampled position gives a key, so 20k keys need only ~160 rows of 128 tokens; they are
    drawn in large batches with a KV cache, in ``dtype`` (default: ``sampling_dtype``) on a cast
    copy of the model. The output layer runs on the last position only, as one 2-D matrix product
    (on a 3-D input, oneDNN's bfloat16 path would expand the 151k-row weight per row)."""
    tok = lm.tokenizer
    cast = dataclasses.replace(lm, model=_cast_copy(lm.model, dtype or sampling_dtype(lm)))
    base = cast.model.base_model
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    n_rows = -(-n_tokens // length)
    rows: list[list[int]] = []
    for start in range(0, n_rows, batch_size):
        n = min(batch_size, n_rows - start)
        gens = _row_generators(seed, start, n, lm.device)
        seqs = [tok(SAMPLE_STARTS[(start + i) % len(SAMPLE_STARTS)])["input_ids"] for i in range(n)]
        ids, mask = pad_right(seqs, tok.pad_token_id, lm.device, left=True)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = {}
        for _ in range(length - min(len(s) for s in seqs)):
            out = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache)
            cache = {cache_kw: getattr(out, "cache", None) or out.past_key_values}
            top = cast.logits(out.last_hidden_state[:, -1]).topk(top_k, dim=-1)
            probs = torch.softmax(top.values, -1)
            choice = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens)])
            ids = top.indices.gather(1, choice)
            seqs = [s + [t] for s, t in zip(seqs, ids[:, 0].tolist())]
            mask = torch.cat([mask, torch.ones_like(ids)], 1)
            positions = positions[:, -1:] + 1
        rows += [s[:length] for s in seqs]
    return rows


def _sources(lm: LoadedModel, corpus: str | Path | None, samples: int, seed: int, max_length: int):
    """(label, content hash, token-id rows) of the statistics' source; rows are built lazily."""
    if corpus is not None:
        path = Path(corpus)
        if not path.is_file():
            raise CromeError(f"mom2 corpus not found: {path}")

        def rows():
            out, n = [], 0
            for text in load_texts(path):
                if n >= samples:
                    break
                out.append(lm.tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
                n += len(out[-1])
            return out
        return path.name, file_digest(path)[:16], rows
    dtype = sampling_dtype(lm)
    key = json.dumps([lm.identity, SAMPLER, str(dtype), seed, samples, max_length, SAMPLE_STARTS])
    ids_path = cache_dir() / "mom2" / ("sampled-" + hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")

    def rows():
        return cached(ids_path, lambda: sample_token_ids(lm, samples, seed=seed, length=max_length, dtype=dtype),
                      lambda ids: json.dumps(ids).encode(), json.loads, "sampled text")
    label = f"{MODEL_SOURCE} (sampled in {dtype_name(dtype)}, seed {seed})"
    return label, hashlib.sha256(key.encode()).hexdigest()[:16], rows


@torch.no_grad()
def key_stats(lm: LoadedModel, layer: int, corpus: str | Path | None = None, samples: int = 20000,
              shrinkage: float | None = None, seed: int = 0, max_length: int = 128, batch_size: int = 8,
              progress: bool = True) -> KeyStats:
    """C for ``layer`` from ``corpus`` (a file) or, when None, from text sampled from the model (cached)."""
    lm.check_layer(layer)
    if shrinkage is not None and not 0.0 <= shrinkage <= 1.0:
        raise CromeError(f"mom2 shrinkage must be in [0, 1], not {shrinkage}")
    label, source_hash, rows = _sources(lm, corpus, samples, seed, max_length)
    key = json.dumps([lm.identity, layer, source_hash, samples, max_length])
    path = cache_dir() / "mom2" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".pt")
    total, fourth, count = cached(path, lambda: _accumulate(lm, layer, rows, samples, batch_size, progress, label),
                                  lambda v: _to_bytes(dict(total=v[0], fourth=v[1], count=v[2], key=key)),
                                  _stats_from_bytes, f"key statistics (layer {layer})")
    if count == 0:
        raise CromeError(f"mom2 source {label} gave no keys")
    lam = ledoit_wolf(total, fourth, count) if shrinkage is None else float(shrinkage)
    c = shrink(total / count, lam).float()
    if not torch.isfinite(c).all():
        raise CromeError(f"key statistics from {label} are not finite")
    return KeyStats(mom2=c.to(lm.device), source=label, source_hash=source_hash, layer=layer, n_keys=count,
                    shrinkage=lam, hash=tensor_sha(c), corpus=str(corpus) if corpus is not None else None)


def _to_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _stats_from_bytes(data: bytes):
    saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return saved["total"], saved["fourth"], saved["count"]


def _accumulate(lm, layer, rows, samples, batch_size, progress, label):
    from rich.progress import Progress

    rows = rows()
    d_in = lm.weight(layer).shape[1]
    total = torch.zeros(d_in, d_in, dtype=torch.float64, device=lm.device)
    fourth, count = 0.0, 0
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"key statistics, layer {layer}, {label}", total=samples)
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_right(rows[start:start + batch_size], lm.tokenizer.pad_token_id, lm.device)
            rec = run_until(lm.model, lm.mlp_out(layer), input_ids=ids, attention_mask=mask)
            k = rec.input[mask.bool()].double()[: samples - count]
            total += k.T @ k
            fourth += float((k.pow(2).sum(1) ** 2).sum())
            count += k.shape[0]
            bar.update(task, completed=count)
            if count >= samples:
                break
    return total.cpu(), fourth, count


def stats_for(lm: LoadedModel, hp, mom2: KeyStats | torch.Tensor | None = None, corpus=None,
              progress: bool = False) -> KeyStats | None:
    """The key statistics an edit with hyper-parameters ``hp`` uses: None with mom2 adjustment off;
    ``mom2`` when given (a bare matrix is wrapped); else C from ``corpus``, or from text sampled from
    the model when there is none (computed once, cached)."""
    if not hp.mom2_adjustment:
        if mom2 is not None:
            raise CromeError("key statistics were given but mom2 adjustment is off (--no-mom2)")
        return None
    if mom2 is None:
        return key_stats(lm, hp.layer, corpus, hp.mom2_samples, shrinkage=hp.mom2_shrinkage, progress=progress)
    if isinstance(mom2, torch.Tensor):
        return KeyStats(mom2=mom2, source="matrix given", source_hash="", layer=hp.layer, n_keys=0,
                        shrinkage=0.0, hash=tensor_sha(mom2))
    return mom2


def layer_stats(lm: LoadedModel, m: Method, hp, corpus=None, progress: bool = False,
                known: KeyStats | None = None) -> dict[int, KeyStats]:
    """C at every layer a batch method ``m`` edits (``known``: the one already computed for ``hp.layer``)."""
    if not hp.mom2_adjustment:
        m.require_stats()
    return {x: known if known is not None and x == known.layer else
            stats_for(lm, dataclasses.replace(hp, layer=x), corpus=corpus, progress=progress)
            for x in memit_layers(hp, lm.num_layers)}


def second_moment(lm: LoadedModel, layer: int, corpus: str | Path, samples: int = 20000, **kwargs) -> torch.Tensor:
    """C alone (the matrix of ``key_stats``)."""
    return key_stats(lm, layer, corpus, samples, **kwargs).mom2
