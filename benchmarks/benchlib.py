"""What the benchmark scripts share: printing a result and writing it where --out says."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | None, indent: int = 1) -> None:
    """Print ``result`` as JSON and, with ``out``, write it there (its folder created)."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
