"""What every analysis writes into its folder: ``<name>.json`` (the numbers behind every plot,
and the settings), ``<name>.md`` (its table) and PNG plots; and the small formatting helpers
they share."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..evaluation.results import json_safe
from ..evaluation.summary import to_markdown


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write(out_dir: Path, name: str, data: dict, header: list[str], rows: list[list[str]]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(json_safe(data), indent=1, allow_nan=False, default=_jsonable))
    (out_dir / f"{name}.md").write_text(to_markdown(header, rows))
    return data


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def _g(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)
