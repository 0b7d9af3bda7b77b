"""A sequential run's checkpoint: the accumulated update as factors, one file per update.

After update n (one ROME edit, or one MEMIT batch) the run writes ``<out>.factors/update-n.pt``
before its records: the cases it holds and, per edited layer, factors (a, b) with ΔW = a bᵀ
(rank one per edit and layer). Resuming replays them in order with ``weights.replay``, the
same operations in the same order as the run, so the weights come back bit for bit; each
record's ``weights_sha`` (``weights.weights_sha``, a hash of the edited layers after its update) checks that. An
AlphaEdit run also keeps its projections (``null-space.pt``) and each update's keys, from
which the running key sum is rebuilt in the same order.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..editing import weights
from ..errors import CromeError
from ..models import LoadedModel


class FactorStore:
    """``<out>.factors/update-000001.pt``, ...: one file per update of a sequential run."""

    def __init__(self, out: str | os.PathLike):
        out = Path(out)
        self.folder = out.with_name(out.stem + ".factors")

    def path(self, update: int) -> Path:
        return self.folder / f"update-{update:06d}.pt"

    def write(self, update: int, case_ids: list[str], factors: dict, keys: dict | None = None,
              memory: dict | None = None) -> None:
        """Update ``update``'s factors; ``keys`` (layer -> [B, d_in]): an AlphaEdit run's keys, from
        which resuming rebuilds the running key sum; ``memory``: a memory run's entry (number, keys,
        value), which resuming stores again."""
        self._save(self.path(update), {"case_ids": list(case_ids), "keys": keys or {}, "entry": memory or {},
                                       "layers": {int(k): (a.detach().cpu(), b.detach().cpu())
                                                  for k, (a, b) in factors.items()}})

    def _save(self, path: Path, payload: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:      # torch reports a full disk as either
            tmp.unlink(missing_ok=True)
            raise CromeError(f"cannot write the checkpoint {path}: {str(e).splitlines()[0][:120]}; the run so far "
                             f"is intact: rerun with --resume once there is room") from None

    @property
    def null_space_path(self) -> Path:
        return self.folder / "null-space.pt"

    def write_null_space(self, state: dict) -> None:
        """An AlphaEdit run's projections, written once when it starts: a resumed run uses these
        bits, not a recomputation (an eigendecomposition's last bits depend on the thread count)."""
        self._save(self.null_space_path, state)

    def read_null_space(self) -> dict | None:
        path = self.null_space_path
        return _load(path) if path.exists() else None

    def read(self, update: int) -> dict:
        path = self.path(update)
        if not path.exists():
            raise CromeError(f"{path} is missing: the sequential run's checkpoint is incomplete; start it anew")
        update = _load(path)
        layers = update.get("layers") if isinstance(update, dict) else None
        if not isinstance(layers, dict) or not all(
                isinstance(x, int) and isinstance(f, (tuple, list)) and len(f) == 2
                and all(isinstance(t, torch.Tensor) for t in f) for x, f in layers.items()):
            raise CromeError(f"{path} is not a factor checkpoint (no layers of tensor factors): start the run anew")
        return update

    def updates(self) -> list[int]:
        if not self.folder.exists():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("update-*.pt"))

    def drop_after(self, update: int) -> None:
        """Remove the files of updates after ``update`` (an update cut off before its records)."""
        for n in self.updates():
            if n > update:
                self.path(n).unlink()

    def clear(self) -> None:
        self.drop_after(0)
        self.null_space_path.unlink(missing_ok=True)


def _load(path: Path):
    """A checkpoint file's contents (tensors and plain data only: no pickled code), or one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # torch raises many kinds for a cut or foreign file
        raise CromeError(f"{path} is unreadable ({type(exc).__name__}): a cut or foreign checkpoint file; "
                         f"start the run anew") from None


def replay(lm: LoadedModel, saved: list[dict]) -> None:
    """Add the updates (``FactorStore.read``'s, in order) to the weights, as the run added them."""
    weights.replay(lm, (update["layers"] for update in saved))
