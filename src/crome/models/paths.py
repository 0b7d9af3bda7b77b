"""Where crome works by default: the device (``default_device``) and the user cache folder (``cache_dir``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def default_device() -> torch.device:
    """CUDA when present, else CPU; CROME_DEVICE overrides."""
    if os.environ.get("CROME_DEVICE"):
        return torch.device(os.environ["CROME_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir() -> Path:
    """$CROME_CACHE_DIR, else $XDG_CACHE_HOME/crome, else ~/.cache/crome."""
    if os.environ.get("CROME_CACHE_DIR"):
        return Path(os.environ["CROME_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / __name__.split(".")[0]     # "crome"
